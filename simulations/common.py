"""Shared pieces of the federated drivers: their flags, up-front checks, the Flower simulation."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ddcore.data import DataSplits
from ddcore.errors import ConfigError
from ddcore.methods.base import check_ipc
from ddcore.partition import partition_indices
from ddcore.runconfig import RunConfig, check_device, from_flat, run_preset, run_splits, to_flat
from ddcore.settings import add_settings, given

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

# the named flags of the federated drivers (compare, privacy_utility): flag -> run-config key;
# every other key through --set
# The statistics system with its ridge head (privacy.statistics.ridge_head): clients release sums,
# counts and second moments of ScatterNet features under a frozen random projection to D dims (one
# network, model "scatter"); the server solves the classifier. D chosen on a validation split
# (python -m simulations.statistics_choice; docs/results/statistics_choice).
STATISTICS_RIDGE: dict[str, str | int | float] = {"summary-kind": "statistics", "statistics-head": "ridge",
                                                  "model": "scatter", "model-width": 384, "bank-size": 1}
RUN_FLAGS = {
    "dataset": "dataset", "data-dir": "data-dir", "clients": "num-clients", "partition": "partition",
    "alpha": "alpha", "classes-per-client": "classes-per-client", "method": "method", "ipc": "ipc",
    "iterations": "iterations", "rounds": "rounds", "fedavg-rounds": "fedavg-rounds", "seed": "seed",
    "device": "device", "summary-dtype": "summary-dtype", "summary-resolution": "summary-resolution",
}


@dataclass(frozen=True)
class AuditBudget:
    """How large the leakage audits of a driver run are; one row per preset in :data:`AUDIT_BUDGETS`."""

    samples: int = 500  # members and non-members each (membership inference)
    lira_shadows: int = 8  # LiRA shadow models of the FedAvg rows (privacy_utility; compare asks for them)
    memorisation_reference: int = 1000  # images of each set behind "closer to private" (near-copies: all)
    inversion_steps: int = 200  # Adam steps of each gradient-inversion restart
    inversion_restarts: int = 2
    canaries: int = 500  # one-run canary audit (privacy.audit.run_canaries)


# the audit sizes each preset's drivers default to, beside ddcore.runconfig.RUN_PRESETS; the flags
# --audit-samples, --lira-shadows, --inversion-steps and --canaries override them. quick keeps a
# whole `--preset quick` driver run within minutes on 2 cores; the others measure as much as they
# always did (near-copies search the whole private set in every preset). Canaries: about an
# eighth of a 4,000-image training set is included at 1,000 on mnist5k (hence 500); the largest
# epsilon a setting can certify is reported with every bound (docs/privacy_audit.md).
AUDIT_BUDGETS: dict[str, AuditBudget] = {
    "quick": AuditBudget(samples=200, lira_shadows=2, memorisation_reference=200, inversion_steps=30,
                         inversion_restarts=1, canaries=200),
    "default": AuditBudget(),
    "central": AuditBudget(),
    "privacy": AuditBudget(),
    "benchmark": AuditBudget(),
    # Fashion-MNIST: LiRA would retrain the whole federated recipe per shadow (minutes each), so the
    # FedAvg rows get the loss-threshold attack and the canary audit only
    "fmnist": AuditBudget(lira_shadows=0, canaries=1000, inversion_steps=100),
    "paper": AuditBudget(canaries=1000),
}
AUDIT_FLAGS = {"audit-samples": "samples", "lira-shadows": "lira_shadows",
               "inversion-steps": "inversion_steps", "canaries": "canaries"}


def add_audit_flags(parser: argparse.ArgumentParser, names: tuple[str, ...],
                    opt_in: tuple[str, ...] = ()) -> None:
    """The audit-size flags ``names`` (of :data:`AUDIT_FLAGS`), defaulting to the preset's budget
    (those in ``opt_in`` to 0: the driver runs that audit only when asked)."""
    helps = {"audit-samples": "members and non-members each in the membership audits (0 = no audits)",
             "lira-shadows": "LiRA shadow models for the FedAvg rows (even; 0 = loss-threshold only)",
             "inversion-steps": "Adam steps of each gradient-inversion restart (0 = skip inversion)",
             "canaries": "canaries for the one-run epsilon lower bound, each put into a client's data "
                         "with probability 1/2 (0 = no canary audit)"}
    for name in names:
        default = ("default 0: only when asked" if name in opt_in
                   else "default from the preset (simulations.common.AUDIT_BUDGETS)")
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{helps[name]}; {default}")


def audit_budget(args: argparse.Namespace, **overrides: int) -> AuditBudget:
    """The preset's :class:`AuditBudget` with the audit flags given on the command line applied.

    ``overrides`` replace the preset's value where the flag was not given (a driver's own default).
    """
    budget = replace(AUDIT_BUDGETS[args.preset], **overrides)
    given_flags = {field: getattr(args, name.replace("-", "_")) for name, field in AUDIT_FLAGS.items()
                   if getattr(args, name.replace("-", "_"), None) is not None}
    budget = replace(budget, **given_flags)
    bad = [f"--{name} {getattr(budget, field)}" for name, field in AUDIT_FLAGS.items()
           if getattr(budget, field) < 0]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: audit sizes must be >= 0")
    if budget.lira_shadows % 2:
        raise ConfigError(f"--lira-shadows must be even (each candidate is in half of the shadows), "
                          f"got {budget.lira_shadows}")
    return budget


def with_canaries(args: argparse.Namespace, cfg: RunConfig, budget: AuditBudget) -> RunConfig:
    """``cfg`` with the run-config key ``canaries`` set from the budget (``--canaries``)."""
    if "canaries" in given(args, RUN_FLAGS):
        raise ConfigError("give the canary count with --canaries, not --set canaries=...")
    return from_flat({"canaries": budget.canaries}, base=cfg)


def warn_if_bound_exceeds(name: str, leakage: dict, eps_spent: float | None) -> bool:
    """Say loudly on stderr when a canary lower bound exceeds the accountant's epsilon; True then.

    The accountant's epsilon is an upper bound on the privacy loss, the audit's a lower bound
    at confidence 1 - beta: above it, the DP code or its accounting is wrong (or, with
    probability at most beta, a false alarm). docs/privacy_audit.md says what to do.
    """
    from privacy.audit import bound_exceeds_accounted

    if not bound_exceeds_accounted(leakage.get("eps_lower_bound"), eps_spent):
        return False
    print(f"WARNING: {name}: the canary audit's epsilon lower bound {leakage['eps_lower_bound']:.3f} "
          f"exceeds the accounted epsilon {eps_spent:.3f} - the DP implementation or its accounting is "
          f"broken (or a false alarm of probability <= beta); this row is not a result "
          f"(see docs/privacy_audit.md)", file=sys.stderr)
    return True


def add_run_flags(parser: argparse.ArgumentParser, preset: str = "default") -> None:
    """--preset, the federated drivers' named flags, and --set for any run-config key."""
    add_settings(parser, RUN_FLAGS, preset=preset)


def run_config(args: argparse.Namespace, driver: dict | None = None) -> RunConfig:
    """The run settings of a federated driver (:func:`ddcore.settings.settings_from_args`).

    ``driver``: flat keys the driver changes in the preset (its own budget); the command line's
    flags and ``--set`` still override them.
    """
    base = from_flat(driver or {}, base=run_preset(args.preset))
    return check_device(from_flat(given(args, RUN_FLAGS), base=base))


def recorded_config(preset: str, cfg: RunConfig) -> dict:
    """The config block of a report: the preset's name and every flat key."""
    return {"preset": preset, **to_flat(cfg)}


def check_partitions(cfg: RunConfig) -> DataSplits:
    """Load the data and partition it now, so bad settings fail before anything runs."""
    splits = run_splits(cfg)
    parts = partition_indices(splits.train.y.numpy(), cfg.partition)
    for pid, part in enumerate(parts):
        if len(part) == 0:
            raise ConfigError(f"client {pid} received no examples; use fewer clients or a larger alpha")
        check_ipc(replace(splits.train.subset(part), name=f"client {pid}"), cfg.distill.ipc)
    return splits


def check_dp_clients(name: str, cfg: RunConfig, sizes: list[int]) -> None:
    """Refuse ``cfg``'s DP budget before anything runs when the accountant cannot certify it or
    some client of ``sizes`` examples cannot meet it (delta below 1/n, ...); names the system."""
    import math

    from privacy.accounting import check_budget, epsilon_floor

    dp = cfg.distill.dp
    rdp_floor = epsilon_floor(dp.delta) if dp.accountant == "rdp" else 0.0
    if math.isfinite(dp.target_epsilon) and dp.target_epsilon <= rdp_floor:
        raise ConfigError(f"{name}: epsilon {dp.target_epsilon:g} is below {epsilon_floor(dp.delta):.3g}, "
                          f"the least the RDP accountant can certify at delta {dp.delta:g}; raise the "
                          "epsilon or delta")
    for i, n in enumerate(sizes):
        try:
            check_budget(target_epsilon=dp.target_epsilon, delta=dp.delta, max_grad_norm=dp.max_grad_norm,
                         num_examples=n)
        except ValueError as exc:
            raise ConfigError(f"{name}, client {i} ({n} examples): {exc}") from None


def write_report(out: Path, report: dict, markdown: Callable[[dict], str],
                 plot: Callable[[dict, Path], None]) -> None:
    """report.json and report.md (atomically), the driver's plots, and the table on stdout."""
    from ddcore.files import atomic_write, with_provenance

    atomic_write(out / "report.json", json.dumps(report, indent=2, default=str).encode())
    atomic_write(out / "report.md", with_provenance(markdown(report), report).encode())
    plot(report, out)
    print(markdown(report))
    print(f"report: {out / 'report.json'}")


def fail(exc: BaseException) -> int:
    """Print a one-line error and return exit code 2."""
    print(f"error: {exc}", file=sys.stderr)
    return 2


class System(NamedTuple):
    """One system a simulation runs: a name for the report, its kind, and its settings."""

    name: str
    kind: str  # "distill" (summaries pooled by the server) or "fedavg" (Flower's FedAvg)
    cfg: RunConfig


def check_systems(systems: list[System]) -> None:
    """Refuse, naming the system, any distillation system whose clients would send private records
    (:meth:`ddcore.runconfig.RunConfig.check_sends_no_record`)."""
    for system in systems:
        if system.kind == "distill":
            try:
                system.cfg.check_sends_no_record()
            except ConfigError as exc:
                raise ConfigError(f"{system.name}: {exc}") from None


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
    check_systems(systems)
    results: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for system in systems:
            c = system.cfg
            if system.kind == "distill":
                what = "per-class statistics" if c.summary_kind == "statistics" else c.distill.method
                log(INFO, "=== %s: %s, ipc %d ===", system.name, what, c.distill.ipc)
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
