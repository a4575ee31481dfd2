"""What one edge client costs (time, memory, bytes) and what each compact summary form is worth.

    python -m simulations.edge_profile --out runs/edge_profile

Runs in-process, without Flower's transport or Ray: every client's partition is distilled
with the code the ClientApp runs (:func:`client.task.distill_local`), its reply content is
built and counted as the ClientApp builds it (:func:`client.protocol.summary_content`,
:func:`client.protocol.content_bytes`), and the server side validates, pools and trains
exactly as :class:`server.strategy.DistillStrategy` does. Each compact form (summary dtype
x resolution) encodes the *same* distilled summaries, so accuracy differences come from the
encoding alone. Writes report.json and report.md into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from client import protocol
from client.task import client_seed, distill_local
from ddcore.data import DataSplits
from ddcore.errors import ConfigError
from ddcore.files import atomic_write, environment
from ddcore.partition import partition_indices
from ddcore.runconfig import RunConfig
from ddcore.settings import add_settings, settings_from_args
from ddcore.summary import STORED_DTYPES, Summary, concat
from ddcore.train import evaluate
from server.ledger import Ledger
from server.strategy import DistillStrategy, global_seed
from server.validation import SummaryLimits, validate
from simulations.common import check_partitions, fail, recorded_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.edge_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder for the report")
    parser.add_argument("--client", type=int, default=0, help="the partition id profiled (default 0)")
    parser.add_argument("--resolution", type=int, default=14,
                        help="the reduced side in pixels, beside full resolution (default 14)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--pool-iterations", type=int, default=0,
                        help="distillation iterations of the other clients, whose summaries only fill "
                             "the server's pool (0 = the run's iterations; fewer saves time)")
    add_settings(parser)  # --preset and --set, e.g. --set dataset=digits num-clients=3
    return parser


def parse_config(args: argparse.Namespace) -> RunConfig:
    """The preset with ``--set`` applied; checks ``--client`` and ``--resolution``."""
    cfg = settings_from_args(args)
    if not 0 <= args.client < cfg.partition.num_partitions:
        raise ConfigError(f"--client {args.client} is outside 0..{cfg.partition.num_partitions - 1}")
    if args.resolution < 1 or args.threads < 0 or args.pool_iterations < 0:
        raise ConfigError("--resolution must be >= 1, --threads and --pool-iterations >= 0")
    return cfg


def distill_clients(cfg: RunConfig, splits: DataSplits, first: int,
                    pool_iterations: int = 0) -> tuple[list[Summary], list[dict]]:
    """Distill every client's partition as the ClientApp does; ``first`` first, in a fresh process.

    The other clients use ``pool_iterations`` iterations when it is > 0.
    """
    others = replace(cfg, distill=replace(cfg.distill, iterations=pool_iterations or cfg.distill.iterations))
    parts = partition_indices(splits.train.y.numpy(), cfg.partition)
    order = [first] + [i for i in range(len(parts)) if i != first]
    summaries: dict[int, Summary] = {}
    costs: dict[int, dict] = {}
    for cid in order:
        data = splits.train.subset(parts[cid])
        seed = client_seed(cfg, cid, server_round=1)  # the ClientApp's seed in round 1
        run = cfg if cid == first else others
        summary, m = distill_local(data, run, splits.train.num_classes, seed)
        summaries[cid] = summary.with_meta(**{"client-id": cid, "server-round": 1})
        costs[cid] = {"client_id": cid, "examples": len(data), "images": len(summary),
                      "iterations": run.distill.iterations,
                      "seconds": m.seconds, "peak_rss_mb": m.peak_rss_mb}
    return [summaries[i] for i in range(len(parts))], [costs[i] for i in range(len(parts))]


def profile_forms(cfg: RunConfig, splits: DataSplits, summaries: list[Summary], client: int,
                  resolution: int) -> list[dict]:
    """For each dtype x resolution: the profiled client's wire bytes and the server model's accuracy."""
    test = splits.test
    limits = SummaryLimits.for_data(test.image_shape, test.num_classes, cfg.max_images, test.pixel_bounds())
    server = DistillStrategy(cfg, limits, Ledger())
    full = test.image_shape[-1]
    rows = []
    for res in [None] + ([resolution] if resolution < full else []):
        for dtype in STORED_DTYPES:
            start = time.perf_counter()
            contents = [protocol.summary_content(s, dtype, res, {"num-examples": 0}) for s in summaries]
            encode = (time.perf_counter() - start) / len(summaries)
            decoded = [validate(protocol.content_arrays(c[protocol.SUMMARY]), dict(c[protocol.META]), limits)
                       for c in contents]
            model = server.train_global(concat(decoded, test.num_classes), seed=global_seed(cfg, 1))
            result = evaluate(model, test)
            rows.append({
                "dtype": dtype, "resolution": res or full,
                "bytes_on_wire": protocol.content_bytes(contents[client]),
                "array_bytes": protocol.array_bytes(contents[client]),
                "all_clients_bytes": sum(protocol.content_bytes(c) for c in contents),
                "encode_ms": 1000 * encode,
                "accuracy": result["accuracy"],
            })
    return rows


def markdown(report: dict) -> str:
    """The table of compact forms, with the client's cost above it."""
    c = report["profiled_client"]
    base = report["forms"][0]["bytes_on_wire"]
    lines = [
        "# Edge profile: one client, each compact summary form", "",
        f"Client {c['client_id']} of {report['config']['num-clients']} ({report['config']['dataset']}, "
        f"{c['examples']} private examples, {report['config']['method']} ipc {report['config']['ipc']}, "
        f"{report['config']['iterations']} iterations): distillation took **{c['seconds']:.1f} s**, "
        f"peak process RSS **{c['peak_rss_mb']:.0f} MiB**, {c['images']} synthetic images.", "",
        "| summary dtype | resolution | bytes on the wire | array bytes | vs float32 full "
        "| server accuracy (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["forms"]:
        lines.append(f"| {r['dtype']} | {r['resolution']} | {r['bytes_on_wire']:,} | {r['array_bytes']:,} "
                     f"| {r['bytes_on_wire'] / base:.2f}x | {100 * r['accuracy']:.2f} |")
    lines += ["", *report["notes"], "", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        cfg = parse_config(args)
        splits = check_partitions(cfg)
    except ValueError as exc:
        return fail(exc)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    summaries, costs = distill_clients(cfg, splits, args.client, args.pool_iterations)
    forms = profile_forms(cfg, splits, summaries, args.client, args.resolution)
    report = {
        "title": "feddistill edge profile",
        "config": recorded_config(args.preset, cfg),
        "environment": environment(cfg.distill.device),
        "profiled_client": costs[args.client],
        "clients": costs,
        "forms": forms,
        "wall_seconds": time.perf_counter() - start,
        "notes": [
            "- Run in-process (no Flower transport, no Ray): the ClientApp's distillation and reply "
            "encoding, the server's validation, pooling and training, called directly.",
            f"- Time and peak memory: `ddcore.profile.measure` around client {args.client}'s distillation, "
            "distilled first in a fresh process; memory is the whole process's resident set (Python, "
            "torch, the loaded dataset), sampled every 20 ms.",
            "- Bytes on the wire: `client.protocol.content_bytes` of the reply content (Flower's "
            "`count_bytes()`: arrays as .npy buffers incl. headers, plus metadata and metrics); array "
            "bytes: the raw payload (sum of nbytes).",
            f"- Accuracy: a fresh server model trained on all {cfg.partition.num_partitions} clients' "
            "summaries, each encoded in that form and expanded by the server, on the test split; the "
            "same distilled summaries and seeds for every form.",
            *([f"- The other clients were distilled with {args.pool_iterations} iterations "
               f"(--pool-iterations) to save time; client {args.client} with {cfg.distill.iterations}."]
              if args.pool_iterations else []),
        ],
        "command": "python -m simulations.edge_profile " + " ".join(argv),
    }
    atomic_write(args.out / "report.json", json.dumps(report, indent=2).encode())
    atomic_write(args.out / "report.md", markdown(report).encode())
    print(markdown(report))
    print(f"report: {args.out / 'report.json'} ({report['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
