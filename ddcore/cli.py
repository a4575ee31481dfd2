"""Command line: distill a dataset centrally, evaluate the summary, write metrics and pictures.

    python -m ddcore distill --dataset mnist5k --method dm --ipc 10 --out runs/dm10
    python -m ddcore distill --method gm --dp --target-epsilon 1 --delta 1e-5 --out runs/dpgm

With --dp the DP variant of the method runs (from the ``privacy`` package, imported only
then), starting from noise, on data normalised with fixed public constants (mean 0.5, std
0.5: the data's own mean and std would be an unaccounted release); metrics.json then records
the epsilon actually spent and the accountant.

Writes DIR/metrics.json, DIR/summary.pt, DIR/synthetic.png (and DIR/importances.png for
iadd), only once everything has succeeded. Bad input gives one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ddcore.data import Dataset, load_dataset
from ddcore.errors import ConfigError, DDCoreError
from ddcore.files import staged_folder
from ddcore.methods import distill, method_name
from ddcore.methods.base import check_ipc
from ddcore.methods.options import without_options
from ddcore.models import model_factory
from ddcore.profile import measure
from ddcore.runconfig import RunConfig, check_device, from_flat, keys, run_preset, to_flat
from ddcore.settings import add_settings, given, note_ignored_centrally
from ddcore.summary import Summary
from ddcore.train import train_and_evaluate

# named flags: the dataset, the run seed and every distillation, model, DP and training key
FLAGS = ("dataset", "data-dir", "seed", *keys("distill", "model", "dp", "train"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddcore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("distill", help="distill a dataset and evaluate the summary")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/<method>_ipc<k>)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip evaluating random real samples of the same size")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default, one per core; OMP_NUM_THREADS also sets it)")
    add_settings(p, FLAGS, preset="central")
    p.epilog = ("--dp runs the method's DP variant (from the privacy package; it needs --target-epsilon, "
                "a number > 0 or inf for the DP code path without noise, and starts from noise). "
                "--factorised: ipc bases per class - the bytes of ipc images - decoded by "
                "--factor-hallucinators tiny shared hallucinators (dm, gm and their DP variants).")
    return parser


def build_config(args: argparse.Namespace) -> RunConfig:
    """The run settings of ``python -m ddcore distill``: preset, flags, ``--set``, and the DP rules."""
    values = given(args, FLAGS)
    base = run_preset(args.preset)
    dp = from_flat(values, base=base).distill.dp.enabled
    if dp and "target-epsilon" not in values:
        raise ConfigError("--dp needs --target-epsilon (a number > 0, or inf for the DP code path "
                          "without noise)")
    if not dp and {"target-epsilon", "max-grad-norm"} & set(values):
        raise ConfigError("--target-epsilon / --max-grad-norm only act with --dp; add --dp")
    if dp:
        values.setdefault("init", "noise")  # DP never starts from real images
    cfg = check_device(from_flat(values, base=base))
    if cfg.distill.dp.enabled or cfg.distill.method.startswith("dp-"):
        import privacy.methods  # noqa: F401  (registers dp-gm, dp-dm)
    note_ignored_centrally(values)
    return cfg


def _bar(desc: str, quiet: bool):
    """A tqdm-driven progress callback ``(step, total, metrics)``, or None when quiet."""
    if quiet:
        return None, None
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        bar.total = total
        bar.n = step
        if metrics:
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        bar.refresh()

    return progress, bar


def run_distill(args: argparse.Namespace) -> dict:
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    cfg = build_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = method_name(cfg.distill)
    private = name.startswith("dp-")  # a DP run normalises with public constants, not the data's own
    splits = load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, seed=cfg.partition.seed,
                          public_normalisation=private or cfg.normalisation == "public")
    check_ipc(splits.train, cfg.distill.ipc)
    out = args.out or Path("runs") / f"{cfg.distill.method}_ipc{cfg.distill.ipc}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    factory = model_factory(cfg.distill.model, splits.train.image_shape, splits.train.num_classes,
                            cfg.distill.device)
    progress, bar = _bar(f"distill {name}", args.quiet)
    with measure(cfg.distill.device) as m:
        summary = distill(splits.train, factory, cfg.distill, progress=progress)
    if bar is not None:
        bar.close()
    metrics = {"method": name, "ipc": cfg.distill.ipc, "dataset": splits.train.name,
               "images": len(summary), "distill_seconds": m.seconds, "distill_peak_rss_mb": m.peak_rss_mb,
               "iterations_done": summary.meta.get("iterations-done"),  # fewer than planned: time budget
               "summary_bytes": sum(a.nbytes for a in summary.to_arrays().values()),
               "normalisation": {"source": "public constants" if private else "training split",
                                 "mean": list(splits.train.mean), "std": list(splits.train.std)}}
    if summary.meta.get("dp"):  # the privacy record, snake_case (epsilon: the accountant's, spent)
        from privacy.record import PRIVACY_KEYS

        metrics.update({k.replace("-", "_"): summary.meta[k] for k in PRIVACY_KEYS})
        metrics.update(epsilon_spent=metrics.pop("epsilon"), accountant=summary.meta["accountant"])
    from ddcore.methods.iadd import importances_of

    weights = importances_of(summary)
    if weights:  # IADD: which parameter tensors the summary was matched on
        metrics.update(importances=weights, pruned_tensors=int(summary.meta["pruned-tensors"]))
    metrics.update(_evaluate("", summary, splits, cfg, args.quiet))
    if not args.no_baseline and cfg.distill.method != "random_real":  # a non-private reference
        plain = replace(cfg.distill, method="random_real", dp=replace(cfg.distill.dp, enabled=False),
                        factorised=False)  # ipc real images: the factorised summary's byte budget
        plain = without_options(plain)  # hard labels, no image options
        baseline = distill(splits.train, factory, plain)
        metrics.update(_evaluate("random_real_", baseline, splits, cfg, args.quiet))
    from importlib.metadata import version

    metrics["config"] = to_flat(cfg)
    metrics["versions"] = {p: version(p) for p in ("torch", "numpy")}
    metrics["torch_threads"] = torch.get_num_threads()
    _write_outputs(out, metrics, summary, splits.train)
    return metrics


def _evaluate(prefix: str, summary: Summary, splits, cfg: RunConfig, quiet: bool) -> dict:
    factory = model_factory(cfg.distill.model, splits.train.image_shape, splits.train.num_classes,
                            cfg.distill.device)
    progress, bar = _bar(f"train on {prefix or 'summary '}".strip(), quiet)
    start = time.perf_counter()
    _, result = train_and_evaluate(factory, summary.images, summary.labels, splits.test, cfg.train,
                                   seed=cfg.distill.seed, lrs=summary.lrs, progress=progress)
    if bar is not None:
        bar.close()
    return {f"{prefix}test_accuracy": result["accuracy"], f"{prefix}test_loss": result["loss"],
            f"{prefix}train_seconds": time.perf_counter() - start}


def _write_outputs(out: Path, metrics: dict, summary: Summary, data: Dataset) -> None:
    """summary.pt, synthetic.png, metrics.json (and importances.png for IADD), all or nothing."""
    from ddcore.plots import plot_importances, plot_summary

    with staged_folder(out) as stage:
        summary.with_meta(seed=metrics["config"]["seed"]).save(stage / "summary.pt")
        plot_summary(summary, data, stage / "synthetic.png")
        if "importances" in metrics:
            plot_importances(metrics["importances"], stage / "importances.png",
                             threshold=metrics["config"]["iadd-prune"])
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        metrics = run_distill(args)
    except DDCoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shown = {k: v for k, v in metrics.items() if k not in ("config", "versions")}
    print(json.dumps(shown, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
