"""The statistics system's ridge head, chosen on a validation split: feature length, penalty, budget split.

    python -m simulations.statistics_choice --preset fmnist --out runs/statistics_choice

``statistics-head = "ridge"``: every client releases, once, the per-class sums, the counts and the
second moments of its records' features under ScatterNet + a frozen random projection to D dims
(model ``scatter``, :mod:`ddcore.scatter`); the server adds them and solves a ridge classifier
(:func:`privacy.statistics.ridge_head`). What this script measures, on a stratified validation
split carved from the training split (the test split is never read), partitioned among the
clients exactly as a federated run partitions the rest:

- D (``--dims``): the accuracy the features allow and the bytes a client sends,
  ``4 (K D + K + D (D + 1) / 2)``;
- without noise, the penalty ``ridge-lambda``;
- at each epsilon (``--epsilons``, delta from the preset), under both trust models - per-client DP
  (every client adds the whole noise; the server's sum carries N of them) and distributed DP
  under secure aggregation (every client adds 1/sqrt(N) of it; the sum carries one) - the
  moments' share of the sensitivity (:data:`privacy.class_release.MOMENT_WEIGHT`) and the
  penalty's noise term (:data:`privacy.statistics.NOISE_PENALTY`).

Every client's exact statistics are computed once per D with the clients' own code
(:func:`privacy.class_release.exact_statistics` in the public normalisation) and every variant
adds its noise to them with :func:`privacy.class_release.noisy_release`, as a client would. The
noise of one variant is one draw (seeded); the spread between draws is reported for the
chosen settings (``--draws``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ddcore.data import validation_split
from ddcore.files import environment
from ddcore.models import ModelSpec, model_factory
from ddcore.partition import partition_indices
from ddcore.runconfig import run_splits
from simulations.common import add_run_flags, fail, recorded_config, run_config, write_report

LAMBDAS = (1e-4, 1e-3, 1e-2)
MOMENT_WEIGHTS = (0.5, 1.0, 2.0)
NOISE_PENALTIES = (1.0, 1.25, 1.5, 2.0)
TRUST_MODELS = ("per-client", "distributed")


def accuracy(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """Share of validation records whose ridge score ``features @ weights.T`` peaks at their label."""
    return float(((features @ weights.T).argmax(1) == labels).float().mean())


def noisy_total(exact: list, sigma: float, trust: str, moment_weight: float, seed: int):
    """The server's sum of the clients' releases at noise multiplier ``sigma`` under ``trust``."""
    from privacy.class_release import ClassStatistics, noisy_release

    share = sigma if trust == "per-client" else sigma / math.sqrt(len(exact))
    releases = [noisy_release(e.sums, e.counts, max_norm=1.0, noise_multiplier=share,
                              generator=torch.Generator().manual_seed(seed * 1_000 + cid),
                              moments=e.moments, moment_weight=moment_weight)
                for cid, e in enumerate(exact)]
    return ClassStatistics.total(releases)


def measure_dim(dim: int, cfg, clients: list, validation, epsilons: list[float], draws: int) -> dict:
    """Every variant at feature length ``dim``: {"no-noise": ..., "eps=1/per-client": ...}."""
    from privacy.class_release import exact_statistics
    from privacy.single_release import calibrate_gaussian
    from privacy.statistics import bank_of, public_view, ridge_head

    spec = replace(cfg.distill.model, name="scatter", width=dim)
    distill = replace(cfg.distill, model=spec, bank_size=1)
    factory = model_factory(spec, validation.image_shape, validation.num_classes)
    bank = bank_of(factory, distill, validation.image_shape)
    start = time.perf_counter()
    exact = [exact_statistics(bank, public_view(part), moments=True) for part in clients]
    seconds = time.perf_counter() - start
    with torch.no_grad():
        features = torch.cat([bank.features(x) for x in public_view(validation).x.split(512)])
    k = validation.num_classes
    row: dict = {"upload_bytes_per_client": 4 * (k * dim + k + dim * (dim + 1) // 2),
                 "embed_seconds_all_clients": seconds, "variants": {}}
    plain = noisy_total(exact, 0.0, "per-client", 1.0, 0)
    for lam in LAMBDAS:
        row["variants"][f"no-noise/lambda={lam:g}"] = accuracy(features, validation.y, ridge_head(plain, lam))
    for eps in epsilons:
        sigma = calibrate_gaussian(target_epsilon=eps, delta=cfg.distill.dp.delta)
        for trust in TRUST_MODELS:
            for w in MOMENT_WEIGHTS:
                for p in NOISE_PENALTIES:
                    accs = [accuracy(features, validation.y,
                                     ridge_head(noisy_total(exact, sigma, trust, w, seed=d), 1e-3, p))
                            for d in range(draws)]
                    row["variants"][f"eps={eps:g}/{trust}/moment-weight={w:g}/noise-penalty={p:g}"] = (
                        sum(accs) / len(accs))
    print(f"D={dim}: {row['upload_bytes_per_client'] / 1024:.0f} KiB/client, embedded in {seconds:.0f} s; "
          f"best no-noise {max(v for k_, v in row['variants'].items() if k_.startswith('no-noise')):.4f}",
          flush=True)
    return row


def markdown(report: dict) -> str:
    lines = [f"# {report['title']}", "",
             "Validation accuracy (%) of the ridge head on the summed statistics; DP cells are the mean of "
             f"{report['draws']} noise draws. Upload: what one client sends (float32).", ""]
    for dim, row in report["dims"].items():
        kib = row["upload_bytes_per_client"] / 1024
        lines += [f"## D = {dim} ({kib:.0f} KiB per client; exact statistics of all clients in "
                  f"{row['embed_seconds_all_clients']:.0f} s, sequential)", "",
                  "| variant | validation acc (%) |", "|---|---:|"]
        lines += [f"| {k} | {100 * v:.2f} |" for k, v in row["variants"].items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.statistics_choice", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder for the report")
    parser.add_argument("--dims", default="256,384", help="feature lengths D to try (comma-separated)")
    parser.add_argument("--epsilons", default="1,0.5", help="per-client epsilons (comma-separated)")
    parser.add_argument("--draws", type=int, default=2, help="noise draws per DP cell (default 2)")
    parser.add_argument("--validation-fraction", type=float, default=0.1,
                        help="share of the training split held out for scoring (default 0.1)")
    add_run_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = run_config(args)
        dims = [int(d) for d in args.dims.split(",") if d]
        epsilons = [float(e) for e in args.epsilons.split(",") if e]
        if not dims or min(dims) < 1 or any(not e > 0 for e in epsilons) or args.draws < 1:
            raise ValueError("--dims takes positive integers, --epsilons positive numbers, --draws >= 1")
        ModelSpec(name="scatter", width=dims[0])
        splits = validation_split(run_splits(cfg).train, args.validation_fraction, seed=cfg.partition.seed)
    except ValueError as exc:
        return fail(exc)
    parts = partition_indices(splits.train.y.numpy(), cfg.partition)
    clients = [splits.train.subset(p) for p in parts]
    scheme = cfg.partition.scheme
    partition = scheme + (f" {cfg.partition.alpha:g}" if scheme == "dirichlet" else "")
    report = {"title": (f"Ridge head of the statistics system on a validation split ({cfg.dataset}, "
                        f"{len(clients)} clients, {partition}, {len(splits.test)} validation images)"),
              "config": recorded_config(args.preset, cfg), "environment": environment("cpu"),
              "draws": args.draws,
              "dims": {str(d): measure_dim(d, cfg, clients, splits.test, epsilons, args.draws) for d in dims}}
    write_report(args.out, report, markdown, lambda r, o: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
