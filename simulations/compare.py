"""Federated distillation vs FedAvg vs random real samples, on identical partitions.

    python -m simulations.compare --preset default --out runs/compare

Runs the systems one after another in one Flower simulation (Ray backend, one virtual
SuperNode per client) and writes report.json, report.md and plots into --out. ``--systems``
picks them (default distill,statistics,random_real,fedavg). Every report attacks what the server
received from each system (near-copies and nearest-image membership for images, tracing for
statistics, update loss change for weights: :mod:`privacy.server_audit`); ``--reference`` names
an earlier report whose accuracies the leakage table compares with:

- ``distill``: every client distills its data with ``method`` from noise (``init=noise``; no image
  leaves a client within its near-copy threshold of a private record) and the server pools the
  summaries (or, with ``--set summary-kind=statistics``, the statistics system below);
- ``statistics``: every client releases per-class statistics once (``summary-kind=statistics``,
  privacy.statistics) and the server adds them up and distills ``ipc`` images per class itself;
- ``statistics_ridge``: the statistics system with its ridge head
  (:data:`simulations.common.STATISTICS_RIDGE`): clients also release the second moments of
  ScatterNet features, and the server solves a ridge classifier on them in closed form (no image
  anywhere);
- ``distill_real``: ``distill`` with its images started from random real ones
  (``init=real``, ``allow-near-copies=true``): the run that ships near-copies, to show what it leaks;
- ``random_real``: every client sends ``ipc`` random real images per class (``allow-near-copies=true``:
  they are private records);
- ``fedavg``: Flower's FedAvg for ``fedavg-rounds`` rounds (skipped when that is 0);
- ``fedprox``: Flower's FedProx, the same rounds and local recipe plus the proximal term
  (``proximal-mu``; 0 takes :data:`FEDPROX_MU`, chosen on a validation split);
- ``fedavgm``: Flower's FedAvgM, FedAvg with server momentum (``server-momentum``; 0 takes
  :data:`FEDAVGM_MOMENTUM`);
- ``collaborative``: FedAF-style rounds (``collaborative=true``, at least 2 rounds): from round 2 the
  server sends the global model and its summary's class means, clients match toward them and send
  per-class soft labels of their data, and the server trains with those soft labels.
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
from ddcore.partition import describe
from ddcore.profile import measure_tree
from ddcore.runconfig import RunConfig, from_flat
from privacy.audit import CANARY_BETA, CANARY_KIND, run_canaries
from simulations.common import (
    STATISTICS_RIDGE,
    AuditBudget,
    System,
    add_audit_flags,
    add_run_flags,
    audit_budget,
    check_partitions,
    check_systems,
    fail,
    recorded_config,
    run_config,
    run_in_simulation,
    warn_if_bound_exceeds,
    with_canaries,
)

SYSTEMS = ("distill", "distill_real", "statistics", "statistics_ridge", "random_real", "fedavg", "fedprox",
           "fedavgm", "collaborative")
DEFAULT_SYSTEMS = ("distill", "statistics", "random_real", "fedavg")
WEIGHT_SYSTEMS = ("fedavg", "fedprox", "fedavgm")  # Flower's weight-averaging strategies
WEIGHT_LABELS = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedavgm": "FedAvgM"}
# FedProx's mu and FedAvgM's server momentum when the run-config leaves them 0, chosen on a
# validation split of Fashion-MNIST (6,000 records held out of the training split), 10 clients with
# two classes each, 5 rounds: `python -m simulations.tune_dp_fedavg --plain --preset fmnist
# --partition pathological --classes-per-client 2 --grid "fedavg-rounds=5 proximal-mu=..."`
# (docs/results/tune_weights_fmnist): mu 0.001 / 0.01 / 0.1 / 1 gave 51.1 / 51.9 / 53.8 / 41.7%,
# server momentum 0 / 0.5 / 0.9 gave 52.2 / 69.3 / 69.6%
FEDPROX_MU = 0.1
FEDAVGM_MOMENTUM = 0.9


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
    """The systems ``names`` of :data:`SYSTEMS` on ``cfg``'s partitions (weight-averaging ones only
    when ``fedavg-rounds`` > 0). Only the asked ones are built: each checks its own settings."""
    images = {"summary_kind": "images"}
    settings = {
        "distill": lambda: cfg,
        "statistics": lambda: replace(cfg, summary_kind="statistics"),
        "statistics_ridge": lambda: from_flat(STATISTICS_RIDGE, base=cfg),
        # the run's method started from real images, sending what that leaks (allow-near-copies)
        "distill_real": lambda: replace(cfg, distill=replace(cfg.distill, init="real"),
                                        allow_near_copies=True, **images),
        # random real images exist to send raw records: the baseline every summary must beat
        "random_real": lambda: replace(cfg, distill=random_real_config(cfg.distill), allow_near_copies=True,
                                       **images),
        "fedavg": lambda: replace(cfg, proximal_mu=0.0, server_momentum=0.0, **images),
        "fedprox": lambda: replace(cfg, proximal_mu=cfg.proximal_mu or FEDPROX_MU, server_momentum=0.0,
                                   **images),
        "fedavgm": lambda: replace(cfg, proximal_mu=0.0,
                                   server_momentum=cfg.server_momentum or FEDAVGM_MOMENTUM, **images),
        "collaborative": lambda: replace(cfg, collaborative=True, rounds=max(cfg.rounds, 2), **images),
    }
    return [System(n, "fedavg" if n in WEIGHT_SYSTEMS else "distill", settings[n]()) for n in names
            if n not in WEIGHT_SYSTEMS or cfg.fedavg_rounds > 0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder for the report")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated, of {', '.join(SYSTEMS)} "
                             f"(default {','.join(DEFAULT_SYSTEMS)})")
    add_audit_flags(parser, ("audit-samples", "lira-shadows", "canaries"),
                    opt_in=("lira-shadows", "canaries"))
    parser.add_argument("--reference", type=Path, default=None,
                        help="an earlier compare report.json: the leakage table says how many points each "
                             "system gained or gave up against the system of the same name there")
    add_run_flags(parser)
    return parser


def reference_accuracies(path: Path | None) -> dict | None:
    """{"path", "commit", "accuracy": {system: final accuracy}} of an earlier report (``--reference``)."""
    if path is None:
        return None
    import json

    try:
        earlier = json.loads(path.read_text())
        accuracy = {name: m["final_accuracy"] for name, m in earlier["methods"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--reference {path}: not a readable compare report.json ({exc})") from None
    return {"path": str(path), "commit": earlier.get("environment", {}).get("commit"), "accuracy": accuracy}


def verdicts(methods: dict, ipc: int, test_size: int) -> list[str]:
    """Plain-language comparisons that the numbers support (each distillation system vs the others)."""
    r = methods.get("random_real")
    out: list[str] = []
    for name, label in (("distill", "Distillation"), ("statistics", "Server-distilled statistics"),
                        ("statistics_ridge", "Statistics with a ridge head"),
                        ("collaborative", "Collaborative distillation")):
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
        for weights in WEIGHT_SYSTEMS:
            f = methods.get(weights)
            if f is None or f["final_accuracy"] is None:
                continue
            ratio, mib = f["bytes_up"] / max(d["bytes_up"], 1), (f["bytes_up"] / 2**20, d["bytes_up"] / 2**20)
            out.append(f"{WEIGHT_LABELS[weights]} after {f['rounds']} rounds: "
                       f"{100 * f['final_accuracy']:.2f}% (best {100 * f['best_accuracy']:.2f}%) using "
                       f"{ratio:.1f}x the uploaded bytes of {label.lower()} ({mib[0]:.1f} MiB vs "
                       f"{mib[1]:.2f} MiB).")
            out.append(reach(WEIGHT_LABELS[weights], f, label.lower(), d))
    return out


def leakage_verdicts(methods: dict) -> list[str]:
    """What the server-view attacks found, per system, and what real starts buy in accuracy."""
    out = []
    for name, m in methods.items():
        view = (m.get("leakage") or {}).get("server_view")
        if view is None:
            continue
        found = (f"its attack ({view['attack']}) reaches AUC {view['auc']:.3f}, "
                 f"TPR {view['tpr_at_0.1pct_fpr']:.3f} at 0.1% FPR")
        if view["kind"] == "images":
            share = 100 * view["near_copy_fraction"]
            out.append(f"{name} sent {view['near_copies']} near-copies of private records among "
                       f"{view['received_images']} images ({share:.1f}%); {found}.")
        else:
            out.append(f"{name} sent no image ({view['kind']}); {found}.")
    d, real = methods.get("distill"), methods.get("distill_real")
    if d and real and d["final_accuracy"] is not None and real["final_accuracy"] is not None:
        out.append(f"Starting the images from noise instead of real records costs "
                   f"{100 * (real['final_accuracy'] - d['final_accuracy']):+.2f} points "
                   f"({100 * d['final_accuracy']:.2f}% vs {100 * real['final_accuracy']:.2f}%).")
    return out


def reach(weights_label: str, weights: dict, label: str, summary: dict) -> str:
    """When the weight-averaging system first matched ``summary``'s accuracy, and its upload by then."""
    target = summary["final_accuracy"]
    first = next((h for h in weights["history"] if h["accuracy"] >= target), None)
    if first is None:
        return (f"{weights_label} never reached {label}'s {100 * target:.2f}% in {weights['rounds']} rounds "
                f"(best {100 * weights['best_accuracy']:.2f}%).")
    ratio = summary["bytes_up"] / max(first["bytes_up_cum"], 1)
    return (f"{weights_label} reached {label}'s {100 * target:.2f}% at round {first['round']} with "
            f"{first['bytes_up_cum'] / 2**20:.2f} MiB uploaded; {label} used {ratio:.2f}x that.")


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
        reference_accuracies(args.reference)  # a bad --reference fails before anything runs
        splits = check_partitions(cfg)
        canaries = run_canaries(cfg, splits)
        systems = plan_systems(cfg, names)  # each system checks its own settings (collaborative: DM, no DP)
        check_systems(systems)
    except ValueError as exc:
        return fail(exc)
    with measure_tree() as usage:
        results = run_in_simulation(cfg, splits.test, systems)
    methods = {name: res.to_dict() for name, res in results.items()}
    if budget.samples:  # membership inference, memorisation, canaries: the same samples for every system
        from privacy.audit import audit_samples, audit_system

        members, nonmembers = audit_samples(splits, budget.samples, seed=cfg.partition.seed)
        for system in systems:
            res = results[system.name]
            per_client = (methods[system.name]["privacy"] or {}).get("per_client", {})
            leakage = audit_system(system.cfg, system.kind, res.final_state, res.pooled, splits, members,
                                   nonmembers, lira_shadows=budget.lira_shadows,
                                   memorisation_reference=budget.memorisation_reference, canaries=canaries,
                                   received=res.received,
                                   epsilons={int(c): p["epsilon"] for c, p in per_client.items()},
                                   closest_png=args.out / f"closest_{system.name}.png",
                                   title=f"{system.name}: received image (top) and nearest private record")
            eps = (methods[system.name]["privacy"] or {}).get("epsilon_spent_max")
            leakage["epsilon_spent"] = eps
            leakage["canary_bound_exceeds_epsilon"] = warn_if_bound_exceeds(system.name, leakage, eps)
            methods[system.name]["leakage"] = leakage
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "title": f"feddistill compare: {', '.join(s.name for s in systems)} ({cfg.dataset}, "
                 f"{cfg.partition.num_partitions} clients, {describe(cfg.partition)}, "
                 f"method {cfg.distill.method}, ipc {cfg.distill.ipc}, width {cfg.distill.model.width})",
        "config": recorded_config(args.preset, cfg),
        "audit": {**asdict(budget), "canary_kind": CANARY_KIND, "canary_beta": CANARY_BETA},
        "environment": environment(cfg.distill.device),
        "resources": {"wall_seconds": usage.seconds, "peak_rss_mb": usage.peak_rss_mb,
                      "note": "whole simulation: driver plus Ray processes, RSS summed, sampled every 0.5 s"},
        "methods": methods,
        "verdicts": verdicts(methods, cfg.distill.ipc, len(splits.test)) + leakage_verdicts(methods),
        "reference": reference_accuracies(args.reference),
    }
    from ddcore.plots import plot_summary
    from server.report import write_report

    write_report(args.out, report)
    for name in ("distill", "statistics", "random_real", "collaborative"):
        if name in results and results[name].pooled is not None and len(results[name].pooled) > 0:
            plot_summary(results[name].pooled, splits.test, args.out / f"pooled_{name}.png")
    from server.report import markdown

    print(markdown(report))
    print(f"report: {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
