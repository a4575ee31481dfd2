"""Which distillation design the main job ships: measured on a validation split, with what it leaks.

    python -m simulations.main_job_choice --preset default --out runs/main_job_choice

A validation split (``--validation-fraction``, 20% by default; stratified, seeded) is carved
from the training split; the rest is partitioned among the clients exactly as a federated run
partitions it. Every candidate runs
the clients' own code (:func:`client.task.distill_local`, :func:`client.task.release_statistics`)
one client after another in this process (no Flower, no Ray: the same computation, cheaper to
repeat), the server pools the summaries (or sums the releases and synthesises the global summary,
:func:`privacy.statistics.global_summary`) and trains the global model with the run's recipe; the
score is the accuracy on the validation images, never the test split. Beside it: the near-copy
share of what the server received (against the whole private set) and the nearest-image
membership attack's TPR at 0.1% FPR (:mod:`privacy.attacks.server_view`).

``--candidates`` names them as ``label:key=value;key=value`` (run-config keys), comma-separated
(default :data:`CANDIDATES`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ddcore.data import validation_split
from ddcore.devicedata import DataSpec
from ddcore.files import environment
from ddcore.partition import partition_indices
from ddcore.runconfig import RunConfig, from_flat, run_splits
from ddcore.train import evaluate
from simulations.common import add_run_flags, fail, recorded_config, run_config, write_report

CANDIDATES = ("dm-real:init=real;allow-near-copies=true,"
              "dm-noise-lr1:init=noise;lr-images=1,"
              "dm-noise-lr3:init=noise;lr-images=3,"
              "dm-noise-lr10:init=noise;lr-images=10,"
              "dm-noise-lr30:init=noise;lr-images=30,"
              "statistics:summary-kind=statistics,"
              "statistics-ipc30:summary-kind=statistics;ipc=30,"
              "random-real:method=random_real;allow-near-copies=true")


def parse_candidates(text: str) -> dict[str, dict[str, str]]:
    """``"a:k=v;k=v,b:k=v"`` -> {label: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        label, _, body = part.partition(":")
        pairs = [kv.split("=", 1) for kv in body.split(";") if kv]
        if not label or any(len(kv) != 2 for kv in pairs) or label in out:
            raise ValueError(f"--candidates takes distinct 'label:key=value;key=value' items; got {part!r}")
        out[label] = dict(pairs)
    return out


def run_candidate(cfg: RunConfig, clients: list, spec: DataSpec, validation, private) -> dict:
    """One candidate's federated run, computed in this process: accuracy, leakage, time."""
    from client.task import distill_local, release_statistics
    from ddcore.summary import concat
    from privacy.attacks.server_view import image_view
    from server.strategy import train_global

    start = time.perf_counter()
    if cfg.summary_kind == "statistics":
        from ddcore.models import model_factory
        from privacy.class_release import ClassStatistics
        from privacy.statistics import bank_of, feature_dim, global_summary, read_statistics, ridge_model

        factory = model_factory(cfg.distill.model, spec.image_shape, spec.num_classes, cfg.distill.device)
        bank = bank_of(factory, cfg.distill, spec.image_shape)
        ridge = cfg.statistics_head == "ridge"
        releases = []
        for cid, part in enumerate(clients):
            arrays, meta, _, _ = release_statistics(part, cfg, spec.num_classes, seed=cid)
            releases.append(read_statistics(arrays, meta, cfg.distill, num_classes=spec.num_classes,
                                            dim=feature_dim(bank, spec.image_shape), moments=ridge))
        upload = sum(4 * v.numel() for v in (releases[0].sums, releases[0].counts, releases[0].moments)
                     if v is not None)
        total = ClassStatistics.total(releases)
        client_seconds = time.perf_counter() - start
        server_start = time.perf_counter()
        if ridge:
            model = ridge_model(total, factory, cfg.distill, cfg.ridge_lambda)
            return {"validation_accuracy": evaluate(model, validation)["accuracy"], "images": 0,
                    "client_seconds": client_seconds, "server_seconds": time.perf_counter() - server_start,
                    "upload_bytes_per_client": upload}
        pooled = global_summary(total, bank, cfg.distill, spec, seed=0)
        received = None
    else:
        summaries = [distill_local(part, cfg, spec.num_classes, seed=cid)[0]
                     for cid, part in enumerate(clients)]
        client_seconds = time.perf_counter() - start
        server_start = time.perf_counter()
        pooled = concat(summaries, spec.num_classes)
        received = pooled.images
    model = train_global(cfg, pooled, spec.image_shape, spec.num_classes, seed=1009)
    accuracy = evaluate(model, validation)["accuracy"]
    row = {"validation_accuracy": accuracy, "images": len(pooled), "client_seconds": client_seconds,
           "server_seconds": time.perf_counter() - server_start}
    if received is not None:
        view = image_view(received, private, validation)
        row.update(near_copy_fraction=view["near_copy_fraction"], auc=view["auc"],
                   tpr_at_0_1pct_fpr=view["tpr_at_0.1pct_fpr"])
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.main_job_choice", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder for the report")
    parser.add_argument("--candidates", default=CANDIDATES, help="label:key=value;... items, comma-separated")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="share of the training split held out for scoring (default 0.2)")
    add_run_flags(parser)
    return parser


def markdown(report: dict) -> str:
    rows = ["| candidate | settings | validation acc (%) | images | near-copies sent | NN-MIA TPR @ 0.1% FPR "
            "| clients (s, sequential) | server (s) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in report["candidates"].items():
        near = "-" if r.get("near_copy_fraction") is None else f"{100 * r['near_copy_fraction']:.1f}%"
        tpr = "-" if r.get("tpr_at_0_1pct_fpr") is None else f"{r['tpr_at_0_1pct_fpr']:.3f}"
        settings = "; ".join(f"{k}={v}" for k, v in r["settings"].items())
        upload = r.get("upload_bytes_per_client")
        images = r["images"] if upload is None else f"0 ({upload / 1024:.0f} KiB/client)"
        rows.append(f"| {label} | {settings} | {100 * r['validation_accuracy']:.2f} | {images} | {near} "
                    f"| {tpr} | {r['client_seconds']:.0f} | {r['server_seconds']:.0f} |")
    return "\n".join([f"# {report['title']}", "", *rows, "",
                      "Statistics candidates send no image (the server synthesises from noise): their "
                      "near-copy and NN-MIA cells are '-' (their tracing attack is in the compare "
                      "report)."]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        base = run_config(args)
        candidates = {label: (kv, from_flat(kv, base=base))
                      for label, kv in parse_candidates(args.candidates).items()}
    except ValueError as exc:
        return fail(exc)
    try:
        splits = validation_split(run_splits(base).train, args.validation_fraction, seed=base.partition.seed)
    except ValueError as exc:
        return fail(exc)
    parts = partition_indices(splits.train.y.numpy(), base.partition)
    clients = [splits.train.subset(p) for p in parts]
    spec = DataSpec.of(splits.train)
    results = {}
    for label, (kv, cfg) in candidates.items():
        print(f"candidate {label}: {kv}", flush=True)
        results[label] = {"settings": kv, **run_candidate(cfg, clients, spec, splits.test, splits.train)}
        print(f"  {results[label]}", flush=True)
    title = (f"Main-job design on a validation split ({base.dataset}, {len(clients)} clients, "
             f"{len(splits.test)} validation images)")
    report = {"title": title,
              "config": recorded_config(args.preset, base), "environment": environment(base.distill.device),
              "candidates": results}
    write_report(args.out, report, markdown, lambda r, o: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
