"""Tune DP-FedAvg's local DP-SGD on a validation split carved from the training data (never the test split).

    python -m simulations.tune_dp_fedavg --preset fmnist --epsilon 4 \\
        --grid "local-lr=0.05,0.2 max-grad-norm=0.1,1 local-batch-size=256" --out runs/tune

The training split loses ``--validation`` records (a seeded random draw) to the validation set;
the rest is partitioned among the clients exactly as the run-config says (``num-clients``,
``partition``, ``alpha``, ``seed``). Every point of the grid (the Cartesian product of the
listed values of any run-config keys: ``local-lr``, ``local-batch-size`` (the Poisson rate is
batch / n), ``local-epochs``, ``fedavg-rounds``, ``max-grad-norm``, ...) runs the whole
DP-FedAvg recipe at ``--epsilon`` per client (:func:`simulations.recipes.fedavg_recipe`: the
clients' own update code, every client in every round, averaged by example counts as Flower's
FedAvg does; in one process, without a Flower simulation) and is scored on the validation
set. Momentum is the recipe's constant (0.9). A model that trains only its head (``model=scatter``,
no local augmentation) has the clients' records embedded once for the whole grid
(:mod:`ddcore.frozen`). Writes report.json and report.md (points
sorted by validation accuracy) into --out; the test split is never touched.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

from ddcore.errors import ConfigError
from ddcore.files import environment
from ddcore.partition import describe, partition_indices
from ddcore.runconfig import KEYS, RunConfig, from_flat, run_splits
from ddcore.settings import add_settings, settings_from_args
from simulations.common import check_dp_clients, fail, recorded_config, write_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.tune_dp_fedavg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder for the report")
    parser.add_argument("--epsilon", type=float, default=4.0,
                        help="target epsilon per client (inf = no noise)")
    parser.add_argument("--grid", required=True,
                        help='space-separated KEY=V1,V2,... of run-config keys, e.g. "local-lr=0.05,0.2 '
                             'max-grad-norm=0.1,1"')
    parser.add_argument("--plain", action="store_true",
                        help="tune plain FedAvg (no DP-SGD, --epsilon ignored): e.g. whether its local "
                             "epochs augment (train-dsa-strategy=auto,none)")
    parser.add_argument("--validation", type=int, default=6000,
                        help="training records held out to score the points (default 6000)")
    add_settings(parser, DATA_FLAGS, preset="fmnist")
    return parser


# the flags that define the clients' data: fixed for a whole grid (the validation split and the
# partitions are carved once), so they are flags (or --set), never grid axes
DATA_FLAGS = ("dataset", "data-dir", "num-clients", "partition", "alpha", "classes-per-client", "seed")


def parse_grid(text: str) -> list[dict[str, str]]:
    """``"a=1,2 b=x"`` -> [{"a": "1", "b": "x"}, {"a": "2", "b": "x"}] (keys must be run-config keys)."""
    axes: dict[str, list[str]] = {}
    for item in text.split():
        key, sep, values = item.partition("=")
        if not sep or not values or key in axes:
            raise ConfigError(f"--grid takes distinct KEY=V1,V2,... items, got {item!r}")
        if key not in KEYS:
            raise ConfigError(f"--grid: {key!r} is no run-config key")
        if key in DATA_FLAGS or key in ("normalisation", "canaries"):
            raise ConfigError(f"--grid: {key!r} defines the clients' data, which one grid shares; "
                              f"give it as --{key} (or --set {key}=...), not as a grid axis")
        axes[key] = [v for v in values.split(",") if v]
    if not axes:
        raise ConfigError("--grid is empty")
    return [dict(zip(axes, point, strict=True)) for point in itertools.product(*axes.values())]


def carve(cfg: RunConfig, validation: int):
    """(clients' training sets, validation set): ``validation`` seeded records off the training split."""
    splits = run_splits(cfg)
    n = len(splits.train)
    if not 0 < validation < n:
        raise ConfigError(f"--validation must be in 1..{n - 1} for {cfg.dataset}, got {validation}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.partition.seed + 31))
    val, rest = splits.train.subset(order[:validation]), splits.train.subset(order[validation:])
    parts = partition_indices(rest.y.numpy(), cfg.partition)
    if any(len(p) == 0 for p in parts):
        raise ConfigError("a client received no examples; use fewer clients or a larger alpha")
    return [rest.subset(torch.as_tensor(p)) for p in parts], val


def markdown(report: dict) -> str:
    keys = list(report["rows"][0]["point"]) if report["rows"] else []
    head = ["rank", *keys, "val acc (%)", "eps spent", "sigma", "q", "steps", "seconds"]
    lines = [f"# {report['title']}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for i, r in enumerate(report["rows"], 1):
        cells = [str(i), *[r["point"][k] for k in keys], f"{100 * r['val_accuracy']:.2f}",
                 "inf" if math.isinf(r["epsilon_spent"]) else f"{r['epsilon_spent']:.3f}",
                 f"{r['noise_multiplier']:.3f}", f"{r['sample_rate']:.4f}", str(r["steps"]),
                 f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Validation: {report['validation']} records held out of the training split; clients: the "
              f"rest, partitioned as the run-config says; {report['points_done']} points measured. "
              f"eps spent, sigma, q and steps are those of the "
              f"smallest client (the largest Poisson rate). Whole run: {report['seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        points = parse_grid(args.grid)
        dp = {"dp": False} if args.plain else {"dp": True, "target-epsilon": args.epsilon}
        cfg = from_flat(dp, base=settings_from_args(args, DATA_FLAGS))
        configs = [from_flat(point, base=cfg) for point in points]
        clients, val = carve(cfg, args.validation)
        for point, c in zip(points, configs, strict=True):
            if not args.plain:
                check_dp_clients(str(point), c, [len(part) for part in clients])
    except ValueError as exc:
        return fail(exc)
    from tqdm import tqdm

    from ddcore.frozen import FeatureCache
    from ddcore.train import evaluate
    from privacy.dpsgd import fedavg_dpsgd_plan
    from simulations.recipes import fedavg_recipe

    rows: list[dict] = []
    features = FeatureCache(capacity=len(clients))  # a head-only model embeds the records once per grid
    start = time.perf_counter()
    part = cfg.partition

    def report() -> dict:
        ranked = sorted(rows, key=lambda r: -r["val_accuracy"])
        what = ("FedAvg tuning (no DP)" if args.plain
                else f"DP-FedAvg tuning at epsilon {args.epsilon:g} per client")
        return {"title": f"{what} ({cfg.dataset}, "
                         f"{part.num_partitions} clients, {describe(part)})",
                "config": recorded_config(args.preset, cfg), "grid": args.grid, "validation": len(val),
                "points_done": f"{len(rows)} of {len(points)}",
                "environment": environment(cfg.distill.device),
                "rows": ranked, "best": ranked[0]["point"], "seconds": time.perf_counter() - start}

    from ddcore.files import atomic_write

    for point, c in tqdm(list(zip(points, configs, strict=True)), desc="grid", unit="point", file=sys.stderr):
        t = time.perf_counter()
        out = fedavg_recipe(c, features)(clients, torch.Generator().manual_seed(c.partition.seed))
        row = {"point": point, "val_accuracy": evaluate(out.model, val)["accuracy"],
               "epsilon_spent": math.inf, "noise_multiplier": 0.0, "sample_rate": 0.0, "steps": 0,
               "seconds": time.perf_counter() - t}
        if not args.plain:
            plans = [fedavg_dpsgd_plan(c, len(part)) for part in clients]
            worst = max(plans, key=lambda p: p.sample_rate)  # the smallest client
            row.update(epsilon_spent=out.eps_spent, noise_multiplier=worst.noise_multiplier,
                       sample_rate=worst.sample_rate, steps=worst.steps)
        rows.append(row)
        print(f"{point}: validation {100 * rows[-1]['val_accuracy']:.2f}%", file=sys.stderr)
        if len(rows) < len(points):  # a long grid keeps what it measured if it is stopped
            partial = report()
            atomic_write(args.out / "report.json", json.dumps(partial, indent=2, default=str).encode())
            atomic_write(args.out / "report.md", markdown(partial).encode())
    write_report(args.out, report(), markdown, lambda report, out: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
