"""Every distillation method, centrally, over seeds: accuracy across architectures, cost and size.

    python -m simulations.benchmark_methods --dataset mnist5k --ipc 1,10 --seeds 3 --threads 2 \\
        --out runs/benchmark_methods

For every (method, IPC, seed) the training split is distilled once with the ConvNet (timed
with :func:`ddcore.profile.measure`), the summary's bytes are counted, and a fresh model of
every ``--archs`` architecture (seeded) is trained on it and tested, with the summary's
learned step sizes when it has them, as ``python -m ddcore distill`` does. ``--preset`` is a run
preset (:data:`ddcore.runconfig.RUN_PRESETS`, the same table every front end reads, data loaded and
normalised as it says; ``benchmark`` by default; ``benchmark`` and ``fmnist`` also tune each
method's iterations per IPC, :data:`TUNING`); it is recorded in the report. ``--ceiling E`` adds the
whole-training-set row (the evaluation ConvNet trained E epochs on every training image), and
``--wide-best`` re-trains, per IPC, the best method's seed-0 summary with the papers' ConvNet-128.
Writes results.jsonl (one line per finished job, as it goes), then report.json and report.md. Bad
input gives one line on stderr, exit code 2 and no files.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ddcore.config import DistillConfig, TrainConfig
from ddcore.data import DataSplits
from ddcore.errors import ConfigError
from ddcore.files import atomic_write, environment, with_provenance
from ddcore.methods import METHODS, check_method, distill
from ddcore.methods.base import check_ipc
from ddcore.models import MODELS, model_factory
from ddcore.profile import measure
from ddcore.runconfig import (
    RunConfig,
    check_device,
    distill_changes,
    from_flat,
    keys,
    run_preset,
    run_splits,
    to_flat,
)
from ddcore.settings import add_settings, given, note_ignored_centrally
from ddcore.summary import Summary
from ddcore.train import num_steps, train_and_evaluate
from simulations.common import fail

METHOD_ORDER = ("random_real", "herding", "dm", "gm", "dd", "mtt", "iadd")
BASELINES = ("random_real", "herding")  # the plain reference rows: ``--set`` options never apply to them
ARCH_NAMES = {"convnet": "ConvNet", "mlp": "MLP", "lenet": "LeNet", "resnet": "ResNet"}
WIDE = 128  # the papers' ConvNet width (--wide-best)


@dataclass(frozen=True)
class Published:
    """Published test accuracy (%) on one dataset: system -> IPC -> figure, and the whole training set."""

    figures: Mapping[str, Mapping[int, float]]
    source: str
    whole: float | None = None  # the same network trained on every training image


# Our gm is DC with DSA, our dm is DM. mnist5k is a 5,000-image subset of MNIST: its figures are
# full MNIST's (context, not like-for-like).
PUBLISHED: dict[str, Published] = {
    "mnist": Published(
        figures={"DC": {1: 91.7, 10: 97.4}, "DSA": {1: 88.7, 10: 97.8}, "DM": {1: 89.7, 10: 97.5}},
        source="full MNIST, ConvNet-128: DC (Zhao et al. 2021), DSA (Zhao & Bilen 2021), DM (Zhao & Bilen "
               "2023)"),
    "fashion-mnist": Published(
        figures={"DC": {1: 70.5, 10: 82.3, 50: 83.6}, "DSA": {1: 70.6, 10: 84.6, 50: 88.7},
                 "random real": {1: 51.4, 10: 73.8, 50: 82.5}},
        whole=93.5,
        source="Fashion-MNIST, ConvNet-128 with instance norm: DatasetCondensation README, DC (Zhao et al. "
               "2021) and DSA (Zhao & Bilen 2021) papers"),
}
PUBLISHED_AS = {"mnist5k": "mnist"}  # dataset -> the dataset whose published figures apply


def published_for(dataset: str) -> Published | None:
    """The published figures that go beside a table of ``dataset`` (None when there are none)."""
    return PUBLISHED.get(PUBLISHED_AS.get(dataset, dataset))


@dataclass(frozen=True)
class Budget:
    """How long each method optimises and how every evaluated model is trained."""

    distill: DistillConfig  # shared settings; method, ipc, seed and device are set per job
    train: TrainConfig  # training of every evaluated model on a summary
    methods: Mapping[str, Mapping[str, object]]  # method -> DistillConfig overrides (iterations, ...)
    note: str
    # (method, ipc) -> overrides on top of ``methods`` for that IPC only (papers tune per IPC too)
    per_ipc: Mapping[tuple[str, int], Mapping[str, object]] = field(default_factory=dict)
    # DistillConfig fields set by ``--set`` for every method except the baselines, over all the above
    options: Mapping[str, object] = field(default_factory=dict)

    def overrides(self, method: str, ipc: int) -> dict[str, object]:
        """The DistillConfig fields this budget sets for ``method`` at ``ipc``."""
        options = {} if method in BASELINES else self.options
        return {**self.methods.get(method, {}), **self.per_ipc.get((method, ipc), {}), **options}

    def config(self, method: str, ipc: int, seed: int, device: str) -> DistillConfig:
        """The distillation settings of one job."""
        return replace(self.distill, method=method, ipc=ipc, seed=seed, device=device,
                       **self.overrides(method, ipc))


@dataclass(frozen=True)
class Tuning:
    """What a preset tunes per method (and per IPC) on top of its own settings."""

    methods: Mapping[str, Mapping[str, object]]  # method -> DistillConfig overrides (iterations, ...)
    note: str
    per_ipc: Mapping[tuple[str, int], Mapping[str, object]] = field(default_factory=dict)


TUNING: dict[str, Tuning] = {
    # 7 methods x IPC 1, 10 x 3 seeds x 4 architectures on mnist5k, timed per unit in CPU seconds at
    # 1 thread (docs/benchmark_methods.md): the evaluation trainings ~1,800 at the recipe's 400 SGD
    # steps (~900 at the 200 this preset used before the instrument fix), dm ~600, gm ~450, dd ~400,
    # mtt and iadd ~320 each
    "benchmark": Tuning(
        methods={"dm": {"iterations": 200}, "gm": {"iterations": 100}, "dd": {"iterations": 100},
                 "mtt": {"iterations": 100}, "iadd": {"iterations": 100}},
        # IPC 1 (seed 0-2 sweeps, docs/benchmark_methods.md): DD's images want 5x the step at IPC 1
        # but lose with it at IPC 10; MTT/IADD's defaults (20 student steps) cost ~300 s per
        # IPC-10 job, so IPC 10 keeps 5 steps at 0.01
        per_ipc={("dd", 1): {"lr_images": 0.05},
                 ("mtt", 10): {"mtt_syn_steps": 5, "lr_images": 0.01},
                 ("iadd", 10): {"mtt_syn_steps": 5, "lr_images": 0.01}},
        note="ConvNet-32 (instance norm) for distillation; DM 200 image updates, GM/DD/MTT/IADD 100 "
             "(GM: a fresh network every 10, 1 inner step; DD: 5 unrolled steps without augmentation, "
             "image step 0.05 at IPC 1 and 0.01 at IPC 10; MTT/IADD: 20 student steps and image step "
             "0.1 at IPC 1, 5 steps and 0.01 at IPC 10, experts 2 x 4 epochs); every evaluated model: "
             "the instrument's recipe (100 epochs or at least 400 SGD steps, one DSA op per batch)",
    ),
    # full Fashion-MNIST (60,000 training images, public normalisation) at IPC 1, 10, 50: random_real,
    # herding, dm, gm, mtt x 3 seeds, ConvNet only. Unit costs in CPU seconds at 1 thread, timed on
    # this machine (docs/benchmark_methods.md): evaluation with the instrument's recipe (400 SGD
    # steps, chosen on the validation split, docs/bench.md) + the 10,000-image test ~10 / 36 / 101 s
    # at IPC 1 / 10 / 50 (x 15 summaries: ~2,200; until the instrument fix this tuning cut it to 200
    # steps); herding ~29 s a job (embeds every training image; ~260); dm 0.5 / 0.5 / 1.2 s per update
    # (100 / 100 / 40 updates: ~440); gm 1.3 / 1.6 / 3.2 s (25 / 25 / 10: ~310); mtt one expert epoch
    # on 60,000 images ~50 s a job, an update ~0.8 s
    # at IPC 1 (20 student steps) and ~0.38 / ~1.9 s per student step at IPC 10 / 50 (full-batch
    # unroll; 30 updates x 20 steps, 15 x 5, 6 x 5: ~780); the --ceiling 2 row ~120. About 4,100
    # CPU-s, ~69 CPU-min at 1 thread. MTT's experts get one epoch (not 2 x 4).
    "fmnist": Tuning(
        methods={"dm": {"iterations": 100}, "gm": {"iterations": 25},
                 "mtt": {"iterations": 30, "mtt_experts": 1, "mtt_expert_epochs": 1, "mtt_max_start": 0,
                         "mtt_expert_span": 1}},
        per_ipc={("dm", 50): {"iterations": 40}, ("gm", 50): {"iterations": 10},
                 ("mtt", 10): {"iterations": 15, "mtt_syn_steps": 5, "lr_images": 0.01},
                 ("mtt", 50): {"iterations": 6, "mtt_syn_steps": 5, "lr_images": 0.01}},
        note="ConvNet-32 (instance norm) for distillation, public normalisation; DM 100 image updates "
             "(40 at IPC 50), GM 25 (10 at IPC 50; a fresh network every 10, 1 inner step); MTT one "
             "expert of one epoch on the 60,000 images (start epoch 0, span 1), 30 updates of 20 student "
             "steps at image step 0.1 at IPC 1, 15 / 6 updates of 5 steps at 0.01 at IPC 10 / 50; every "
             "evaluated model: the instrument's recipe (100 epochs or at least 400 SGD steps, one DSA op "
             "per batch)",
    ),
}


def tuning_for(preset: str) -> Tuning:
    """The per-method tuning of ``preset`` (none for a preset without a :data:`TUNING` entry)."""
    return TUNING.get(preset, Tuning(methods={}, note=f"preset {preset!r}: its settings for every method, "
                                                      "no per-method tuning"))


def budget_for(preset: str, cfg: RunConfig, options: Mapping[str, object]) -> Budget:
    """The budget of ``cfg`` (the preset with the flags applied) and the preset's per-method tuning."""
    tuning = tuning_for(preset)
    return Budget(distill=cfg.distill, train=cfg.train, methods=tuning.methods, note=tuning.note,
                  per_ipc=tuning.per_ipc, options=options)


# named flags (flag -> run-config key); --methods and --ipc are the lists of 'method' and 'ipc'
FLAGS = {"dataset": "dataset", "data-dir": "data-dir", "device": "device"}
LIST_KEYS = {"method": "methods", "ipc": "ipc"}  # run-config key -> the list flag that sets it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmark_methods", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=None,
                        help=f"comma list of methods (default {','.join(METHOD_ORDER)})")
    parser.add_argument("--ipc", default=None, help="comma list of images per class (default 1,10)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per (method, ipc)")
    parser.add_argument("--archs", default="convnet,mlp,lenet,resnet",
                        help="comma list of architectures trained on each summary")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--ceiling", type=int, default=0, metavar="EPOCHS",
                        help="also train the evaluation model on the whole training split for EPOCHS "
                             "epochs (seed 0, the evaluation recipe otherwise) and report it; 0 = off")
    parser.add_argument("--wide-best", action="store_true",
                        help=f"per IPC, re-train the best method's seed-0 summary with a ConvNet-{WIDE} "
                             "(first architecture, model-width 128) and report it")
    add_settings(parser, FLAGS, preset="benchmark")
    parser.epilog = ("--set: distillation keys (e.g. multires=0.5, soft-labels=teacher) apply to every "
                     "method but the random_real and herding baselines; model, training and data keys to "
                     "every method and every evaluated model; method=... and ipc=... are --methods and "
                     "--ipc.")
    return parser


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def plan(args: argparse.Namespace) -> tuple[RunConfig, Budget, list[str], list[int], list[str], dict]:
    """The settings, budget, methods, IPCs and architectures of the command line (no data loaded).

    Returns the run config, the budget, methods, IPCs, architectures and the ``--set`` options
    that apply to the distillation methods only. Raises :class:`ConfigError` on anything bad.
    """
    values = given(args, FLAGS)
    lists = {"methods": args.methods, "ipc": args.ipc}
    for key, flag in LIST_KEYS.items():
        if key in values:
            if lists[flag] is not None:
                raise ConfigError(f"--set {key} and --{flag} both given; use --{flag}")
            lists[flag] = values.pop(key)
    note_ignored_centrally(values)  # accepted, but a central benchmark has no clients
    options = {k: v for k, v in values.items() if k in keys("distill") and k != "device"}
    cfg = check_device(from_flat({k: v for k, v in values.items() if k not in options},
                                 base=run_preset(args.preset)))
    if cfg.distill.dp.enabled:
        raise ConfigError("the methods benchmark runs without DP (dp=false); for DP use "
                          "simulations.privacy_utility")
    methods = _names(lists["methods"] or ",".join(METHOD_ORDER))
    archs = _names(args.archs)
    if not methods or not archs:
        raise ConfigError("--methods and --archs each need at least one name")
    for m in methods:
        METHODS.get(m)  # raises, listing the known ones
    for a in archs:
        MODELS.get(a)
    try:
        ipcs = [int(t) for t in _names(lists["ipc"] or "1,10")]
    except ValueError:
        raise ConfigError(f"--ipc takes a comma list of whole numbers, e.g. 1,10; "
                          f"got {lists['ipc']!r}") from None
    if not ipcs or min(ipcs) < 1:
        raise ConfigError(f"--ipc needs numbers >= 1, got {lists['ipc']!r}")
    if args.seeds < 1 or args.threads < 0 or args.ceiling < 0:
        raise ConfigError(f"--seeds must be >= 1, --threads and --ceiling >= 0; got {args.seeds}, "
                          f"{args.threads}, {args.ceiling}")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} exists and is not a folder")
    budget = budget_for(args.preset, cfg, distill_changes(options, cfg.distill))
    for method in methods:
        for ipc in ipcs:
            check_method(budget.config(method, ipc, seed=0, device=cfg.distill.device))
    return cfg, budget, methods, sorted(set(ipcs)), archs, options


def run_job(splits: DataSplits, budget: Budget, method: str, ipc: int, seed: int, archs: list[str],
            device: str) -> tuple[dict, Summary]:
    """Distill once (timed), then train and test a fresh model of every architecture on the summary.

    Returns the job's row and its summary.
    """
    cfg = budget.config(method, ipc, seed, device)
    train = splits.train
    factory = model_factory(cfg.model, train.image_shape, train.num_classes, device)
    cpu = time.process_time()
    with measure(device) as m:
        summary = distill(train, factory, cfg)
    row = {"method": method, "ipc": ipc, "seed": seed, "images": len(summary),
           "iterations": 0 if method in BASELINES else cfg.iterations,  # image updates (0: no optimisation)
           "distill_seconds": m.seconds, "distill_cpu_seconds": time.process_time() - cpu,
           "peak_rss_mb": m.peak_rss_mb,
           "summary_bytes": int(sum(a.nbytes for a in summary.to_arrays().values())),
           "settings": budget.overrides(method, ipc),  # what this job set over the budget's distill
           "accuracy": {}, "loss": {}, "train_seconds": {}}
    for arch in archs:
        arch_factory = model_factory(replace(cfg.model, name=arch), train.image_shape, train.num_classes,
                                     device)
        start = time.perf_counter()
        _, result = train_and_evaluate(arch_factory, summary.images, summary.labels, splits.test,
                                       budget.train, seed=seed, lrs=summary.lrs)
        row["accuracy"][arch] = result["accuracy"]
        row["loss"][arch] = result["loss"]
        row["train_seconds"][arch] = time.perf_counter() - start
    return row, summary


def ceiling(splits: DataSplits, budget: Budget, arch: str, epochs: int, device: str) -> dict:
    """The evaluation model trained on the whole training split for ``epochs`` epochs (seed 0), tested."""
    train, cfg = splits.train, replace(budget.train, epochs=epochs, min_steps=0)
    factory = model_factory(replace(budget.distill.model, name=arch), train.image_shape, train.num_classes,
                            device)
    start, cpu = time.perf_counter(), time.process_time()
    _, result = train_and_evaluate(factory, train.x, train.y, splits.test, cfg, seed=0)
    return {"arch": arch, "epochs": epochs, "steps": num_steps(len(train), cfg), "images": len(train),
            "accuracy": result["accuracy"], "loss": result["loss"], "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu}


def wide_best(splits: DataSplits, budget: Budget, results: dict, summaries: Mapping[tuple[str, int], Summary],
              arch: str, device: str) -> dict:
    """Per IPC: the best method (mean accuracy on ``arch``), its seed-0 summary trained on a wide ``arch``."""
    train, out = splits.train, {}
    spec = replace(budget.distill.model, name=arch, width=WIDE)
    for ipc, table in results.items():
        best = max(table, key=lambda m: table[m]["accuracy"][arch]["mean"])
        summary = summaries[(best, int(ipc))]
        factory = model_factory(spec, train.image_shape, train.num_classes, device)
        start, cpu = time.perf_counter(), time.process_time()
        _, result = train_and_evaluate(factory, summary.images, summary.labels, splits.test, budget.train,
                                       seed=0, lrs=summary.lrs)
        out[ipc] = {"method": best, "arch": arch, "width": WIDE, "seed": 0, "accuracy": result["accuracy"],
                    "narrow_width": budget.distill.model.width,
                    "narrow_accuracy": table[best]["accuracy"][arch]["values"][0],
                    "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}
    return out


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value) of ``values``."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def verdict(method: dict, baseline: dict) -> dict:
    """Difference of means and 'beats' / 'on par' / 'worse' at 2x the pooled standard deviation."""
    diff = method["mean"] - baseline["mean"]
    pooled = ((method["std"] ** 2 + baseline["std"] ** 2) / 2) ** 0.5
    if len(method["values"]) < 2 or len(baseline["values"]) < 2:
        word = "n/a (1 seed)"
    elif diff > 2 * pooled:
        word = "beats"
    elif diff < -2 * pooled:
        word = "worse"
    else:
        word = "on par"
    # the jobs are paired by seed (same start images, same evaluation weights): per-seed differences
    paired = [m - b for m, b in zip(method["values"], baseline["values"], strict=False)]
    return {"difference": diff, "pooled_std": pooled, "verdict": word, "paired_differences": paired,
            "seeds_better": sum(d > 0 for d in paired)}


def aggregate(rows: list[dict], methods: list[str], ipcs: list[int], archs: list[str]) -> dict:
    """Per IPC and method: mean and std over seeds, and the ConvNet comparison with random_real."""
    out: dict = {}
    for ipc in ipcs:
        table = {}
        for method in methods:
            runs = [r for r in rows if r["ipc"] == ipc and r["method"] == method]
            table[method] = {"seeds": [r["seed"] for r in runs], "iterations": runs[0]["iterations"],
                             "accuracy": {a: mean_std([r["accuracy"][a] for r in runs]) for a in archs},
                             "eval_seconds": mean_std([sum(r["train_seconds"].values()) for r in runs]),
                             **{k: mean_std([r[k] for r in runs])
                                for k in ("distill_seconds", "distill_cpu_seconds", "peak_rss_mb",
                                          "summary_bytes")}}
        if "random_real" in table:
            base = table["random_real"]["accuracy"][archs[0]]
            for method, entry in table.items():
                if method != "random_real":
                    entry["vs_random_real"] = verdict(entry["accuracy"][archs[0]], base)
        out[str(ipc)] = table
    return out


def _versus(v: dict) -> str:
    d = v["paired_differences"]
    spread = f"{100 * min(d):+.1f}..{100 * max(d):+.1f}"
    better = f"{v['seeds_better']}/{len(d)} better"
    return f"{100 * v['difference']:+.1f} ({v['verdict']}; per seed {spread}, {better})"


def _pm(stat: dict) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def markdown(report: dict) -> str:
    """One table per IPC, the published figures for context, the ceiling, notes and the command."""
    cfg = report["config"]
    archs, first = cfg["archs"], ARCH_NAMES.get(cfg["archs"][0], cfg["archs"][0])
    published = published_for(cfg["dataset"])
    lines = ["# Distillation methods benchmark", "",
             f"{cfg['dataset']} ({cfg['train_examples']} training / {cfg['test_examples']} test images), "
             f"{cfg['seeds']} seed(s), preset `{cfg['preset']}`: {report['budget']['note']}. "
             f"Test accuracy (%) as mean ± std over seeds; the distillation network is the ConvNet, the "
             f"other columns train a different architecture on the same summary. Wall time "
             f"{report['wall_seconds'] / 60:.1f} min ({report['cpu_seconds'] / 60:.1f} CPU-min), "
             f"{report['environment']['torch_threads']} torch thread(s).", ""]
    if cfg.get("options"):
        lines += ["Options (`--set`, every method but " + " and ".join(BASELINES) + "): "
                  + ", ".join(f"`{k}={v}`" for k, v in cfg["options"].items()) + ".", ""]
    for ipc, table in report["results"].items():
        has_base = "random_real" in table
        head = ["method", *[ARCH_NAMES.get(a, a) for a in archs], "iterations", "distill s (wall / CPU)",
                "eval s", "peak MiB", "summary bytes"]
        head += [f"vs random-real ({first})"] if has_base else []
        lines += [f"## IPC {ipc}", "", "| " + " | ".join(head) + " |",
                  "|---|" + "---:|" * (len(head) - 1)]
        for method, e in table.items():
            cells = [method, *[_pm(e["accuracy"][a]) for a in archs], str(e["iterations"] or "—"),
                     f"{e['distill_seconds']['mean']:.1f} / {e['distill_cpu_seconds']['mean']:.1f}",
                     f"{e['eval_seconds']['mean']:.1f}", f"{e['peak_rss_mb']['mean']:.0f}",
                     f"{e['summary_bytes']['mean']:,.0f}"]
            if has_base:
                v = e.get("vs_random_real")
                cells.append("—" if v is None else _versus(v))
            lines.append("| " + " | ".join(cells) + " |")
        wide = report.get("wide_best", {}).get(ipc)
        if wide:
            lines += ["", f"ConvNet-{wide['width']} on the best method's ({wide['method']}) seed-0 summary: "
                      f"{100 * wide['accuracy']:.1f}% (width {wide['narrow_width']} on it: "
                      f"{100 * wide['narrow_accuracy']:.1f}%; {wide['seconds']:.0f} s wall / "
                      f"{wide['cpu_seconds']:.0f} s CPU)."]
        figures = {k: v[int(ipc)] for k, v in published.figures.items() if int(ipc) in v} if published else {}
        if figures:
            lines += ["", f"Published at IPC {ipc} ({published.source}): "
                      + ", ".join(f"{k} {v}" for k, v in figures.items())
                      + " - thousands of GPU iterations and 1,000-epoch evaluations: context, not a "
                        "like-for-like comparison (our `gm` is DC with DSA, our `dm` is DM)."]
        lines.append("")
    top = report.get("ceiling")
    if top:
        paper = f"; published: {published.whole}" if published and published.whole is not None else ""
        lines += ["## Whole training set", "",
                  f"{ARCH_NAMES.get(top['arch'], top['arch'])} trained on all {top['images']:,} training "
                  f"images, {top['epochs']} epoch(s) = {top['steps']} SGD steps, seed 0, the evaluation "
                  f"recipe otherwise: **{100 * top['accuracy']:.1f}%** test accuracy "
                  f"({top['seconds']:.0f} s wall / {top['cpu_seconds']:.0f} s CPU){paper}.", ""]
    lines += report["notes"]
    return "\n".join(lines) + "\n"


NOTES = [
    "- vs random-real: difference of the mean accuracies (points) on the first architecture (the "
    "distillation ConvNet by default), 'beats' / 'worse' when it exceeds twice the pooled standard "
    "deviation over seeds (sqrt of the mean of the two variances), else 'on par' - an unpaired "
    "rule, conservative for paired runs; 'per seed' gives the range of the paired per-seed "
    "differences and on how many seeds the method was better. With seed s the "
    "matching methods start (init=real) from the real images random_real picks for seed s, and every "
    "evaluated model of seed s starts from the same weights: the comparison is paired.",
    "- iterations: image updates of the method ('—': the baselines do not optimise). distill s: wall "
    "and CPU (process) seconds of the distillation alone (MTT/IADD include training their expert "
    "trajectories); the CPU seconds are the fairer figure when other jobs share the machine. eval s: "
    "wall seconds to train and test every architecture on the summary. peak MiB: the whole process's "
    "resident set while distilling (Python, torch, the "
    "loaded data), sampled every 20 ms - it includes memory kept from earlier jobs, so compare it "
    "across methods with care.",
    "- summary bytes: sum of the arrays' nbytes in float32 (images, int64 labels, and DD's learned step "
    "sizes); the evaluation trains with those step sizes, cycled, when a summary has them (also on "
    "the other architectures).",
    "- The train/test split is the one of seed 0 for every job; seeds vary the distillation and the "
    "evaluated models' initialisation and augmentation.",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        cfg, budget, methods, ipcs, archs, options = plan(args)
        splits = run_splits(cfg)
        check_ipc(splits.train, max(ipcs))
    except ValueError as exc:
        return fail(exc)
    device = cfg.distill.device
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    jobs = [(m, ipc, s) for ipc in ipcs for m in methods for s in range(args.seeds)]
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "results.jsonl"
    partial.write_text("")  # a fresh run: one line per finished job is appended below
    rows, summaries, start, cpu = [], {}, time.perf_counter(), time.process_time()
    with tqdm(jobs, desc="benchmark", unit="job", file=sys.stderr, dynamic_ncols=True) as bar:
        for method, ipc, seed in bar:
            bar.set_postfix_str(f"{method} ipc {ipc} seed {seed}")
            row, summary = run_job(splits, budget, method, ipc, seed, archs, device)
            rows.append(row)
            if seed == 0:
                summaries[(method, ipc)] = summary  # for --wide-best
            with partial.open("a") as f:
                f.write(json.dumps(row) + "\n")
    results = aggregate(rows, methods, ipcs, archs)
    extra = {}
    if args.wide_best:
        extra["wide_best"] = wide_best(splits, budget, results, summaries, archs[0], device)
    if args.ceiling:
        extra["ceiling"] = ceiling(splits, budget, archs[0], args.ceiling, device)
    report = {
        "title": "feddistill methods benchmark",
        "config": {"dataset": splits.train.name, "train_examples": len(splits.train),
                   "test_examples": len(splits.test), "methods": methods, "ipc": ipcs, "seeds": args.seeds,
                   "archs": archs, "preset": args.preset, "device": device,
                   "data_seed": cfg.partition.seed, "options": options, "settings": to_flat(cfg)},
        "budget": {"note": budget.note, "distill": _plain(asdict(budget.distill)),
                   "methods": {m: {str(ipc): budget.overrides(m, ipc) for ipc in ipcs} for m in methods},
                   "train": asdict(budget.train)},
        "environment": environment(device),
        "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "results": results,
        **extra,
        "runs": rows,
        "notes": NOTES,
    }
    text = with_provenance(markdown(report), report)
    atomic_write(args.out / "report.json", json.dumps(report, indent=2).encode())
    atomic_write(args.out / "report.md", text.encode())
    print(text)
    print(f"report: {args.out / 'report.json'} ({report['wall_seconds'] / 60:.1f} min)")
    return 0


def _plain(cfg: dict) -> dict:
    """A distillation config for the report, without its DP block (never enabled here; inf in JSON)."""
    return {k: v for k, v in cfg.items() if k != "dp"}


if __name__ == "__main__":
    sys.exit(main())
