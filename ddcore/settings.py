"""Command-line settings of every front end: ``--preset``, named flags and ``--set KEY=VALUE``.

One path from a command line to a :class:`~ddcore.runconfig.RunConfig`, used by
``python -m ddcore``, the drivers in ``simulations`` and (through the same run-config keys)
the Flower apps: the preset (a table in :data:`ddcore.runconfig.RUN_PRESETS`), then the named
flags, then ``--set`` pairs, each a flat run-config key. Every key is reachable through
``--set``; unknown keys and bad values raise :class:`~ddcore.errors.ConfigError` naming them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping

from ddcore.errors import ConfigError
from ddcore.runconfig import KEYS, RUN_PRESETS, RunConfig, check_device, from_flat, run_preset, to_flat

# keys that only act in a federated run (a centralised run accepts and ignores them)
FEDERATED_KEYS = frozenset(k for k, (section, name) in KEYS.items()
                           if (section == "partition" and name != "seed")
                           or (section == "run" and name not in ("dataset", "data_dir", "normalisation")))


def add_settings(parser: argparse.ArgumentParser, flags: Mapping[str, str] | Iterable[str] = (), *,
                 preset: str = "default") -> None:
    """Add ``--preset``, a flag per entry of ``flags`` and ``--set`` to ``parser``.

    ``flags`` maps a flag name to its run-config key (or lists keys used as their own flag
    names). Boolean keys take an optional value: ``--dp`` means ``--dp true``.
    """
    parser.add_argument("--preset", default=preset, choices=sorted(RUN_PRESETS),
                        help=f"settings table the flags and --set override (default {preset}); "
                             "ddcore.runconfig.RUN_PRESETS")
    defaults = to_flat(RunConfig())
    for flag, key in _flag_map(flags).items():
        if key not in KEYS:
            raise ConfigError(f"flag --{flag} names no run-config key {key!r}")
        kind = {"nargs": "?", "const": "true"} if isinstance(defaults[key], bool) else {}
        parser.add_argument(f"--{flag}", default=None, dest=_dest(flag),
                            metavar=key.upper().replace("-", "_"),
                            help=f"run-config '{key}' (in the default preset: {defaults[key]!r})", **kind)
    parser.add_argument("--set", nargs="+", default=[], action="extend", metavar="KEY=VALUE",
                        help="any run-config key, e.g. --set train-epochs=50 model-width=64 "
                             f"(known: {', '.join(KEYS)})")


def parse_set(items: Iterable[str]) -> dict[str, str]:
    """``--set KEY=VALUE ...`` as a mapping of flat run-config keys to raw values."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        if key not in KEYS:
            raise ConfigError(f"--set {key}: unknown run-config key; known: {', '.join(KEYS)}")
        pairs[key] = value
    return pairs


def given(args: argparse.Namespace, flags: Mapping[str, str] | Iterable[str] = ()) -> dict[str, str]:
    """The run-config keys the command line set (named flags, then ``--set``), with raw values."""
    named = {key: getattr(args, _dest(flag)) for flag, key in _flag_map(flags).items()
             if getattr(args, _dest(flag), None) is not None}
    pairs = parse_set(args.set)
    both = sorted(set(named) & set(pairs))
    if both:
        raise ConfigError(f"{', '.join(both)} given both as a flag and with --set; give each once")
    return {**named, **pairs}


def settings_from_args(args: argparse.Namespace, flags: Mapping[str, str] | Iterable[str] = ()) -> RunConfig:
    """The preset with the named flags and ``--set`` applied (and the device checked)."""
    return check_device(from_flat(given(args, flags), base=run_preset(args.preset)))


def note_ignored_centrally(keys: Iterable[str]) -> None:
    """Say on stderr which of ``keys`` a centralised command accepts but ignores (federated-only)."""
    ignored = sorted(set(keys) & FEDERATED_KEYS)
    if ignored:
        print(f"note: {', '.join(ignored)} only act in federated runs; ignored here", file=sys.stderr)


def _flag_map(flags: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    return dict(flags) if isinstance(flags, Mapping) else {k: k for k in flags}


def _dest(flag: str) -> str:
    return "flag_" + flag.replace("-", "_")
