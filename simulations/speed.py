"""Where distillation's time goes, and the project's DM loop against the reference implementation.

    python -m simulations.speed --out runs/speed --reference PATH/TO/DatasetCondensation

Three measurements, each printed as it finishes and written to speed.json / speed.md in --out:

1. **Embedding**: seconds to embed one DM iteration's real batch (``classes x batch-real``
   images, no graph) with ConvNet-128, in one pass and in chunks, in fp32 and (where the
   hardware runs it natively) bf16 autocast - the measurement behind ``embed-chunk`` and
   ``real-precision=auto``.
2. **DM iteration, A/B**: seconds per iteration of the papers' configuration (ConvNet-128,
   instance norm, 256 real images per class, IPC 10, DSA), alternating in one run between the
   reference loop (``main_DM.py``'s update step, run with the reference's own ``get_network``,
   ``DiffAugment`` and ``ParamDiffAug`` imported from ``--reference``, on the project's
   tensors), the project as it was (fp32, one pass) and the project's defaults. The ratio
   project / reference is the figure of issue 15.
3. **Accuracy at equal iterations** (``--accuracy-seeds``): per seed, the reference loop and the
   project start from the same random real images, run the same number of iterations, and both
   results are trained and tested by the project's default trainer and ConvNet, so only the
   distillation differs.

Without ``--reference`` the reference rows are skipped (say where to get it:
``git clone https://github.com/VICO-UoE/DatasetCondensation``). Run it alone on the machine:
two heavy jobs on two cores distort every figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import torch

from ddcore.config import DistillConfig
from ddcore.data import Dataset, load_dataset
from ddcore.errors import ConfigError
from ddcore.files import atomic_write, environment
from ddcore.methods import distill
from ddcore.methods.base import ClassIndex
from ddcore.methods.options import native_bf16
from ddcore.models import ModelSpec, embed_frozen, model_factory
from ddcore.runconfig import run_preset
from ddcore.summary import Summary
from ddcore.train import train_and_evaluate
from ddcore.tvcompat import import_torchvision
from simulations.common import fail

PAPER_MODEL = ModelSpec(width=128, depth=3, norm="instance")  # ConvNet of DC / DSA / DM
PAPER_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # main_DM.py's default dsa_strategy
PAPER_BATCH_REAL = 256
CHUNKS = (0, 256, 64, 32)  # 0 = one pass over the whole batch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (speed.json, speed.md)")
    parser.add_argument("--dataset", default="mnist5k", help="dataset to time on (default mnist5k)")
    parser.add_argument("--data-dir", default=None, help="folder of the dataset's files, if needed")
    parser.add_argument("--reference", type=Path, default=None,
                        help="checkout of VICO-UoE/DatasetCondensation (its utils.py and networks.py)")
    parser.add_argument("--iterations", type=int, default=10, help="DM iterations per timed run (default 10)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="alternating timed runs per variant (default 2; the median is reported)")
    parser.add_argument("--accuracy-seeds", type=int, default=0,
                        help="seeds of the equal-iteration accuracy check (0 = skip, the default)")
    parser.add_argument("--accuracy-iterations", type=int, default=100,
                        help="DM iterations per run of the accuracy check (default 100)")
    parser.add_argument("--ipc", type=int, default=10, help="synthetic images per class (default 10)")
    return parser


def load_reference(path: Path) -> ModuleType:
    """The reference's ``utils`` module (``get_network``, ``DiffAugment``, ``ParamDiffAug``)."""
    if not (path / "utils.py").is_file() or not (path / "networks.py").is_file():
        raise ConfigError(f"--reference {path}: no utils.py and networks.py there; clone "
                          "https://github.com/VICO-UoE/DatasetCondensation and pass its folder")
    import_torchvision()  # the reference imports torchvision; see ddcore.tvcompat
    sys.path.insert(0, str(path))  # utils.py imports networks.py by its bare name
    spec = importlib.util.spec_from_file_location("dc_reference_utils", path / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def embed(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference ConvNet's ``embed`` with ``reshape`` for its ``view``: on torch 2.13 a
    one-channel input can come back from the convolutions in channels-last strides, where
    ``view`` raises. Same values, same cost."""
    return net.features(x).reshape(x.shape[0], -1)


def reference_dm(ref: ModuleType, data: Dataset, start: torch.Tensor, ipc: int, iterations: int,
                 batch_real: int, seed: int) -> tuple[torch.Tensor, float]:
    """``main_DM.py``'s update step (ConvNet branch) ``iterations`` times from ``start``.

    The loop is the reference's, line for line (but :func:`embed`), with its own network,
    augmentation and optimiser settings; only the data come from the project (same tensors, same
    normalisation). Returns the images and the seconds per iteration.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    index = ClassIndex(data.y, data.num_classes)
    channel, height, width = data.image_shape
    image_syn = start.detach().clone().requires_grad_(True)
    optimizer_img = torch.optim.SGD([image_syn], lr=1.0, momentum=0.5)
    dsa_param = ref.ParamDiffAug()
    begin = time.perf_counter()
    for _ in range(iterations):
        net = ref.get_network("ConvNet", channel, data.num_classes, (height, width))
        net.train()
        for param in list(net.parameters()):
            param.requires_grad = False
        loss = torch.tensor(0.0)
        for c in range(data.num_classes):
            img_real = data.x[index.sample(c, batch_real, gen)]
            img_syn = image_syn[c * ipc:(c + 1) * ipc]
            aug_seed = int(time.time() * 1000) % 100000
            img_real = ref.DiffAugment(img_real, PAPER_STRATEGY, seed=aug_seed, param=dsa_param)
            img_syn = ref.DiffAugment(img_syn, PAPER_STRATEGY, seed=aug_seed, param=dsa_param)
            output_real = embed(net, img_real).detach()
            output_syn = embed(net, img_syn)
            loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
        optimizer_img.zero_grad()
        loss.backward()
        optimizer_img.step()
    return image_syn.detach(), (time.perf_counter() - begin) / max(iterations, 1)


def paper_config(ipc: int, iterations: int, seed: int, **changes) -> DistillConfig:
    """The papers' DM configuration as the project's settings (``changes`` override)."""
    return replace(DistillConfig(method="dm", ipc=ipc, iterations=iterations, batch_real=PAPER_BATCH_REAL,
                                 model=PAPER_MODEL, dsa_strategy=PAPER_STRATEGY, seed=seed), **changes)


VARIANTS = {  # the project's DM as it was before issue 15, and with today's defaults
    "project fp32, one pass": {"real_precision": "fp32", "embed_chunk": 1 << 30},
    "project defaults": {},
    "project defaults, dsa-mode one": {"dsa_mode": "one"},  # one DSA op per draw, as the reference
}


def project_dm(data: Dataset, start: Summary, cfg: DistillConfig) -> tuple[Summary, float]:
    """The project's DM from ``start``; returns the summary and seconds per iteration."""
    factory = model_factory(cfg.model, data.image_shape, data.num_classes)
    summary = distill(data, factory, cfg, init=start)
    return summary, summary.meta["distill-seconds"] / max(summary.meta["iterations-done"], 1)


def random_start(data: Dataset, ipc: int, seed: int) -> Summary:
    """``ipc`` random real images per class (the shared starting point), as a summary."""
    cfg = DistillConfig(method="random_real", ipc=ipc, seed=seed)
    return distill(data, model_factory(cfg.model, data.image_shape, data.num_classes), cfg)


def time_embedding(data: Dataset, batch_real: int, repeats: int) -> list[dict]:
    """Seconds to embed ``classes x batch_real`` real images with ConvNet-128, per chunk and dtype."""
    gen = torch.Generator().manual_seed(0)
    index = ClassIndex(data.y, data.num_classes)
    x = torch.cat([data.x[index.sample(c, batch_real, gen)] for c in range(data.num_classes)])
    net = model_factory(PAPER_MODEL, data.image_shape, data.num_classes)(gen).train()
    net.requires_grad_(False)
    dtypes = {"fp32": None, **({"bf16": torch.bfloat16} if native_bf16("cpu") else {})}
    rows = []
    for name, dtype in dtypes.items():
        for chunk in CHUNKS:
            size = chunk or x.shape[0]
            embed_frozen(net, x, size, dtype)  # warm-up
            times = []
            for _ in range(repeats):
                begin = time.perf_counter()
                embed_frozen(net, x, size, dtype)
                times.append(time.perf_counter() - begin)
            seconds = statistics.median(times)
            rows.append({"dtype": name, "chunk": size, "images": x.shape[0], "seconds": seconds})
            print(f"embedding {x.shape[0]} images, {name}, chunk {size}: {seconds:.3f} s", flush=True)
    return rows


def time_iterations(data: Dataset, ref: ModuleType | None,
                    args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per DM iteration of each variant, runs alternating A, B, C, A, B, C, ..."""
    start = random_start(data, args.ipc, 0)
    times: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        if ref is not None:
            _, seconds = reference_dm(ref, data, start.images, args.ipc, args.iterations, PAPER_BATCH_REAL,
                                      repeat)
            times.setdefault("reference main_DM.py", []).append(seconds)
            print(f"reference: {seconds:.3f} s/iteration", flush=True)
        for name, changes in VARIANTS.items():
            _, seconds = project_dm(data, start, paper_config(args.ipc, args.iterations, repeat, **changes))
            times.setdefault(name, []).append(seconds)
            print(f"{name}: {seconds:.3f} s/iteration", flush=True)
    return times


def accuracy_check(splits, ref: ModuleType | None, args: argparse.Namespace) -> dict[str, list[float]]:
    """Test accuracy after ``--accuracy-iterations`` from shared starts, per seed and variant."""
    default = run_preset("default")  # the project's evaluation: its ConvNet and trainer
    train_cfg = default.train
    factory = model_factory(default.distill.model, splits.train.image_shape, splits.train.num_classes)
    results: dict[str, list[float]] = {}

    def score(name: str, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
        _, metrics = train_and_evaluate(factory, images, labels, splits.test, train_cfg, seed)
        results.setdefault(name, []).append(metrics["accuracy"])
        print(f"seed {seed} {name}: {metrics['accuracy']:.4f}", flush=True)

    for seed in range(args.accuracy_seeds):
        start = random_start(splits.train, args.ipc, seed)
        score("random real (the start)", start.images, start.labels, seed)
        if ref is not None:
            images, _ = reference_dm(ref, splits.train, start.images, args.ipc, args.accuracy_iterations,
                                     PAPER_BATCH_REAL, seed)
            score("reference main_DM.py", images.clamp(*splits.train.pixel_bounds()), start.labels, seed)
        for name, changes in VARIANTS.items():
            summary, _ = project_dm(splits.train, start,
                                    paper_config(args.ipc, args.accuracy_iterations, seed, **changes))
            score(name, summary.images, summary.labels, seed)
    return results


def markdown(report: dict) -> str:
    lines = ["# Speed (python -m simulations.speed)", "",
             f"Dataset {report['dataset']}, ConvNet-128 instance norm, {PAPER_BATCH_REAL} real images per "
             f"class, IPC {report['ipc']}, DSA {PAPER_STRATEGY}.", "",
             "## Embedding one iteration's real images (no graph)", "",
             "| dtype | chunk | images | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['chunk']} | {r['images']} | {r['seconds']:.3f} |"
              for r in report["embedding"]]
    lines += ["", f"## Seconds per DM iteration ({report['iterations']} iterations per run, "
              f"{report['repeats']} alternating runs, median)", "", "| variant | s/iteration | runs |",
              "|---|---|---|"]
    for name, times in report["seconds_per_iteration"].items():
        lines.append(f"| {name} | {statistics.median(times):.3f} | {', '.join(f'{t:.3f}' for t in times)} |")
    for name, ratio in report["ratios"].items():
        lines.append(f"\n{name}: **{ratio:.2f}x**")
    if report["accuracy"]:
        lines += ["", f"## Test accuracy after {report['accuracy_iterations']} iterations from the same "
                  "start (the project's default trainer and ConvNet)", "",
                  "| variant | mean | std | per seed |", "|---|---|---|---|"]
        for name, accs in report["accuracy"].items():
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(f"| {name} | {statistics.mean(accs):.4f} | {std:.4f} | "
                         f"{', '.join(f'{a:.4f}' for a in accs)} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    if args.iterations < 1 or args.repeats < 1 or args.accuracy_seeds < 0 or args.accuracy_iterations < 1:
        raise ConfigError("--iterations, --repeats and --accuracy-iterations must be >= 1, "
                          "--accuracy-seeds >= 0")
    ref = load_reference(args.reference) if args.reference is not None else None
    if ref is None:
        print("no --reference: the reference rows are skipped", file=sys.stderr)
    splits = load_dataset(args.dataset, data_dir=args.data_dir)
    report = {"dataset": splits.train.name, "ipc": args.ipc, "iterations": args.iterations,
              "repeats": args.repeats, "accuracy_iterations": args.accuracy_iterations,
              "environment": environment("cpu"), "bf16_native": native_bf16("cpu")}
    report["embedding"] = time_embedding(splits.train, PAPER_BATCH_REAL, max(args.repeats, 3))
    report["seconds_per_iteration"] = times = time_iterations(splits.train, ref, args)
    medians = {name: statistics.median(t) for name, t in times.items()}
    report["ratios"] = {"project defaults / project fp32 one pass":
                        medians["project defaults"] / medians["project fp32, one pass"]}
    if ref is not None:
        report["ratios"]["project defaults / reference"] = (medians["project defaults"]
                                                            / medians["reference main_DM.py"])
    report["accuracy"] = accuracy_check(splits, ref, args) if args.accuracy_seeds else {}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "speed.json", json.dumps(report, indent=2).encode())
    atomic_write(args.out / "speed.md", markdown(report).encode())
    print(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ConfigError, OSError) as exc:
        return fail(exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
