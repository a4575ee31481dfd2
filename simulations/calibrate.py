"""Check the instrument: random real images and the whole training set beside the published figures.

Every model this project judges (a summary's evaluation, the server's global model, FedAvg's local
epochs) is trained by ``ddcore.train.train_model`` with the run's ``TrainConfig``. This driver trains
it on random real images at each IPC and on the whole training set, for each ConvNet width and
seed, and prints the means beside the figures published for the same baselines
(DatasetCondensation's README: ConvNet-128, 1,000 epochs on a GPU). A distillation figure is only
worth quoting beside a calibrated baseline.

``--split validation`` scores on a seeded, stratified validation split carved from the training
data instead of the test split (``ddcore.data.validation_split``); with ``--grid KEY=V1,V2`` it
compares training recipes there, which is how the presets' recipes are chosen::

    python -m simulations.calibrate --dataset fashion-mnist --out runs/calibrate_fmnist
    python -m simulations.calibrate --dataset fashion-mnist --split validation \\
        --grid train-dsa-mode=one,all train-dsa-strategy=auto,none --widths 32 --out runs/recipe
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ddcore.config import TrainConfig
from ddcore.data import Dataset, DataSplits, validation_split
from ddcore.errors import ConfigError
from ddcore.methods import METHODS
from ddcore.methods.base import check_ipc
from ddcore.models import model_factory
from ddcore.runconfig import KEYS, RunConfig, from_flat, run_splits, to_flat
from ddcore.settings import add_settings, settings_from_args
from ddcore.train import num_steps, train_and_evaluate
from simulations.common import fail, write_report

# Published test accuracy (%) of the same baselines, ConvNet-128 (DatasetCondensation README,
# "random" rows of its IPC table and "whole dataset"); mnist5k is a 4,000-image subset of MNIST,
# so its whole-set row is not comparable with MNIST's and is shown for orientation only.
PUBLISHED: dict[str, dict[str, float]] = {
    "fashion-mnist": {"ipc 1": 51.4, "ipc 10": 73.8, "ipc 50": 82.5, "whole": 93.5},
    "mnist": {"ipc 1": 64.9, "ipc 10": 95.1, "ipc 50": 97.9, "whole": 99.6},
    "mnist5k": {"ipc 1": 64.9, "ipc 10": 95.1, "ipc 50": 97.9, "whole": 99.6},
}
FLAGS = {"dataset": "dataset", "data-dir": "data-dir", "device": "device", "normalisation": "normalisation"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings(parser, FLAGS)
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json, report.md, plot")
    parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 10, 50], help="random real IPCs")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 128], help="ConvNet widths")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row (images and initialisation)")
    parser.add_argument("--whole-epochs", type=int, default=5,
                        help="epochs on the whole training set (0 = skip the whole-set rows)")
    parser.add_argument("--whole-seeds", type=int, default=0,
                        help="seeds of the whole-set rows (0 = --seeds)")
    parser.add_argument("--whole-widths", type=int, nargs="*", default=[32],
                        help="widths of the whole-set rows (ConvNet-128 takes ~4 min an epoch of "
                             "Fashion-MNIST on 2 CPU cores)")
    parser.add_argument("--split", choices=("test", "validation"), default="test",
                        help="score on the test split, or on a validation split carved from training")
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2",
                        help="train-* run-config keys to vary; every combination is one recipe")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    return parser


def parse_grid(items: list[str]) -> list[dict[str, str]]:
    """``KEY=V1,V2 ...`` as the list of every combination (one recipe each; [{}] without a grid)."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--grid takes KEY=V1,V2, got {item!r}")
        if key not in KEYS or KEYS[key][0] != "train":
            train_keys = [k for k, (s, _) in KEYS.items() if s == "train"]
            raise ConfigError(f"--grid {key}: only training keys vary here; known: {', '.join(train_keys)}")
        axes.append((key, values.split(",")))
    return [dict(zip([k for k, _ in axes], combo, strict=True))
            for combo in itertools.product(*[v for _, v in axes])]


def score(factory, images: torch.Tensor, labels: torch.Tensor, test: Dataset, cfg: TrainConfig,
          seed: int) -> float:
    """Test (or validation) accuracy in % of a fresh model trained on (images, labels)."""
    _, metrics = train_and_evaluate(factory, images, labels, test, cfg, seed)
    return 100.0 * metrics["accuracy"]


def rows_for(splits: DataSplits, cfg: RunConfig, args: argparse.Namespace, bar) -> list[dict]:
    """Every (training set, width) row of one recipe: accuracies per seed."""
    train, test = splits.train, splits.test
    rows = []
    sets = [f"ipc {ipc}" for ipc in args.ipcs] + (["whole"] if args.whole_epochs else [])
    for name in sets:
        widths = args.whole_widths if name == "whole" else args.widths
        for width in widths:
            spec = replace(cfg.distill.model, width=width)
            factory = model_factory(spec, train.image_shape, train.num_classes, cfg.distill.device)
            recipe = cfg.train
            if name == "whole":
                recipe = replace(cfg.train, epochs=args.whole_epochs, min_steps=0)
            seeds = (args.whole_seeds or args.seeds) if name == "whole" else args.seeds
            accs, start = [], time.perf_counter()
            for seed in range(seeds):
                bar.set_postfix_str(f"{name} convnet-{width} seed {seed}")
                if name == "whole":
                    images, labels = train.x, train.y
                else:
                    ipc = int(name.split()[1])
                    dcfg = replace(cfg.distill, method="random_real", ipc=ipc, seed=seed)
                    summary = METHODS.get("random_real")(train, factory, dcfg, None, None)
                    images, labels = summary.images, summary.labels
                accs.append(score(factory, images, labels, test, recipe, seed))
                bar.update()
            rows.append({"set": name, "width": width, "accuracy": accs,
                         "mean": statistics.fmean(accs), "std": statistics.pstdev(accs),
                         "steps": num_steps(len(labels), recipe),
                         "seconds_per_seed": (time.perf_counter() - start) / seeds})
    return rows


def markdown(report: dict) -> str:
    published = report["published"]
    lines = [f"# Calibration: {report['dataset']}, scored on the {report['split']} split", "",
             f"Command: `{report['command']}`", "",
             f"Mean (std) accuracy in % over seeds 0..{report['seeds'] - 1} (the whole-set rows: "
             f"{report['whole_seeds']} seed(s), {report['whole_epochs']} epochs); published: "
             "DatasetCondensation's README (ConvNet-128, trained on a GPU).", ""]
    for recipe in report["recipes"]:
        lines += [f"## Recipe: {recipe['label']}", "",
                  "| training set | model | accuracy | published | difference | SGD steps | s per seed |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for row in recipe["rows"]:
            ref = published.get(row["set"])
            diff = f"{row['mean'] - ref:+.1f}" if ref is not None else "-"
            lines.append(f"| {row['set']} | ConvNet-{row['width']} | {row['mean']:.1f} ({row['std']:.1f}) | "
                         f"{'-' if ref is None else f'{ref:.1f}'} | {diff} | {row['steps']} | "
                         f"{row['seconds_per_seed']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    sets = list(dict.fromkeys(r["set"] for rec in report["recipes"] for r in rec["rows"]))
    series = [(rec["label"], w) for rec in report["recipes"]
              for w in dict.fromkeys(r["width"] for r in rec["rows"])]
    width = 0.8 / (len(series) + 1)
    for i, (label, w) in enumerate(series):
        rec = next(r for r in report["recipes"] if r["label"] == label)
        means = [next((r["mean"] for r in rec["rows"] if r["set"] == s and r["width"] == w), float("nan"))
                 for s in sets]
        ax.bar([j + i * width for j in range(len(sets))], means, width, label=f"{label}, ConvNet-{w}")
    refs = [report["published"].get(s, float("nan")) for s in sets]
    ax.bar([j + len(series) * width for j in range(len(sets))], refs, width, label="published", color="grey")
    ax.set_xticks([j + len(series) * width / 2 for j in range(len(sets))], sets)
    ax.set_ylabel(f"{report['split']} accuracy (%)")
    ax.set_title(f"Calibration on {report['dataset']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        base = settings_from_args(args, FLAGS)
        grid = parse_grid(args.grid)
        recipes = [(", ".join(f"{k}={v}" for k, v in g.items()) or "preset", from_flat(g, base=base))
                   for g in grid]
        if args.seeds < 1 or min(args.whole_seeds, args.whole_epochs) < 0 or min(args.ipcs + args.widths) < 1:
            raise ConfigError("--seeds, --ipcs and --widths must be >= 1; --whole-seeds, --whole-epochs >= 0")
        splits = run_splits(base)
        if args.split == "validation":
            splits = validation_split(splits.train, args.validation_fraction, base.partition.seed)
        check_ipc(splits.train, max(args.ipcs))
    except ValueError as exc:
        return fail(exc)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    whole = (args.whole_seeds or args.seeds) * len(args.whole_widths) if args.whole_epochs else 0
    per_recipe = args.seeds * len(args.ipcs) * len(args.widths) + whole
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = []
    with tqdm(total=per_recipe * len(recipes), desc="calibrate", unit="model", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for label, cfg in recipes:
            results.append({"label": label, "train": {k: v for k, v in to_flat(cfg).items()
                                                      if KEYS[k][0] == "train"},
                            "rows": rows_for(splits, cfg, args, bar)})
    report = {"dataset": base.dataset, "split": args.split, "seeds": args.seeds,
              "whole_seeds": args.whole_seeds or args.seeds, "whole_epochs": args.whole_epochs,
              "command": "python -m simulations.calibrate " + " ".join(argv),
              "published": PUBLISHED.get(base.dataset, {}), "recipes": results,
              "train_size": len(splits.train), "eval_size": len(splits.test),
              "config": to_flat(base), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "wall_seconds": time.perf_counter() - start}
    write_report(args.out, report, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
