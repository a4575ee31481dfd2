"""Writing results safely: atomic files, staged folders, and the environment every artefact records.

Every report writer (``python -m ddcore``, the drivers in ``simulations``, the ServerApp) writes
through these, so a crash or a bad input never leaves half a file or half a folder behind.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

RECORDED_PACKAGES = ("torch", "torchvision", "flwr", "flwr-datasets", "opacus", "numpy")


def environment(device: str) -> dict:
    """Versions, device and threads, recorded with every report."""
    versions = {}
    for pkg in RECORDED_PACKAGES:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        **provenance(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def provenance() -> dict[str, str]:
    """The command that is running (``python -m module args`` when run as a module) and the
    commit of the code (``git describe --always --dirty``; "unknown" outside a git checkout)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name.removesuffix('.__main__')}" if spec is not None else Path(sys.argv[0]).name
    command = " ".join([head, *(shlex.quote(a) for a in sys.argv[1:])])
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"],
                                cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"command": command, "commit": commit}


def provenance_line(report: dict) -> str:
    """The markdown line that says which command at which commit wrote ``report`` (or "")."""
    env = report.get("environment") or {}
    if "command" not in env:
        return ""
    return f"Written by `{env['command']}` at commit {env['commit']}."


def with_provenance(text: str, report: dict) -> str:
    """``text`` (a report's markdown) ending with its :func:`provenance_line`."""
    line = provenance_line(report)
    return f"{text.rstrip()}\n\n{line}\n" if line else text


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write into; its files move into ``out`` only on success.

    On any exception nothing reaches ``out`` (which is not even created) and the stage is removed.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield stage
        out.mkdir(exist_ok=True)
        for f in stage.iterdir():
            os.replace(f, out / f.name)
    finally:
        for f in stage.glob("*"):
            f.unlink()
        stage.rmdir()
