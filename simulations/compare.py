"""Federated distillation vs FedAvg vs random real samples, on identical partitions.

    python -m simulations.compare --preset default --out runs/compare

Runs the systems one after another in one Flower simulation (Ray backend, one virtual
SuperNode per client) and writes report.json, report.md and plots into --out. ``--systems``
picks them (default distill,random_real,fedavg):

- ``distill``: every client distills its data with ``method`` and the server pools the summaries
  (or, with ``--set summary-kind=statistics``, the statistics system below);
- ``statistics``: every client releases per-class statistics once (``summary-kind=statistics``,
  privacy.statistics) and the server adds them up and distills ``ipc`` images per class itself;
- ``random_real``: every client sends ``ipc`` random real images per class;
- ``fedavg``: Flower's FedAvg for ``fedavg-rounds`` rounds (skipped when that is 0).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

from ddcore.config import DistillConfig
from ddcore.errors import ConfigError
from ddcore.files import environment
from ddcore.methods.options import without_options
from ddcore.profile import measure_tree
from ddcore.runconfig import RunConfig
from privacy.audit import CANARY_BETA, CANARY_KIND, run_canaries
from simulations.common import (
    AuditBudget,
    System,
    add_audit_flags,
    add_run_flags,
    audit_budget,
    check_partitions,
    fail,
    recorded_config,
    run_config,
    run_in_simulation,
    warn_if_bound_exceeds,
    with_canaries,
)

SYSTEMS = ("distill", "statistics", "random_real", "fedavg")
DEFAULT_SYSTEMS = ("distill", "random_real", "fedavg")


def parse_systems(text: str) -> list[str]:
    """``"distill,fedavg"`` -> the names, checked against :data:`SYSTEMS` (report order kept)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if not names or unknown or len(set(names)) != len(names):
        raise ConfigError(f"--systems takes distinct names of {', '.join(SYSTEMS)}; got {text!r}")
    return names


def random_real_config(distill: DistillConfig) -> DistillConfig:
    """``distill`` as the random-real baseline: random real images, hard labels, no image options."""
    return without_options(replace(distill, method="random_real", factorised=False))


def plan_systems(cfg: RunConfig, names: list[str]) -> list[System]:
    """The systems ``names`` of :data:`SYSTEMS` on ``cfg``'s partitions."""
    by_name = {
        "distill": System("distill", "distill", cfg),
        "statistics": System("statistics", "distill", replace(cfg, summary_kind="statistics")),
        "random_real": System("random_real", "distill",
                              replace(cfg, distill=random_real_config(cfg.distill), summary_kind="images")),
        "fedavg": System("fedavg", "fedavg", replace(cfg, summary_kind="images")),
    }
    return [by_name[n] for n in names if n != "fedavg" or cfg.fedavg_rounds > 0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder for the report")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated, of {', '.join(SYSTEMS)} "
                             f"(default {','.join(DEFAULT_SYSTEMS)})")
    add_audit_flags(parser, ("audit-samples", "lira-shadows", "canaries"),
                    opt_in=("lira-shadows", "canaries"))
    add_run_flags(parser)
    return parser


def verdicts(methods: dict, ipc: int, test_size: int) -> list[str]:
    """Plain-language comparisons that the numbers support (each distillation system vs the others)."""
    r, f = methods.get("random_real"), methods.get("fedavg")
    out: list[str] = []
    for name, label in (("distill", "Distillation"), ("statistics", "Server-distilled statistics")):
        d = methods.get(name)
        if d is None or d["final_accuracy"] is None:
            continue
        if r and r["final_accuracy"] is not None:
            gap = 100 * (d["final_accuracy"] - r["final_accuracy"])
            p = (d["final_accuracy"] + r["final_accuracy"]) / 2
            noise = 100 * 2 * math.sqrt(2 * p * (1 - p) / max(test_size, 1))  # ~95% band of a difference
            if abs(gap) <= noise:
                word = "was on par with (within test-set noise of)"
            else:
                word = "beat" if gap > 0 else "did NOT beat"
            out.append(f"{label} {word} random real samples at IPC {ipc}: "
                       f"{100 * d['final_accuracy']:.2f}% vs {100 * r['final_accuracy']:.2f}% "
                       f"({gap:+.2f} points; noise band +-{noise:.2f} on {test_size} test images; uploads "
                       f"{d['bytes_up'] / 2**20:.2f} vs {r['bytes_up'] / 2**20:.2f} MiB).")
        if f and f["final_accuracy"] is not None:
            ratio = f["bytes_up"] / max(d["bytes_up"], 1)
            out.append(f"FedAvg after {f['rounds']} rounds: {100 * f['final_accuracy']:.2f}% using "
                       f"{ratio:.1f}x the uploaded bytes of {label.lower()} "
                       f"({f['bytes_up'] / 2**20:.1f} MiB vs {d['bytes_up'] / 2**20:.2f} MiB).")
    return out


def settings(args: argparse.Namespace) -> tuple[list[str], AuditBudget, RunConfig]:
    """The systems, the audit budget and the run settings of a comparison.

    LiRA and the canary audit run only when asked for (``--lira-shadows``, ``--canaries``):
    canaries (inverted, mislabelled held-out images) would enter the clients' data, and so the
    headline systems' training and the pooled summaries.
    """
    names = parse_systems(args.systems)
    budget = audit_budget(args, lira_shadows=0, canaries=0)
    if not budget.samples:
        budget = replace(budget, canaries=0)  # --audit-samples 0: no audits at all
    return names, budget, with_canaries(args, run_config(args), budget)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        names, budget, cfg = settings(args)
        splits = check_partitions(cfg)
        canaries = run_canaries(cfg, splits)
    except ValueError as exc:
        return fail(exc)
    systems = plan_systems(cfg, names)
    with measure_tree() as usage:
        results = run_in_simulation(cfg, splits.test, systems)
    methods = {name: res.to_dict() for name, res in results.items()}
    if budget.samples:  # membership inference, memorisation, canaries: the same samples for every system
        from privacy.audit import audit_samples, audit_system

        members, nonmembers = audit_samples(splits, budget.samples, seed=cfg.partition.seed)
        for system in systems:
            res = results[system.name]
            leakage = audit_system(system.cfg, system.kind, res.final_state, res.pooled, splits, members,
                                   nonmembers, lira_shadows=budget.lira_shadows,
                                   memorisation_reference=budget.memorisation_reference, canaries=canaries)
            eps = (methods[system.name]["privacy"] or {}).get("epsilon_spent_max")
            leakage["epsilon_spent"] = eps
            leakage["canary_bound_exceeds_epsilon"] = warn_if_bound_exceeds(system.name, leakage, eps)
            methods[system.name]["leakage"] = leakage
    report = {
        "title": f"feddistill compare: {', '.join(s.name for s in systems)} ({cfg.dataset}, "
                 f"method {cfg.distill.method}, ipc {cfg.distill.ipc})",
        "config": recorded_config(args.preset, cfg),
        "audit": {**asdict(budget), "canary_kind": CANARY_KIND, "canary_beta": CANARY_BETA},
        "environment": environment(cfg.distill.device),
        "resources": {"wall_seconds": usage.seconds, "peak_rss_mb": usage.peak_rss_mb,
                      "note": "whole simulation: driver plus Ray processes, RSS summed, sampled every 0.5 s"},
        "methods": methods,
        "verdicts": verdicts(methods, cfg.distill.ipc, len(splits.test)),
    }
    from ddcore.plots import plot_summary
    from server.report import write_report

    write_report(args.out, report)
    for name in ("distill", "statistics", "random_real"):
        if name in results and results[name].pooled is not None:
            plot_summary(results[name].pooled, splits.test, args.out / f"pooled_{name}.png")
    from server.report import markdown

    print(markdown(report))
    print(f"report: {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
