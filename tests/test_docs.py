"""Every ``python -m MODULE ...`` command in README.md and docs/*.md runs a module of this repository
whose own argparse parser (its ``build_parser()``) accepts the command's flags.

Commands are taken from fenced blocks (lines continued with a trailing backslash joined) and from
inline code (which may wrap over lines). Shell around a command (``VAR=1`` before it, ``&&``, ``|``,
``>``, ``#`` comments after it) is left out. Values are the reader's to fill in: an all-capitals
value (``DIR``, ``N``, ``E``) is a placeholder even where the flag wants a number, ``...`` elides the
rest of a command (or a flag's value) and ``[--flag value]`` marks an optional part. A command that
names only its module (``python -m ddcore``) is checked for the module alone.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
TOOLS = frozenset({"pytest", "pip", "venv"})  # installed tools the docs run, not this repository's
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")
ELLIPSIS = "..."
PYTHON_M = re.compile(r"\bpython[0-9.]*\s+-m\s+")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")  # inline code may wrap, but not over a blank line
BAD_VALUE = re.compile(r"invalid (?:[\w ]+ value|choice): '([^']*)'")


@dataclass(frozen=True)
class Command:
    """One documented ``python -m`` command: where it is written, its module and arguments."""

    path: Path
    line: int
    text: str
    module: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: python -m {self.text}"


def snippets(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced-block line (backslash continuations joined) and inline span."""
    found, prose, lines = [], [], text.splitlines()
    fenced, pending = False, None
    for number, line in enumerate(lines, start=1):
        if FENCE.match(line):
            fenced, pending = not fenced, None
            prose.append("")
            continue
        if not fenced:
            prose.append(line)
            continue
        prose.append("")
        start, code = pending or (number, "")
        code += line.rstrip()
        if code.endswith("\\"):
            pending = (start, code[:-1] + " ")
        else:
            found.append((start, code))
            pending = None
    body = "\n".join(prose)
    for match in INLINE.finditer(body):
        found.append((body.count("\n", 0, match.start()) + 1, match.group(1).replace("\n", " ")))
    return sorted(found)


def shell_words(code: str) -> list[str]:
    """The words of one command, up to the first shell operator (``&&``, ``|``, ``>``, ``;`` ...)."""
    lexer = shlex.shlex(code, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if word and all(c in lexer.punctuation_chars for c in word):
            break
        words.append(word)
    return words


def without_notation(words: list[str]) -> list[str]:
    """``words`` without ``[ ]`` around optional parts and with ``...`` dropped (or a placeholder
    value where it stands for a flag's value)."""
    out: list[str] = []
    for word in words:
        if word.startswith("[-"):
            word = word[1:]
        word = word.removesuffix("]") if word.endswith("]") and "[" not in word else word
        if word == ELLIPSIS:
            if out and out[-1].startswith("-"):
                out.append("VALUE")
            continue
        out.append(word)
    return out


def commands_in(path: Path, text: str) -> list[Command]:
    """Every ``python -m`` command written in ``text`` (the contents of ``path``), in line order."""
    commands = []
    for line, code in snippets(text):
        for match in PYTHON_M.finditer(code):
            try:
                words = shell_words(code[match.end():]) or ["<no module named>"]
            except ValueError as exc:  # unbalanced quotes
                words = [f"<unparsable: {exc}>"]
            args = tuple(without_notation(words[1:]))
            commands.append(Command(path, line, " ".join(words), words[0], args))
    return commands


COMMANDS = [c for path in DOCS for c in commands_in(path, path.read_text(encoding="utf-8"))]


def parser_of(module: str) -> argparse.ArgumentParser:
    """The parser of ``python -m module``: its (or its package's ``__main__``'s) ``build_parser()``."""
    spec = importlib.util.find_spec(module)
    runs = f"{module}.__main__" if spec.submodule_search_locations is not None else module
    factory = getattr(importlib.import_module(runs), "build_parser", None)
    if factory is None:
        pytest.fail(f"{runs} has no build_parser(): expose its argparse parser so the docs can be checked")
    return factory()


def module_problem(module: str) -> str | None:
    """Why ``python -m module`` does not run a module of this repository, or None when it does."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        return f"no module {module!r} ({exc})"
    if spec is None or spec.origin is None:
        return f"no module {module!r}"
    if not Path(spec.origin).resolve().is_relative_to(ROOT / module.split(".")[0]):  # not .venv's
        return f"{module!r} is not this repository's (if it is an installed tool, add it to TOOLS)"
    return None


def optional_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` (and its subcommands' parsers) with no flag required: prose may leave out ``--out``.

    argparse reports a missing required flag before an unknown one, so the flags a command does
    use are checked only once none is required. (``_actions`` is argparse's list of arguments.)
    """
    for action in parser._actions:
        if action.option_strings:
            action.required = False
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                optional_flags(sub)
    return parser


def parse_problem(parser: argparse.ArgumentParser, args: tuple[str, ...]) -> str | None:
    """argparse's complaint about ``args``, or None when it accepts them (placeholder values allowed)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(list(args))
    except SystemExit as exc:
        if exc.code == 0:  # --help
            return None
        message = (err.getvalue().strip().splitlines() or [f"exit code {exc.code}"])[-1]
        bad = BAD_VALUE.search(message)
        return None if bad and PLACEHOLDER.fullmatch(bad.group(1)) else message
    return None


def test_the_docs_have_python_m_commands() -> None:
    documented = {c.module for c in COMMANDS}
    assert len(COMMANDS) > 50 and {"ddcore", "simulations.compare", "privacy.tls"} <= documented


@pytest.mark.parametrize("module", sorted({c.module for c in COMMANDS} - TOOLS))
def test_every_documented_command_runs_a_module_with_the_flags_it_uses(module: str) -> None:
    commands = [c for c in COMMANDS if c.module == module]
    problem = module_problem(module)
    if problem:
        pytest.fail("\n".join(f"{c}\n    {problem}" for c in commands))
    failures = [f"{c}\n    {why}" for c in commands
                if c.args and (why := parse_problem(optional_flags(parser_of(module)), c.args))]
    assert not failures, "documented commands that the module's parser refuses:\n" + "\n".join(failures)


def test_the_extraction_reads_blocks_inline_code_and_shell_notation() -> None:
    text = ("Run `python -m a.b --x 1\n--y` here.\n\n```bash\n"
            "OMP_NUM_THREADS=1 .venv/bin/python -m c --p \\\n"
            "    --q 2 [--r 3] && python -m d --s ...  # note\n"
            "python3 -m e --grid \"k=1 j=2\" > log 2>&1\n```\n`python -m f ... --out DIR`\n")
    found = commands_in(ROOT / "x.md", text)
    assert [(c.line, c.module) for c in found] == [(1, "a.b"), (5, "c"), (5, "d"), (7, "e"), (9, "f")]
    assert [c.args for c in found] == [("--x", "1", "--y"), ("--p", "--q", "2", "--r", "3"), ("--s", "VALUE"),
                                       ("--grid", "k=1 j=2"), ("--out", "DIR")]
    parser = argparse.ArgumentParser()
    parser.add_argument("--epsilon", type=float)
    parser.add_argument("--grid")
    assert parse_problem(parser, ("--epsilon", "E", "--grid", "VALUE")) is None
    assert "unrecognized arguments: --epsilom" in parse_problem(parser, ("--epsilom", "1"))
    assert "invalid float value: 'e'" in parse_problem(parser, ("--epsilon", "e"))
