"""Shared pieces of the federated drivers: their flags, up-front checks, the Flower simulation."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from logging import INFO
from typing import TYPE_CHECKING, NamedTuple

from ddcore.data import DataSplits, load_dataset
from ddcore.errors import ConfigError
from ddcore.methods.base import check_ipc
from ddcore.partition import partition_indices
from ddcore.runconfig import RunConfig, to_flat
from ddcore.settings import add_settings, settings_from_args

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

# the named flags of the federated drivers (compare, privacy_utility): flag -> run-config key;
# every other key through --set
RUN_FLAGS = {
    "dataset": "dataset", "data-dir": "data-dir", "clients": "num-clients", "partition": "partition",
    "alpha": "alpha", "classes-per-client": "classes-per-client", "method": "method", "ipc": "ipc",
    "iterations": "iterations", "rounds": "rounds", "fedavg-rounds": "fedavg-rounds", "seed": "seed",
    "device": "device", "summary-dtype": "summary-dtype", "summary-resolution": "summary-resolution",
}


def add_run_flags(parser: argparse.ArgumentParser, preset: str = "default") -> None:
    """--preset, the federated drivers' named flags, and --set for any run-config key."""
    add_settings(parser, RUN_FLAGS, preset=preset)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run settings of a federated driver (:func:`ddcore.settings.settings_from_args`)."""
    return settings_from_args(args, RUN_FLAGS)


def recorded_config(preset: str, cfg: RunConfig) -> dict:
    """The config block of a report: the preset's name and every flat key."""
    return {"preset": preset, **to_flat(cfg)}


def check_partitions(cfg: RunConfig) -> DataSplits:
    """Load the data and partition it now, so bad settings fail before anything runs."""
    splits = load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, seed=cfg.partition.seed)
    parts = partition_indices(splits.train.y.numpy(), cfg.partition)
    for pid, part in enumerate(parts):
        if len(part) == 0:
            raise ConfigError(f"client {pid} received no examples; use fewer clients or a larger alpha")
        check_ipc(replace(splits.train.subset(part), name=f"client {pid}"), cfg.distill.ipc)
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
