"""Accuracy against uploaded bytes: for an upload budget, which system?

    python -m simulations.frontier --preset fmnist --out runs/frontier

For every partition of ``--partitions`` the driver measures three families of systems on the
same clients:

- ``random_real`` and the distillation method of the run-config (``method``, DM by default):
  every client sends ``ipc`` images per class for every IPC of ``--ipcs``, encoded as float32
  and as uint8 (the server trains on what it decodes); the server pools the summaries and trains
  a fresh model on them, as :class:`server.strategy.DistillStrategy` does;
- ``fedavg``: FedAvg over every client for ``fedavg-rounds`` rounds, evaluated after every round.

Each point is (uploaded bytes summed over clients, test accuracy). A partition token is
``dirichlet-ALPHA``, ``classes-K`` (K classes per client) or ``iid``, optionally with ``xN`` for N
clients instead of ``--clients`` (``dirichlet-0.5x100``); such a scale point runs the IPCs of
``--scale-ipcs`` only. Everything runs in this process with the code the Flower apps call
(:func:`client.task.distill_local`, :func:`client.task.fedavg_local`, the server's pooling and
training, FedAvg's example-weighted mean), without a simulation's start-up; bytes are what the
client's reply would carry (``client.protocol``: the summary's arrays and wire meta, or the model's
arrays). The test split is the run's. report.json / report.md and one plot per partition
(``frontier_<partition>.png``, log bytes on x) are rewritten after every partition, so a stopped
run keeps what it measured; the table names the best system under each byte budget.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ddcore.data import Dataset
from ddcore.errors import ConfigError
from ddcore.files import environment
from ddcore.methods.base import check_ipc
from ddcore.partition import PartitionSpec, partition_indices
from ddcore.runconfig import RunConfig, run_splits
from simulations.common import add_run_flags, fail, recorded_config, run_config

DEFAULT_PARTITIONS = "dirichlet-0.5,dirichlet-0.1,classes-2,dirichlet-0.5x100"
DEFAULT_IPCS = "1,2,5,10,20,50"
DTYPES = ("float32", "uint8")
# the driver's budget on top of the preset: FedAvg up to 50 rounds (the horizon)
FRONTIER_SETTINGS: dict[str, dict[str, str | int | float]] = {"fmnist": {"fedavg-rounds": 50}}
_TOKEN = re.compile(r"^(?:(dirichlet)-(\d+(?:\.\d+)?)|(classes)-(\d+)|(iid))(?:x(\d+))?$")


@dataclass(frozen=True)
class Partition:
    """One partition of the frontier: its token, how the data is split, and the IPCs it runs."""

    name: str
    spec: PartitionSpec
    ipcs: tuple[int, ...]


def parse_ints(text: str, flag: str) -> tuple[int, ...]:
    """``"1,2,5"`` -> (1, 2, 5); positive, distinct, sorted."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise ConfigError(f"{flag} takes distinct positive integers, got {text!r}")
    return tuple(sorted(values))


def parse_partitions(text: str, base: PartitionSpec, ipcs: tuple[int, ...],
                     scale_ipcs: tuple[int, ...]) -> list[Partition]:
    """The partitions of ``--partitions`` (see the module docstring), with ``base``'s seed."""
    out = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        match = _TOKEN.match(token)
        if not match:
            raise ConfigError(f"--partitions: cannot read {token!r}; use dirichlet-ALPHA, classes-K or iid, "
                              "optionally followed by xN for N clients (dirichlet-0.5x100)")
        dirichlet, alpha, classes, k, _, n = match.groups()
        clients = int(n) if n else base.num_partitions
        if dirichlet:
            spec = replace(base, scheme="dirichlet", alpha=float(alpha), num_partitions=clients)
        elif classes:
            spec = replace(base, scheme="pathological", classes_per_client=int(k), num_partitions=clients)
        else:
            spec = replace(base, scheme="iid", num_partitions=clients)
        out.append(Partition(token, spec, scale_ipcs if n else ipcs))
    if not out or len({p.name for p in out}) != len(out):
        raise ConfigError(f"--partitions takes distinct partition tokens, got {text!r}")
    return out


def client_parts(train: Dataset, spec: PartitionSpec) -> list[Dataset]:
    """The clients' data, partitioned exactly as a Flower client partitions it (client.task.local_data)."""
    parts = partition_indices(train.y.numpy(), spec)
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(f"clients {empty} of {spec.scheme} x {spec.num_partitions} received no examples")
    return [train.subset(torch.as_tensor(p)) for p in parts]


def summary_points(cfg: RunConfig, system: str, clients: list[Dataset], test: Dataset,
                   ipc: int) -> list[dict]:
    """One distillation-kind system at one IPC: its float32 and uint8 points."""
    from client import protocol
    from client.task import client_seed, distill_local
    from ddcore.summary import concat
    from ddcore.train import evaluate
    from server.strategy import global_seed, train_global
    from server.validation import SummaryLimits, validate
    from simulations.compare import random_real_config

    num_classes = test.num_classes
    limits = SummaryLimits.for_data(test.image_shape, num_classes, cfg.max_images, test.pixel_bounds())
    distill = replace(cfg.distill, ipc=ipc)
    run = replace(cfg, distill=random_real_config(distill) if system == "random_real" else distill)
    start = time.perf_counter()
    # the meta carries the client id, as a Flower client's reply does (its bytes count)
    summaries = [distill_local(data, run, num_classes, seed=client_seed(run, cid, 1))[0].with_meta(
        **{"client-id": cid}) for cid, data in enumerate(clients)]
    client_seconds = time.perf_counter() - start
    points = []
    for dtype in DTYPES:
        contents = [protocol.summary_content(s, dtype, None, {}) for s in summaries]
        sent = sum(protocol.content_bytes(c) for c in contents)
        decoded = [validate(protocol.content_arrays(c[protocol.SUMMARY]), dict(c[protocol.META]), limits)
                   for c in contents]  # the server's checks and decoding
        pooled = concat(decoded, num_classes)
        start = time.perf_counter()
        model = train_global(run, pooled, test.image_shape, num_classes, global_seed(run, 1)).cpu().eval()
        points.append({"system": system if system == "random_real" else run.distill.method, "family": system,
                       "dtype": dtype, "ipc": ipc, "images": len(pooled), "bytes_up": sent,
                       "accuracy": evaluate(model, test)["accuracy"], "client_seconds": client_seconds,
                       "train_seconds": time.perf_counter() - start})
    return points


def fedavg_points(cfg: RunConfig, clients: list[Dataset], test: Dataset,
                  on_round: Callable[[int], None] | None = None) -> list[dict]:
    """FedAvg over every client, one point per round (cumulative uploaded bytes, accuracy);
    ``on_round(r)`` is called as round r starts (progress)."""
    from flwr.app import ArrayRecord

    from client.task import client_seed, fedavg_local
    from ddcore.train import evaluate
    from server.run import initial_model
    from simulations.recipes import average

    model = initial_model(cfg, test)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sent, points, start = 0, [], time.perf_counter()
    for server_round in range(1, cfg.fedavg_rounds + 1):
        if on_round is not None:
            on_round(server_round)
        states = [fedavg_local(data, cfg, test.num_classes, state, client_seed(cfg, cid, server_round))[0]
                  for cid, data in enumerate(clients)]
        sent += sum(ArrayRecord(s).count_bytes() for s in states)
        state = average(states, [len(data) for data in clients])
        model.load_state_dict(state)
        points.append({"system": "fedavg", "family": "fedavg", "dtype": "float32", "round": server_round,
                       "bytes_up": sent, "accuracy": evaluate(model.eval(), test)["accuracy"],
                       "seconds": time.perf_counter() - start})
    return points


def budgets(points: list[dict]) -> list[int]:
    """Byte budgets 1, 2, 5 x 10^k from the smallest point's bytes to the largest's."""
    lo, hi = min(p["bytes_up"] for p in points), max(p["bytes_up"] for p in points)
    out: list[int] = []
    k = math.floor(math.log10(lo))
    while not out or out[-1] < hi:
        for m in (1, 2, 5):
            if m * 10**k >= lo and (not out or out[-1] < hi):
                out.append(m * 10**k)
        k += 1
    return out


def label(point: dict) -> str:
    """``dm uint8 IPC 10``, ``fedavg round 7``."""
    if point["family"] == "fedavg":
        return f"fedavg round {point['round']}"
    return f"{point['system']} {point['dtype']} IPC {point['ipc']}"


def best_under(points: list[dict], budget: int, family: str | None = None) -> dict | None:
    """The most accurate point (of ``family``) uploading at most ``budget`` bytes (fewer bytes on ties)."""
    fits = [p for p in points if p["bytes_up"] <= budget and (family is None or p["family"] == family)]
    return max(fits, key=lambda p: (p["accuracy"], -p["bytes_up"])) if fits else None


def frontier_table(points: list[dict]) -> list[dict]:
    """For each byte budget: the best system overall and the best of each family."""
    rows = []
    for b in budgets(points):
        row: dict = {"budget_bytes": b, "best": best_under(points, b)}
        for family in ("distill", "random_real", "fedavg"):
            row[family] = best_under(points, b, family)
        rows.append(row)
    return rows


def _cell(point: dict | None) -> str:
    return "-" if point is None else f"{100 * point['accuracy']:.2f} ({label(point)})"


def markdown(report: dict) -> str:
    """The report as Markdown: per partition, the frontier table and the points' times."""
    cfg = report["config"]
    lines = [f"# {report['title']}", "",
             f"Test split: {report['test_size']} images. Distillation method {cfg['method']}, "
             f"{cfg['iterations']} iterations; server training {cfg['train-epochs']} epochs (at least "
             f"{cfg['train-min-steps']} steps); FedAvg {cfg['local-epochs']} local epoch(s) per round, "
             f"model {cfg['model']}. Bytes: every client's reply summed (upload only).", ""]
    for part in report["partitions"]:
        lines += [f"## {part['name']} ({part['clients']} clients; {part['seconds'] / 60:.1f} min)", "",
                  "| budget (MiB) | best system: acc % | best distillation | best random real "
                  "| best FedAvg |",
                  "|---:|---|---|---|---|"]
        for row in part["frontier"]:
            best = row["best"]
            lines.append(f"| {row['budget_bytes'] / 2**20:.3g} | **{label(best)}: "
                         f"{100 * best['accuracy']:.2f}** | {_cell(row['distill'])} | "
                         f"{_cell(row['random_real'])} | {_cell(row['fedavg'])} |")
        lines += ["", "| system | dtype | IPC / round | images | uploaded (MiB) | acc (%) | client s (both "
                  "dtypes) / FedAvg s so far | server training s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for p in part["points"]:
            if p["family"] == "fedavg" and p["round"] not in (1, 2, 5, 10, 20, 30, 50, cfg["fedavg-rounds"]):
                continue
            work = p.get("seconds", p.get("client_seconds"))
            train = f"{p['train_seconds']:.0f}" if "train_seconds" in p else "-"
            where = p.get("ipc", p.get("round"))
            lines.append(f"| {p['system']} | {p['dtype']} | {where} | {p.get('images', '-')} | "
                         f"{p['bytes_up'] / 2**20:.3f} | {100 * p['accuracy']:.2f} | {work:.0f} | {train} |")
        lines.append("")
    env = report["environment"]
    lines.append(f"Wall time {report['seconds'] / 60:.1f} min ({env['cpu_count']} CPUs, "
                 f"{env['torch_threads']} torch threads, device {env['device']}).")
    return "\n".join(lines) + "\n"


def plot(part: dict, out: Path) -> None:
    """frontier_<partition>.png: accuracy against uploaded bytes (log x), one line per system and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[dict]] = {}
    for p in part["points"]:
        name = "fedavg" if p["family"] == "fedavg" else f"{p['system']} {p['dtype']}"
        series.setdefault(name, []).append(p)
    for (name, pts), marker in zip(series.items(), "os^vDP*X", strict=False):
        pts = sorted(pts, key=lambda p: p["bytes_up"])
        ax.plot([p["bytes_up"] / 2**20 for p in pts], [100 * p["accuracy"] for p in pts], marker=marker,
                markersize=4, fillstyle="none", label=name, linestyle="--" if "uint8" in name else "-")
    ax.set_xscale("log")
    ax.set_xlabel("uploaded MiB, all clients (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{part['name']}, {part['clients']} clients")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"frontier_{part['name']}.png", dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulations.frontier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder for the report")
    parser.add_argument("--partitions", default=DEFAULT_PARTITIONS,
                        help=f"comma-separated partition tokens (default {DEFAULT_PARTITIONS})")
    parser.add_argument("--ipcs", default=DEFAULT_IPCS,
                        help=f"images per class per client (default {DEFAULT_IPCS})")
    parser.add_argument("--scale-ipcs", default="10",
                        help="the IPCs of partitions with xN clients (default 10)")
    add_run_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from ddcore.files import atomic_write

    args = build_parser().parse_args(argv)
    try:
        cfg = run_config(args, FRONTIER_SETTINGS.get(args.preset))
        if cfg.distill.dp.enabled or cfg.summary_kind != "images" or cfg.rounds != 1:
            raise ConfigError("the frontier compares non-DP one-shot image summaries with FedAvg; "
                              "leave dp, summary-kind and rounds at their defaults")
        ipcs = parse_ints(args.ipcs, "--ipcs")
        partitions = parse_partitions(args.partitions, cfg.partition, ipcs, parse_ints(args.scale_ipcs,
                                                                                      "--scale-ipcs"))
        splits = run_splits(cfg)
        clients_of = {p.name: client_parts(splits.train, p.spec) for p in partitions}  # bad splits fail now
        for p in partitions:  # a class short of ipc sends what it has; an ipc no class can fill is refused
            for cid, data in enumerate(clients_of[p.name]):
                check_ipc(replace(data, name=f"{p.name} client {cid}"), max(p.ipcs))
    except ValueError as exc:
        return fail(exc)
    import json

    args.out.mkdir(parents=True, exist_ok=True)
    report = {"title": f"feddistill frontier: accuracy vs uploaded bytes ({cfg.dataset})",
              "config": recorded_config(args.preset, cfg), "test_size": len(splits.test),
              "environment": environment(cfg.distill.device), "partitions": [], "seconds": 0.0}
    start = time.perf_counter()
    jobs = sum(2 * len(p.ipcs) + 1 for p in partitions)
    with tqdm(total=jobs, desc="frontier", unit="job", file=sys.stderr, dynamic_ncols=True) as bar:
        for part in partitions:
            clients, run = clients_of[part.name], replace(cfg, partition=part.spec)
            part_start, points = time.perf_counter(), []
            for ipc in part.ipcs:
                for system in ("random_real", "distill"):
                    bar.set_postfix_str(f"{part.name} {system} ipc {ipc}")
                    points += summary_points(run, system, clients, splits.test, ipc)
                    bar.update()
            def show(r: int, name: str = part.name, total: int = run.fedavg_rounds) -> None:
                bar.set_postfix_str(f"{name} fedavg round {r}/{total}")

            points += fedavg_points(run, clients, splits.test, show)
            bar.update()
            entry = {"name": part.name, "clients": part.spec.num_partitions, "scheme": part.spec.scheme,
                     "alpha": part.spec.alpha, "classes_per_client": part.spec.classes_per_client,
                     "client_sizes": [len(c) for c in clients], "points": points,
                     "frontier": frontier_table(points), "seconds": time.perf_counter() - part_start}
            report["partitions"].append(entry)
            report["seconds"] = time.perf_counter() - start
            atomic_write(args.out / "report.json", json.dumps(report, indent=2, default=str).encode())
            atomic_write(args.out / "report.md", markdown(report).encode())
            plot(entry, args.out)
    print(markdown(report))
    print(f"report: {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
