"""Shared pieces of the experiment drivers: flags, up-front checks, the Flower simulation."""

from __future__ import annotations

import argparse
import os
import sys
from logging import INFO
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ddcore.data import DataSplits, load_dataset
from ddcore.errors import ConfigError
from ddcore.partition import partition_indices
from ddcore.runconfig import RUN_PRESETS, RunConfig, check_device, from_flat, run_preset, to_flat

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

# flag -> flat run-config key
FLAGS = {
    "dataset": "dataset", "data-dir": "data-dir", "clients": "num-clients", "partition": "partition",
    "alpha": "alpha", "classes-per-client": "classes-per-client", "method": "method", "ipc": "ipc",
    "iterations": "iterations", "rounds": "rounds", "fedavg-rounds": "fedavg-rounds", "seed": "seed",
    "device": "device", "summary-dtype": "summary-dtype", "summary-resolution": "summary-resolution",
}


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """--preset, the common overrides, and --set for any other run-config key."""
    parser.add_argument("--preset", default="default", choices=sorted(RUN_PRESETS))
    for flag in FLAGS:
        parser.add_argument(f"--{flag}", default=None, help=f"overrides run-config '{FLAGS[flag]}'")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="any other run-config key, e.g. --set train-epochs=100 model-width=32")


def parse_set(items: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE ...`` as a mapping of flat run-config keys to raw values."""
    pairs = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        pairs[key] = value
    return pairs


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The preset with the flags applied; also stores ``args.flat`` and ``args.environment``."""
    overrides = {FLAGS[f]: getattr(args, f.replace("-", "_")) for f in FLAGS
                 if getattr(args, f.replace("-", "_")) is not None}
    cfg = from_flat({**overrides, **parse_set(args.set)}, base=run_preset(args.preset))
    check_device(cfg)
    from server.report import environment

    args.flat = {"preset": args.preset, **to_flat(cfg)}
    args.environment = environment(cfg.distill.device)
    return cfg


def check_partitions(cfg: RunConfig) -> DataSplits:
    """Load the data and partition it now, so bad settings fail before anything runs."""
    splits = load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, seed=cfg.partition.seed)
    labels = splits.train.y.numpy()
    parts = partition_indices(labels, cfg.partition)
    for pid, part in enumerate(parts):
        counts = np.bincount(labels[part], minlength=splits.train.num_classes)
        if len(part) == 0:
            raise ConfigError(f"client {pid} received no examples; use fewer clients or a larger alpha")
        if cfg.distill.ipc > counts.max():
            raise ConfigError(
                f"ipc {cfg.distill.ipc} is larger than every class of client {pid} "
                f"(largest class: {counts.max()} examples); use --ipc <= {counts.max()}"
            )
    return splits


def fail(exc: BaseException) -> int:
    """Print a one-line error and return exit code 2."""
    print(f"error: {exc}", file=sys.stderr)
    return 2


class System(NamedTuple):
    """One system a simulation runs: a name for the report, its kind, and its settings."""

    name: str
    kind: str  # "distill" (summaries pooled by the server) or "fedavg" (Flower's FedAvg)
    cfg: RunConfig


def run_in_simulation(cfg: RunConfig, test, systems: list[System],
                      client_app: ClientApp | None = None) -> dict:
    """Run ``systems`` one after another in one simulation of ``cfg``'s clients.

    Every system sees the same virtual SuperNodes (so the same partitions). ``client_app``
    replaces the real :mod:`client.app` (tests inject faulty clients this way).
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.app import Context
    from flwr.common import log
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as default_client_app
    from server.run import run_distillation, run_fedavg

    unknown = [s.kind for s in systems if s.kind not in ("distill", "fedavg")]
    if unknown:
        raise ConfigError(f"unknown system kind(s) {unknown}; known: distill, fedavg")
    results: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for system in systems:
            c = system.cfg
            if system.kind == "distill":
                log(INFO, "=== %s: %s, ipc %d ===", system.name, c.distill.method, c.distill.ipc)
                results[system.name] = run_distillation(grid, c, test, name=system.name)
            else:
                log(INFO, "=== %s: FedAvg, %d rounds ===", system.name, c.fedavg_rounds)
                results[system.name] = run_fedavg(grid, c, test, name=system.name)

    gpus = 1.0 / 2 if cfg.distill.device.startswith("cuda") else 0.0
    run_simulation(server_app=server_app, client_app=client_app or default_client_app,
                   num_supernodes=cfg.partition.num_partitions,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": gpus}})
    missing = [s.name for s in systems if s.name not in results]
    if missing:
        raise RuntimeError(f"the simulation ended without results for {missing}; see the log above")
    return results
