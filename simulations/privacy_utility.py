"""Privacy vs utility: DP distillation (gradient and distribution matching) and DP-FedAvg per epsilon.

    python -m simulations.privacy_utility --epsilons 1,2,4,8,inf --out runs/privacy

For each method (``--methods``: gm, dm, statistics, fedavg, fedavg-scatter, ...; default
gm,dm,fedavg) the sweep runs its non-DP version and its DP version at every target epsilon (per
client, over the whole run; ``inf`` = the DP code path with clipping but no noise), all on the
same partitions in one Flower simulation. Every
finished system is then audited: membership inference on its global model (loss threshold;
LiRA with shadow models for the FedAvg rows), memorisation of its pooled summary, a one-run
canary audit (an epsilon lower bound beside the accountant's epsilon), and gradient inversion
of a FedAvg client update with and without DP. The audit sizes follow --preset
(simulations.common.AUDIT_BUDGETS). Writes report.json, report.md and plots into --out.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ddcore.data import DataSplits
from ddcore.errors import ConfigError
from ddcore.files import environment
from ddcore.partition import describe, partition_indices
from ddcore.profile import measure_tree
from ddcore.runconfig import RunConfig, from_flat
from ddcore.settings import given, parse_set
from privacy.attacks.canary import Canaries
from privacy.audit import CANARY_BETA, CANARY_KIND, run_canaries
from server.report import canary_bound_cell, canary_guesses_cell, canary_note, dp_bound_cell, near_copies_cell
from simulations.common import (
    RUN_FLAGS,
    STATISTICS_RIDGE,
    AuditBudget,
    System,
    add_audit_flags,
    add_run_flags,
    audit_budget,
    check_dp_clients,
    check_partitions,
    check_systems,
    fail,
    recorded_config,
    run_config,
    run_in_simulation,
    warn_if_bound_exceeds,
    with_canaries,
    write_report,
)

METHODS = ("gm", "gm-psg", "dm", "statistics", "statistics-ridge", "statistics-ridge-secagg", "fedavg",
           "fedavg-scatter")
# the weight-averaging methods (system kind "fedavg"), each with its own network and tuned local DP-SGD
FEDAVG_METHODS = ("fedavg", "fedavg-scatter")
# DP gradient matching as PSG (Chen, Kerkouche & Fritz, NeurIPS 2022) runs it: clip 0.1, a small
# Poisson rate (PSG: 256 of 60,000 records per step; 3 per class is 30 of a ~6,000-record client),
# many noisy releases and image step 0.1. PSG runs 10^4-10^5 releases on a GPU; 2 CPU cores
# afford 1,000 per client here.
PSG_SETTINGS: dict[str, str | int | float] = {"method": "gm", "max-grad-norm": 0.1, "batch-real": 3,
                                              "iterations": 1000, "lr-images": 0.1, "outer-loop": 10}
# the run-config keys that make each method's system
METHOD_SETTINGS: dict[str, dict[str, str | int | float]] = {
    "gm": {"method": "gm"}, "gm-psg": PSG_SETTINGS, "dm": {"method": "dm"},
    "statistics": {"summary-kind": "statistics"}, "statistics-ridge": STATISTICS_RIDGE,
    # the same through Flower's SecAgg+: the server sees the sum alone, each client adds its share of
    # one aggregate noise (distributed DP; privacy.secure_sum)
    "statistics-ridge-secagg": {**STATISTICS_RIDGE, "secure-aggregation": True}, "fedavg": {},
    # DP-FedAvg on the statistics system's own features: ScatterNet + frozen projection to 384 dims +
    # a linear head, the only part that trains (Tramer & Boneh, ICLR 2021); clients embed their records
    # once (ddcore.frozen), which needs no local augmentation
    "fedavg-scatter": {"model": "scatter", "model-width": 384, "local-dsa-strategy": "none",
                       "train-dsa-strategy": "none"},
}
DEFAULT_METHODS = ("gm", "dm", "fedavg")
# What the sweep changes in a preset (under the command line's flags and --set), and its default
# methods there. On the full Fashion-MNIST one DP-GM or pooled DP-DM row costs 5-10 minutes of
# client work on 2 cores, so the hour holds the server-summed statistics and DP-FedAvg at every
# epsilon (gm and dm can be asked for).
SWEEP_SETTINGS: dict[str, dict[str, str | int | float]] = {}
SWEEP_METHODS: dict[str, tuple[str, ...]] = {"fmnist": ("statistics", "fedavg")}
# Every FedAvg row of a preset, plain and DP alike (the other systems keep the ConvNet): on
# Fashion-MNIST the DP-SGD literature's tanh CNN (ddcore.models.DPCNN; a DP-SGD step over 256
# images takes 0.06 s against 0.22 s for ConvNet-32) without augmentation, 20 rounds of 1 local
# epoch. Plain FedAvg trains the same network, so the epsilon = inf row has its non-DP counterpart.
FEDAVG_SETTINGS: dict[str, dict[str, str | int | float]] = {
    "fmnist": {"model": "dpcnn", "train-dsa-strategy": "none", "fedavg-rounds": 20},
}
# DP-FedAvg's local DP-SGD (every DP-FedAvg row, the noise-free one too), chosen on a validation
# split carved from the training data (python -m simulations.tune_dp_fedavg; README "A fair
# DP-FedAvg"); --dp-fedavg-set overrides. Presets without an entry use plain FedAvg's local recipe.
DP_FEDAVG_SETTINGS: dict[str, dict[str, str | int | float]] = {
    # at epsilon 4 with the FEDAVG_SETTINGS above, Dirichlet 0.5: validation 81.6% at 20 rounds,
    # 79.4% at 10; at 10 rounds clip 0.1 gave 73.8% (lr 4) and 67.1% (lr 0.4), lr 0.8 76.6% and
    # lr 4 60.0% at clip 1 (README "A fair DP-FedAvg")
    "fmnist": {"local-batch-size": 256, "max-grad-norm": 1.0, "local-lr": 0.4},
}
# What the epsilon = inf DP-FedAvg row (clipping, no noise) changes on top, tuned the same way at
# epsilon = inf: without noise, smaller Poisson batches (more clipped steps per round) win, as
# the literature tunes each budget apart; the finite rows keep the settings above.
DP_FEDAVG_NO_NOISE_SETTINGS: dict[str, dict[str, str | int | float]] = {
    # at epsilon = inf, 20 rounds, clip 1 (README "A fair DP-FedAvg"): validation 86.25% at
    # batch 64 / lr 0.4, 83.72% at batch 64 / lr 1.6
    "fmnist": {"local-batch-size": 64, "local-lr": 0.4},
}
# The same three tables for method fedavg-scatter (its network is METHOD_SETTINGS'), chosen alike on a
# validation split (python -m simulations.tune_dp_fedavg --preset fmnist --set model=scatter
# model-width=384 local-dsa-strategy=none ...; Dirichlet 0.5, 10 clients;
# docs/results/tune_dp_fedavg_scatter). Every row: 20 rounds of 1 local epoch; plain FedAvg's local
# SGD at lr 0.1, batch 32 (no DP: validation 80.98%, against 77.98% at lr 0.01 and 77.47% at lr 0.5).
SCATTER_FEDAVG_SETTINGS: dict[str, dict[str, str | int | float]] = {
    "fmnist": {"fedavg-rounds": 20, "local-lr": 0.1, "local-batch-size": 32},
}
SCATTER_DP_FEDAVG_SETTINGS: dict[str, dict[str, str | int | float]] = {
    # at epsilon 1: validation 80.22% at batch 256 / clip 1 / lr 0.5 (lr 1 the same, lr 2 79.58%; at 10
    # rounds 77.98%, 79.23% and 79.62%); batch 1024: 80.10% at lr 4 (79.28% lr 2, 77.22% lr 8); batch 128:
    # 79.55% at lr 0.5, 77.43% at lr 1; clip 0.3 (lr 1): 76.03%; 2 local epochs: 77.48% (clip 0.3: 76.82%).
    # At epsilon 0.5: lr 0.5 79.58%, lr 1 79.00%.
    "fmnist": {"local-batch-size": 256, "max-grad-norm": 1.0, "local-lr": 0.5},
}
SCATTER_DP_FEDAVG_NO_NOISE_SETTINGS: dict[str, dict[str, str | int | float]] = {
    # nothing on top: at epsilon = inf the finite rows' point gives 80.42% (lr 1: 80.43%; batch 64 at
    # lr 1: 77.88%) - without noise the linear head on these features tops out where DP leaves it
    "fmnist": {},
}
# each FedAvg method's tables: (every row, the DP rows on top, the epsilon = inf DP row on top of those)
FEDAVG_TABLES = {
    "fedavg": (FEDAVG_SETTINGS, DP_FEDAVG_SETTINGS, DP_FEDAVG_NO_NOISE_SETTINGS),
    "fedavg-scatter": (SCATTER_FEDAVG_SETTINGS, SCATTER_DP_FEDAVG_SETTINGS,
                       SCATTER_DP_FEDAVG_NO_NOISE_SETTINGS),
}


@dataclass(frozen=True)
class FedAvgSettings:
    """The flat run-config keys of one FedAvg method's rows in a sweep."""

    rows: Mapping[str, str | int | float] = field(default_factory=dict)  # every row, plain and DP
    dp: Mapping[str, str | int | float] = field(default_factory=dict)  # every DP row, on top (local DP-SGD)
    no_noise: Mapping[str, str | int | float] = field(default_factory=dict)  # the eps = inf DP row, on top


def fedavg_settings(method: str, preset: str, chosen: Mapping, dp_overrides: Mapping) -> FedAvgSettings:
    """``method``'s settings in ``preset`` (:data:`FEDAVG_TABLES`): the command line's ``chosen`` keys beat
    its rows' settings, and ``dp_overrides`` (--dp-fedavg-set) beat its DP rows' and no-noise settings."""
    rows, dp, no_noise = (table.get(preset, {}) for table in FEDAVG_TABLES[method])
    return FedAvgSettings(rows={k: v for k, v in rows.items() if k not in chosen}, dp={**dp, **dp_overrides},
                          no_noise={k: v for k, v in no_noise.items() if k not in dp_overrides})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.privacy_utility", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder for the report")
    parser.add_argument("--epsilons", default="1,2,4,8,inf",
                        help="target epsilons per client, comma-separated; inf = DP path without noise")
    parser.add_argument("--methods", default=None,
                        help="gm, gm-psg (DP gradient matching with PSG's settings, PSG_SETTINGS), dm (DP "
                             "distillation, summaries pooled), statistics (per-class statistics "
                             "released once per client, summed and distilled by the server), fedavg "
                             "(DP-FedAvg, the preset's network) and/or fedavg-scatter (DP-FedAvg of "
                             f"ScatterNet + linear); default {','.join(DEFAULT_METHODS)}, with --preset "
                             f"fmnist {','.join(SWEEP_METHODS['fmnist'])}")
    parser.add_argument("--dp-fedavg-set", nargs="+", default=[], action="extend", metavar="KEY=VALUE",
                        help="run-config keys of the DP-FedAvg rows only (their local DP-SGD: local-lr, "
                             "local-batch-size, max-grad-norm, ...) of every FedAvg method, over the "
                             "preset's tuned values (DP_FEDAVG_SETTINGS, SCATTER_DP_FEDAVG_SETTINGS)")
    add_audit_flags(parser, ("audit-samples", "lira-shadows", "inversion-steps", "canaries"))
    add_run_flags(parser, preset="privacy")
    return parser


def parse_epsilons(text: str) -> list[float]:
    """``"1,2,inf"`` -> [1.0, 2.0, inf]; every value must be > 0."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--epsilons takes numbers > 0 or inf separated by commas, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise ConfigError(f"--epsilons must all be > 0 (inf = no noise), got {text!r}")
    return sorted(set(values))


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ConfigError(f"unknown --methods {unknown or text!r}; known: {', '.join(METHODS)}")
    return methods


def dp_config(cfg: RunConfig, epsilon: float) -> RunConfig:
    """``cfg`` with DP on at ``epsilon``; DP distillation starts from noise."""
    return from_flat({"dp": True, "target-epsilon": epsilon, "init": "noise"}, base=cfg)


def plan_systems(cfg: RunConfig, methods: list[str], epsilons: list[float],
                 tuned: Mapping[str, FedAvgSettings] | None = None) -> list[tuple[dict, System]]:
    """A row description and a system for every method and epsilon (non-DP first).

    ``tuned``: per method, the flat keys set on its rows on top of its METHOD_SETTINGS
    (:class:`FedAvgSettings`: every row's, e.g. the network and the rounds; every DP row's, its
    tuned local DP-SGD; the epsilon = inf DP row's on top of those). Methods without an entry
    keep the run's settings.
    """
    plain = from_flat({"dp": False}, base=cfg)
    out = []
    for method in methods:
        kind = "fedavg" if method in FEDAVG_METHODS else "distill"
        own = (tuned or {}).get(method, FedAvgSettings())
        base = from_flat({**METHOD_SETTINGS[method], **own.rows}, base=plain)
        out.append(({"method": method, "dp": False, "epsilon_target": None}, System(method, kind, base)))
        dp_base = from_flat(own.dp, base=base) if own.dp else base
        for eps in epsilons:
            name = f"dp-{method}@eps={eps:g}"
            eps_base = dp_base
            if math.isinf(eps) and own.no_noise:
                eps_base = from_flat(own.no_noise, base=dp_base)
            out.append(({"method": f"dp-{method}", "dp": True, "epsilon_target": eps},
                        System(name, kind, dp_config(eps_base, eps))))
    return out


def check_budgets(splits: DataSplits, systems: list[tuple[dict, System]],
                  canaries: Canaries | None = None) -> None:
    """Check every DP system's budget against every client now, so bad budgets fail before any run.

    The cheap checks (epsilon > 0, delta in (0, 1) and below 1/n, the clip norm, epsilon above
    what the accountant can certify at that delta) run here; the clients calibrate sigma. A
    client's n counts the ``canaries`` it will hold.
    """
    sizes = None
    for row, system in systems:
        if not row["dp"]:
            continue
        if sizes is None:
            parts = partition_indices(splits.train.y.numpy(), system.cfg.partition)
            sizes = [len(part) + (len(canaries.inserted(pid, len(parts))) if canaries is not None else 0)
                     for pid, part in enumerate(parts)]
        check_dp_clients(system.name, system.cfg, sizes)


def privacy_columns(privacy: dict | None) -> dict:
    """epsilon spent (worst client) and what its accountant composed."""
    if privacy is None:
        return {"epsilon_spent": None, "delta": None, "noise_multiplier": None, "sample_rate": None,
                "steps": None}
    worst = max(privacy["per_client"].values(), key=lambda p: p["epsilon"])
    sigmas = [p["noise-multiplier"] for p in privacy["per_client"].values()]
    return {"epsilon_spent": privacy["epsilon_spent_max"], "delta": worst["delta"],
            "noise_multiplier": worst["noise-multiplier"], "sample_rate": worst["sample-rate"],
            "steps": int(worst["steps"]), "noise_multiplier_range": [min(sigmas), max(sigmas)],
            "per_client": privacy["per_client"]}


def audit_row(row: dict, system: System, result, splits: DataSplits, members, nonmembers,
              budget: AuditBudget, canaries: Canaries | None = None) -> dict:
    """Accuracy, bytes, privacy spent and the leakage audits of one finished system.

    ``canary_bound_exceeds_epsilon`` is True (and stderr says so) when the canary audit's
    lower bound is above the accountant's epsilon: a DP bug, not a result.
    """
    from privacy.audit import audit_system

    m = result.to_dict()
    per_client = (m["privacy"] or {}).get("per_client", {})
    out = {**row, "system": system.name, "accuracy": m["final_accuracy"],
           "best_accuracy": m["best_accuracy"], "bytes_up": m["bytes_up"], "bytes_down": m["bytes_down"],
           "wall_seconds": m["wall_seconds"], **privacy_columns(m["privacy"]),
           **audit_system(system.cfg, system.kind, result.final_state, result.pooled, splits, members,
                          nonmembers, lira_shadows=budget.lira_shadows,
                          memorisation_reference=budget.memorisation_reference, canaries=canaries,
                          received=result.received,
                          epsilons={int(c): p["epsilon"] for c, p in per_client.items()}),
           "clients_failed": [c for c in m["clients"] if c["status"] in ("failed", "rejected")]}
    out["canary_bound_exceeds_epsilon"] = warn_if_bound_exceeds(system.name, out, out["epsilon_spent"])
    return out


def inversion_section(cfg: RunConfig, splits: DataSplits, epsilons: list[float], out: Path,
                      steps: int, restarts: int = 2) -> list[dict]:
    """Inverting Gradients on client 0's FedAvg update (batch 1 and 8), without DP and at the smallest
    finite epsilon (sigma as client 0's DP-FedAvg plan has it)."""
    from privacy.audit import inversion_audit
    from privacy.dpsgd import fedavg_dpsgd_plan

    part = partition_indices(splits.train.y.numpy(), cfg.partition)[0]
    data = splits.train.subset(torch.as_tensor(part))
    finite = [e for e in epsilons if math.isfinite(e)]
    cases: list[tuple[str, float | None]] = [("no DP", None)] + ([("DP", min(finite))] if finite else [])
    results = []
    for label, eps in cases:
        sigma, clip = 0.0, None
        if eps is not None:
            plan = fedavg_dpsgd_plan(dp_config(cfg, eps), len(data))
            sigma, clip = plan.noise_multiplier, plan.max_grad_norm
        for batch in (1, 8):
            tag = "nodp" if eps is None else f"dp_eps{eps:g}"
            png = out / f"inversion_{tag}_b{batch}.png"
            how = "no DP" if eps is None else f"DP-SGD eps={eps:g} (sigma {sigma:.2f}, C {clip:g})"
            title = f"client 0 update, batch {batch}, {how}"
            r = inversion_audit(cfg, data, batch_size=batch, noise_multiplier=sigma, max_grad_norm=clip,
                                steps=steps, restarts=restarts, seed=cfg.partition.seed, png=png, title=title)
            results.append({"case": label, "epsilon_target": eps, **r})
    return results


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.{digits}f}"
    return str(x)


def _row_cells(r: dict) -> list[str]:
    lira = r.get("lira") or {}
    return [r["method"], "non-DP" if r["epsilon_target"] is None else f"{r['epsilon_target']:g}",
            _fmt(r["epsilon_spent"], 2), _fmt(r["noise_multiplier"], 2), _fmt(r["sample_rate"], 3),
            _fmt(r["steps"]), "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}",
            f"{r['bytes_up'] / 2**20:.2f}", _fmt(r["mia_auc"]), _fmt(r["mia_tpr_at_1pct_fpr"]),
            _fmt(r["mia_tpr_at_0.1pct_fpr"]), _fmt(lira.get("auc")), _fmt(lira.get("tpr_at_1pct_fpr")),
            _fmt(r["memorisation_closer_to_private"], 2), near_copies_cell(r.get("server_view")),
            (r.get("server_view") or {}).get("kind", "-"), _fmt((r.get("server_view") or {}).get("auc")),
            _fmt(r.get("server_view_tpr_at_0.1pct_fpr")), dp_bound_cell(r.get("server_view")),
            canary_bound_cell(r), canary_guesses_cell(r)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(header) - 1)
    return ["| " + " | ".join(cells) + " |" for cells in (header, align, *rows)]


def markdown(report: dict) -> str:
    """The privacy-utility table, the inversion results, and how they were made."""
    audit = report["audit"]
    header = ["method", "eps target", "eps spent", "sigma", "q", "steps", "acc (%)", "up (MiB)", "MIA AUC",
              "TPR@1%", "TPR@0.1%", "LiRA AUC", "LiRA TPR@1%", "closer to private", "near-copies sent",
              "server view", "server-view AUC", "server-view TPR@0.1%", "DP bound", "eps lower bound",
              "canary guesses (right)"]
    lines = [f"# {report['title']}", "", *_table(header, [_row_cells(r) for r in report["rows"]]), "",
             "eps spent, sigma, q and steps are those of the client whose accountant reports the largest "
             "epsilon (every client's are in report.json). MIA: loss-threshold attack on the final global "
             f"model, {audit['members']} members (clients' training examples) vs {audit['nonmembers']} "
             f"held-out examples; LiRA (FedAvg rows) with {audit['lira_shadows']} shadow models trained by a "
             "centralised proxy of the FedAvg recipe. 'closer to private': fraction of pooled synthetic "
             "images whose nearest private image is nearer (L2) than their nearest held-out image "
             "(0.5 = no sign of memorisation). Server view: the attack on what the server received from "
             "the clients - statistics: the tracing attack on each client's release, the most exposed "
             "client; weights: the loss change of each client's update (rounds 1 and last), the most exposed "
             "client; images: minus the distance to the nearest received image. DP bound: every ROC point of "
             "that attack under e^eps FPR + delta with the client's epsilon (Clopper-Pearson, 95%).", "",
             canary_note(report["rows"][0], audit.get("canary_beta"))]
    if report["inversion"]:
        rows = [[r["case"] + ("" if r["epsilon_target"] is None else f" eps={r['epsilon_target']:g}"),
                 str(r["batch_size"]), _fmt(r["noise_multiplier"], 2), f"{r['psnr']:.1f}", f"{r['ssim']:.2f}",
                 f"{r['random_psnr']:.1f}", r["png"]] for r in report["inversion"]]
        lines += ["", "## Gradient inversion of a FedAvg client update (client 0, initial global model)", "",
                  *_table(["case", "batch", "sigma", "PSNR (dB)", "SSIM", "random PSNR", "image"], rows)]
    res = report["resources"]
    lines += ["", f"Whole run: {res['wall_seconds'] / 60:.1f} min wall, peak memory "
              f"{res['peak_rss_mb']:.0f} MiB (driver plus Ray processes). Audits: "
              f"{audit['seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


# published reference points (central DP-SGD on all 60,000 records, not federated) drawn on the
# accuracy plot: Tramer & Boneh, "Differentially Private Learning Needs Better Features", ICLR 2021
ANCHORS: dict[str, list[tuple[str, float, float]]] = {
    "fashion-mnist": [("Tramer & Boneh: CNN, central", 3.0, 86.0),
                      ("Tramer & Boneh: ScatterNet+linear, central", 3.0, 89.7)],
}


def plot(report: dict, out: Path) -> None:
    """accuracy_vs_epsilon.png and mia_vs_epsilon.png (inf drawn right of the largest finite epsilon)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["epsilon_target"] for r in report["rows"] if r["epsilon_target"] not in (None, math.inf)]
    inf_x = 2 * max(finite) if finite else 1.0
    bases = sorted({r["method"].removeprefix("dp-") for r in report["rows"]})
    for key, fname, ylabel in (("accuracy", "accuracy_vs_epsilon.png", "test accuracy (%)"),
                               ("mia_tpr_at_1pct_fpr", "mia_vs_epsilon.png", "MIA TPR at 1% FPR (%)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for base, color in zip(bases, [f"C{i}" for i in range(len(bases))], strict=True):
            dp_rows = [r for r in report["rows"] if r["method"] == f"dp-{base}" and r[key] is not None
                       and not r.get("canary_bound_exceeds_epsilon")]  # a DP bug is not a result
            xs = [inf_x if math.isinf(r["epsilon_target"]) else r["epsilon_target"] for r in dp_rows]
            ax.plot(xs, [100 * r[key] for r in dp_rows], "o-", color=color, label=f"dp-{base}")
            plain = [r for r in report["rows"] if r["method"] == base and r[key] is not None]
            if plain:
                ax.axhline(100 * plain[0][key], color=color, ls="--", lw=1, label=f"{base} (non-DP)")
        if key == "accuracy":
            for label, eps, acc in ANCHORS.get(report["config"]["dataset"], []):
                ax.plot([eps], [acc], "k*", ms=9)
                ax.annotate(label, (eps, acc), fontsize=6, xytext=(4, -9), textcoords="offset points")
        ax.set_xscale("log")
        ticks = sorted(set(finite)) + ([inf_x] if any(math.isinf(r["epsilon_target"] or 0)
                                                      for r in report["rows"]) else [])
        ax.set_xticks(ticks, [("inf" if t == inf_x else f"{t:g}") for t in ticks])
        ax.set_xlabel("target epsilon per client")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        epsilons = parse_epsilons(args.epsilons)
        methods = parse_methods(args.methods or ",".join(SWEEP_METHODS.get(args.preset, DEFAULT_METHODS)))
        budget = audit_budget(args)
        if budget.samples < 1:
            raise ConfigError(f"--audit-samples must be >= 1 here (every row is audited), "
                              f"got {budget.samples}")
        cfg = with_canaries(args, run_config(args, SWEEP_SETTINGS.get(args.preset)), budget)
        dp_overrides = parse_set(args.dp_fedavg_set)
        splits = check_partitions(cfg)
        canaries = run_canaries(cfg, splits)
        chosen = given(args, RUN_FLAGS)  # the command line beats the preset's FedAvg settings
        tuned = {m: fedavg_settings(m, args.preset, chosen, dp_overrides)
                 for m in methods if m in FEDAVG_METHODS}
        planned = plan_systems(cfg, methods, epsilons, tuned)
        check_systems([s for _, s in planned])
        check_budgets(splits, planned, canaries)
    except ValueError as exc:
        return fail(exc)
    from privacy.audit import audit_samples

    with measure_tree() as usage:
        results = run_in_simulation(cfg, splits.test, [s for _, s in planned])
    start = time.perf_counter()
    members, nonmembers = audit_samples(splits, budget.samples, seed=cfg.partition.seed)
    from tqdm import tqdm

    rows = [audit_row(row, s, results[s.name], splits, members, nonmembers, budget, canaries)
            for row, s in tqdm(planned, desc="audits", unit="system", file=sys.stderr, dynamic_ncols=True)]
    args.out.mkdir(parents=True, exist_ok=True)
    inversion = []
    if budget.inversion_steps:
        inversion = inversion_section(cfg, splits, epsilons, args.out, budget.inversion_steps,
                                      budget.inversion_restarts)
    report = {
        "title": f"feddistill privacy vs utility ({cfg.dataset}, {cfg.partition.num_partitions} clients, "
                 f"{describe(cfg.partition)})",
        "config": recorded_config(args.preset, cfg), "environment": environment(cfg.distill.device),
        "epsilons": epsilons, "methods": methods,
        "dp_fedavg_settings": {m: dict(t.dp) for m, t in tuned.items()},
        "dp_fedavg_no_noise_settings": {m: dict(t.no_noise) for m, t in tuned.items()},
        "audit": {"members": len(members), "nonmembers": len(nonmembers), **asdict(budget),
                  "canary_kind": CANARY_KIND, "canary_beta": CANARY_BETA,
                  "canary_violations": [r["system"] for r in rows if r["canary_bound_exceeds_epsilon"]],
                  "seconds": time.perf_counter() - start},
        "resources": {"wall_seconds": usage.seconds, "peak_rss_mb": usage.peak_rss_mb},
        "rows": rows, "inversion": inversion,
    }
    write_report(args.out, report, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
