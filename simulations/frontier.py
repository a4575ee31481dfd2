"""Accuracy against uploaded bytes: for my clients, my model and my upload budget, which system?

    python -m simulations.frontier --preset fmnist --out runs/frontier

For every partition of ``--partitions`` and every model width of ``--widths`` the driver measures,
on the same clients:

- ``random_real`` and the distillation method of the run-config (``method``, DM by default):
  every client sends ``ipc`` images per class for every IPC of ``--ipcs``, encoded as each dtype
  of ``--dtypes`` (uint8 by default; float32 carries 4x the bytes for the same accuracy); the
  server decodes and checks them, pools them and trains a fresh model on them, as
  :class:`server.strategy.DistillStrategy` does;
- the weight-averaging systems of ``--weight-systems``: FedAvg, FedProx (``proximal-mu``) and
  FedAvgM (``server-momentum``), with the settings :func:`simulations.compare.plan_systems` gives
  them (mu and momentum chosen on a validation split), every client in every round for
  ``fedavg-rounds`` rounds, evaluated after every round.

Each point is (uploaded bytes summed over clients, test accuracy). A partition token is
``dirichlet-ALPHA``, ``classes-K`` (K classes per client) or ``iid``, optionally with ``xN`` for N
clients instead of ``--clients`` (``dirichlet-0.5x100``); such a scale point runs the IPCs of
``--scale-ipcs`` only. Everything runs in this process with the code the Flower apps call
(:func:`client.task.distill_local`, :func:`client.task.fedavg_local`, the server's validation,
pooling and training, FedAvg's example-weighted mean and FedAvgM's server momentum from
:mod:`simulations.recipes`), without a simulation's start-up; bytes are what the client's reply
would carry (``client.protocol``: the summary's arrays and wire meta, or the model's arrays).

report.json / report.md and one plot per partition (``frontier_<partition>.png``: log bytes on x,
one colour per system, one line style per width) are rewritten after every (partition, width)
run, so a stopped run keeps what it measured. ``--resume`` adds to the report already in
``--out`` (same settings apart from ``model-width`` and ``fedavg-rounds``, which each run records)
and skips the (partition, width) runs it holds, so a run too long for one sitting, or a cheaper
cut for the wider model, can be measured in parts. report.md names the best system under each
byte budget for every (partition, width).
"""

from __future__ import annotations

import argparse
import json
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
from ddcore.files import environment, provenance_line
from ddcore.methods.base import check_ipc
from ddcore.partition import PartitionSpec, partition_indices
from ddcore.runconfig import RunConfig, run_splits
from ddcore.settings import from_flat
from simulations.common import add_run_flags, fail, recorded_config, run_config

DEFAULT_PARTITIONS = "dirichlet-0.5,dirichlet-0.1,classes-2"
DEFAULT_IPCS = "1,10,50"
DEFAULT_WIDTHS = "32,128"
DTYPES = ("uint8", "float32")
WEIGHT_SYSTEMS = ("fedavg", "fedprox", "fedavgm")
SUMMARY_FAMILIES = ("distill", "random_real")
# the driver's budget on top of the preset: the weight-averaging curves to 20 rounds
FRONTIER_SETTINGS: dict[str, dict[str, str | int | float]] = {"fmnist": {"fedavg-rounds": 20}}
# settings a run of the report may change (each run records its own); all others must match to --resume
PER_RUN_KEYS = ("model-width", "fedavg-rounds")
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


def parse_names(text: str, flag: str, known: tuple[str, ...], allow_none: bool = False) -> tuple[str, ...]:
    """``"uint8,float32"`` -> the names in ``known``'s order; ``none`` -> () when ``allow_none``."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if allow_none and names == ["none"]:
        return ()
    unknown = [n for n in names if n not in known]
    if not names or unknown or len(set(names)) != len(names):
        extra = " or none" if allow_none else ""
        raise ConfigError(f"{flag} takes distinct names of {', '.join(known)}{extra}, got {text!r}")
    return tuple(n for n in known if n in names)


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


def summary_points(cfg: RunConfig, system: str, clients: list[Dataset], test: Dataset, ipc: int,
                   dtypes: tuple[str, ...] = ("uint8",)) -> list[dict]:
    """One summary system (``distill`` or ``random_real``) at one IPC: a point per wire dtype."""
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
    run = (replace(cfg, distill=random_real_config(distill), allow_near_copies=True)
           if system == "random_real" else replace(cfg, distill=distill))
    start = time.perf_counter()
    # the meta carries the client id, as a Flower client's reply does (its bytes count)
    summaries = [distill_local(data, run, num_classes, seed=client_seed(run, cid, 1))[0].with_meta(
        **{"client-id": cid}) for cid, data in enumerate(clients)]
    client_seconds = time.perf_counter() - start
    points = []
    for dtype in dtypes:
        contents = [protocol.summary_content(s, dtype, None, {}) for s in summaries]
        sent = sum(protocol.content_bytes(c) for c in contents)
        decoded = [validate(protocol.content_arrays(c[protocol.SUMMARY]), dict(c[protocol.META]), limits)
                   for c in contents]  # the server's checks and decoding
        pooled = concat(decoded, num_classes)
        start = time.perf_counter()
        model = train_global(run, pooled, test.image_shape, num_classes, global_seed(run, 1)).cpu().eval()
        points.append({"system": system if system == "random_real" else run.distill.method, "family": system,
                       "dtype": dtype, "ipc": ipc, "width": cfg.distill.model.width, "images": len(pooled),
                       "bytes_up": sent, "accuracy": evaluate(model, test)["accuracy"],
                       "client_seconds": client_seconds, "train_seconds": time.perf_counter() - start})
    return points


def weight_points(system: str, cfg: RunConfig, clients: list[Dataset], test: Dataset,
                  on_round: Callable[[int], None] | None = None) -> list[dict]:
    """A weight-averaging system over every client, one point per round (cumulative uploaded bytes,
    accuracy). ``cfg`` is the system's own (FedProx's mu, FedAvgM's momentum: ``plan_systems``);
    ``on_round(r)`` is called as round r starts (progress)."""
    from flwr.app import ArrayRecord

    from client.task import client_seed, fedavg_local
    from ddcore.train import evaluate
    from server.run import initial_model
    from simulations.recipes import ServerMomentum, average

    model = initial_model(cfg, test)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    momentum = ServerMomentum(cfg.server_momentum) if cfg.server_momentum > 0 else None
    sizes = [len(data) for data in clients]
    sent, points, start = 0, [], time.perf_counter()
    for server_round in range(1, cfg.fedavg_rounds + 1):
        if on_round is not None:
            on_round(server_round)
        states = [fedavg_local(data, cfg, test.num_classes, state, client_seed(cfg, cid, server_round))[0]
                  for cid, data in enumerate(clients)]
        sent += sum(ArrayRecord(s).count_bytes() for s in states)
        mean = average(states, sizes)
        state = momentum.step(state, mean) if momentum is not None else mean
        model.load_state_dict(state)
        points.append({"system": system, "family": system, "dtype": "float32", "round": server_round,
                       "width": cfg.distill.model.width, "bytes_up": sent,
                       "accuracy": evaluate(model.eval(), test)["accuracy"],
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
    """``dm uint8 IPC 10``, ``fedavgm round 7``."""
    if "round" in point:
        return f"{point['system']} round {point['round']}"
    return f"{point['system']} {point['dtype']} IPC {point['ipc']}"


def families(points: list[dict]) -> list[str]:
    """The families present, summaries first, then the weight-averaging systems."""
    present = {p["family"] for p in points}
    return [f for f in (*SUMMARY_FAMILIES, *WEIGHT_SYSTEMS) if f in present]


def best_under(points: list[dict], budget: float, family: str | tuple[str, ...] | None = None) -> dict | None:
    """The most accurate point (of ``family``) uploading at most ``budget`` bytes (fewer bytes on ties)."""
    wanted = (family,) if isinstance(family, str) else family
    fits = [p for p in points if p["bytes_up"] <= budget and (wanted is None or p["family"] in wanted)]
    return max(fits, key=lambda p: (p["accuracy"], -p["bytes_up"])) if fits else None


def frontier_table(points: list[dict]) -> list[dict]:
    """For each byte budget: the best system overall and the best of each family."""
    rows = []
    for b in budgets(points):
        row: dict = {"budget_bytes": b, "best": best_under(points, b)}
        for family in families(points):
            row[family] = best_under(points, b, family)
        rows.append(row)
    return rows


def verdict(points: list[dict], small_budget: int = 2**20) -> dict:
    """The question of the run in numbers: the best distillation point, the best weight-averaging
    point, how far apart they are, where a weight system first reached distillation's accuracy,
    and which budgets up to ``small_budget`` bytes a weight system wins."""
    distill = best_under(points, math.inf, "distill")
    weights = best_under(points, math.inf, WEIGHT_SYSTEMS)
    out: dict = {"best_distill": distill, "best_weights": weights, "small_budget_bytes": small_budget}
    if distill is None or weights is None:
        return out
    out["gap_points"] = 100 * (weights["accuracy"] - distill["accuracy"])
    out["bytes_ratio"] = distill["bytes_up"] / weights["bytes_up"]
    caught = [p for p in points if p["family"] in WEIGHT_SYSTEMS and p["accuracy"] >= distill["accuracy"]]
    out["weights_reach_distill"] = min(caught, key=lambda p: p["bytes_up"]) if caught else None
    out["weights_win_small_budgets"] = [
        row["budget_bytes"] for row in frontier_table(points)
        if row["budget_bytes"] <= small_budget and row["best"]["family"] in WEIGHT_SYSTEMS]
    return out


def model_name(width: int) -> str:
    return f"ConvNet-{width}"


def _cell(point: dict | None) -> str:
    return "-" if point is None else f"{100 * point['accuracy']:.2f} ({label(point)})"


def _mib(n: float) -> str:
    return f"{n / 2**20:.3g} MiB"


def verdict_lines(run: dict) -> list[str]:
    """The verdict of one (partition, width) run in sentences."""
    v = verdict(run["points"])
    d, w = v["best_distill"], v["best_weights"]
    if d is None or w is None:
        return []
    lines = [f"- Best distillation: {_cell(d)}, {_mib(d['bytes_up'])}. Best weight averaging within "
             f"{run['fedavg_rounds']} rounds: {_cell(w)}, {_mib(w['bytes_up'])}."]
    if v["gap_points"] <= 0:
        lines.append(f"- Distillation reaches the best weight-averaging accuracy "
                     f"({-v['gap_points']:.2f} points above it) with {v['bytes_ratio']:.3g}x its upload.")
    else:
        lines.append(f"- Distillation misses the best weight-averaging accuracy by "
                     f"{v['gap_points']:.2f} points (its upload is {v['bytes_ratio']:.3g}x that point's).")
    reach = v["weights_reach_distill"]
    reached = "never." if reach is None else (
        f"{label(reach)} with {_mib(reach['bytes_up'])} ({reach['bytes_up'] / d['bytes_up']:.3g}x "
        "distillation's upload).")
    lines.append(f"- Weight averaging first reaches distillation's {100 * d['accuracy']:.2f}%: {reached}")
    small = v["weights_win_small_budgets"]
    lines.append(f"- Budgets up to {_mib(v['small_budget_bytes'])} where a weight-averaging system is best: "
                 + (", ".join(_mib(b) for b in small) if small else "none") + ".")
    return lines


def summary_table(runs: list[dict]) -> list[str]:
    """One row per (partition, width): the best of each family and where weights catch up."""
    if not runs:
        return []
    lines = ["| partition | model | best distillation | best random real | best weight averaging "
             "(rounds run) | distillation - weights (points) | upload distillation / weights | weights "
             "first reach distillation |", "|---|---|---|---|---|---:|---:|---|"]
    for run in runs:
        v, pts = verdict(run["points"]), run["points"]
        rr = best_under(pts, math.inf, "random_real")
        d, w, reach = v["best_distill"], v["best_weights"], v.get("weights_reach_distill")

        def at(p: dict | None) -> str:
            return "-" if p is None else f"{_cell(p)}, {_mib(p['bytes_up'])}"

        gap = f"{-v['gap_points']:+.2f}" if "gap_points" in v else "-"
        ratio = f"{v['bytes_ratio']:.3g}x" if "bytes_ratio" in v else "-"
        lines.append(f"| {run['partition']} | {model_name(run['width'])} | {at(d)} | {at(rr)} | "
                     f"{at(w)} ({run['fedavg_rounds']}) | {gap} | {ratio} | "
                     f"{'never' if reach is None else label(reach) + ', ' + _mib(reach['bytes_up'])} |")
    return [*lines, ""]


def markdown(report: dict) -> str:
    """The report as Markdown: per (partition, width), the verdict, the frontier table and the points."""
    cfg = report["config"]
    lines = [f"# {report['title']}", "",
             f"Test split: {report['test_size']} images. Distillation method {cfg['method']}, "
             f"{cfg['iterations']} iterations; server training {cfg['train-epochs']} epochs (at least "
             f"{cfg['train-min-steps']} steps); weight averaging {cfg['local-epochs']} local epoch(s) per "
             f"round, every client every round. Bytes: every client's reply summed (upload only).", ""]
    lines += summary_table(report["runs"])
    for run in report["runs"]:
        lines += [f"## {run['partition']}, {model_name(run['width'])} ({run['clients']} clients; "
                  f"{run['seconds'] / 60:.1f} min)", "", *verdict_lines(run), ""]
        present = families(run["points"])
        lines += ["| budget (MiB) | best system: acc % | " + " | ".join(f"best {f}" for f in present) + " |",
                  "|---:|---|" + "---|" * len(present)]
        for row in run["frontier"]:
            best = row["best"]
            lines.append(f"| {row['budget_bytes'] / 2**20:.3g} | **{label(best)}: "
                         f"{100 * best['accuracy']:.2f}** | "
                         + " | ".join(_cell(row[f]) for f in present) + " |")
        lines += ["", "| system | dtype | IPC / round | images | uploaded (MiB) | acc (%) | client s / "
                  "weight-averaging s so far | server training s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for p in run["points"]:
            if "round" in p and p["round"] not in (1, 2, 5, 10, 20, 30, 50, run["fedavg_rounds"]):
                continue
            work = p.get("seconds", p.get("client_seconds"))
            train = f"{p['train_seconds']:.0f}" if "train_seconds" in p else "-"
            where = p.get("ipc", p.get("round"))
            lines.append(f"| {p['system']} | {p['dtype']} | {where} | {p.get('images', '-')} | "
                         f"{p['bytes_up'] / 2**20:.3f} | {100 * p['accuracy']:.2f} | {work:.0f} | {train} |")
        lines.append("")
    env = report["environment"]
    lines.append(f"Wall time {report['seconds'] / 60:.1f} min in all ({env['cpu_count']} CPUs, "
                 f"{env['torch_threads']} torch threads, device {env['device']}).")
    lines += ["", *(provenance_line({"environment": inv}) for inv in report["invocations"])]
    return "\n".join(lines) + "\n"


LINE_STYLES = ("-", "--", ":", "-.")


def plot(report: dict, partition: str, out: Path) -> None:
    """frontier_<partition>.png: accuracy against uploaded bytes (log x); one colour per system and
    dtype, one line style per model width (every width of the partition in one plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if r["partition"] == partition]
    widths = sorted({r["width"] for r in runs})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours: dict[str, str] = {}
    for run in runs:
        series: dict[str, list[dict]] = {}
        for p in run["points"]:
            name = p["system"] if "round" in p else f"{p['system']} {p['dtype']}"
            series.setdefault(name, []).append(p)
        for name, pts in series.items():
            colour = colours.setdefault(name, f"C{len(colours) % 10}")
            pts = sorted(pts, key=lambda p: p["bytes_up"])
            ax.plot([p["bytes_up"] / 2**20 for p in pts], [100 * p["accuracy"] for p in pts], color=colour,
                    marker="o" if "round" not in pts[0] else ".", markersize=4, fillstyle="none",
                    linestyle=LINE_STYLES[widths.index(run["width"]) % len(LINE_STYLES)],
                    label=f"{name}, {model_name(run['width'])}")
    ax.set_xscale("log")
    ax.set_xlabel("uploaded MiB, all clients (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{partition}, {runs[0]['clients']} clients: " + " vs ".join(model_name(w) for w in widths))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / f"frontier_{partition}.png", dpi=120)
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
    parser.add_argument("--widths", default=DEFAULT_WIDTHS,
                        help=f"ConvNet widths, one run per partition each (default {DEFAULT_WIDTHS})")
    parser.add_argument("--dtypes", default="uint8",
                        help=f"wire dtypes of the summaries, of {', '.join(DTYPES)} (default uint8)")
    parser.add_argument("--weight-systems", default=",".join(WEIGHT_SYSTEMS),
                        help=f"weight-averaging systems, of {', '.join(WEIGHT_SYSTEMS)}, or none "
                             f"(default all; curves to fedavg-rounds rounds)")
    parser.add_argument("--resume", action="store_true",
                        help="add to the report in --out, skipping the (partition, width) runs it holds")
    add_run_flags(parser)
    return parser


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in (*PER_RUN_KEYS, "preset")}


def previous_report(out: Path, resume: bool, config: dict) -> dict | None:
    """The report already in ``out`` when resuming (refused if its settings differ); an existing
    report without ``--resume`` is refused, so nothing measured is overwritten."""
    path = out / "report.json"
    if not path.exists():
        return None
    if not resume:
        raise ConfigError(f"{out} already holds a frontier report; pass --resume to add to it "
                          "or choose another --out")
    try:
        report = json.loads(path.read_text())
        runs = report["runs"]
        old = report["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume: cannot read the frontier report {path} ({exc!r})") from None
    if not isinstance(runs, list):
        raise ConfigError(f"--resume: {path} holds no list of runs")
    old, new = _comparable(old), _comparable(config)
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if differ:
        raise ConfigError(f"--resume: the report in {out} was measured with other settings "
                          f"({', '.join(differ)}); choose another --out")
    return report


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from ddcore.files import atomic_write
    from simulations.compare import plan_systems

    args = build_parser().parse_args(argv)
    try:
        cfg = run_config(args, FRONTIER_SETTINGS.get(args.preset))
        if cfg.distill.dp.enabled or cfg.summary_kind != "images" or cfg.rounds != 1 or cfg.collaborative:
            raise ConfigError("the frontier compares non-DP one-shot image summaries with weight averaging; "
                              "leave dp, summary-kind, rounds and collaborative at their defaults")
        ipcs = parse_ints(args.ipcs, "--ipcs")
        widths = parse_ints(args.widths, "--widths")
        dtypes = parse_names(args.dtypes, "--dtypes", DTYPES)
        weight_systems = parse_names(args.weight_systems, "--weight-systems", WEIGHT_SYSTEMS, allow_none=True)
        if weight_systems and cfg.fedavg_rounds < 1:
            raise ConfigError("--weight-systems needs fedavg-rounds >= 1 (or pass --weight-systems none)")
        partitions = parse_partitions(args.partitions, cfg.partition, ipcs, parse_ints(args.scale_ipcs,
                                                                                      "--scale-ipcs"))
        configs = {w: from_flat({"model-width": w}, base=cfg) for w in widths}  # bad widths fail now
        config = recorded_config(args.preset, cfg)
        report = previous_report(args.out, args.resume, config)
        splits = run_splits(cfg)
        clients_of = {p.name: client_parts(splits.train, p.spec) for p in partitions}  # bad splits fail now
        for p in partitions:  # a class short of ipc sends what it has; an ipc no class can fill is refused
            for cid, data in enumerate(clients_of[p.name]):
                check_ipc(replace(data, name=f"{p.name} client {cid}"), max(p.ipcs))
    except ValueError as exc:
        return fail(exc)

    env = environment(cfg.distill.device)
    if report is None:
        report = {"title": f"feddistill frontier: accuracy vs uploaded bytes ({cfg.dataset})",
                  "config": config, "test_size": len(splits.test), "environment": env, "runs": [],
                  "invocations": [], "seconds": 0.0}
    report["invocations"] = [*report.get("invocations", []), env]
    done = {(r["partition"], r["width"]) for r in report["runs"]}
    todo = [(p, w) for p in partitions for w in widths if (p.name, w) not in done]
    skipped = len(partitions) * len(widths) - len(todo)
    if skipped:
        print(f"--resume: {skipped} (partition, width) run(s) already in {args.out / 'report.json'}",
              file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    before, start = report["seconds"], time.perf_counter()
    jobs = sum(2 * len(p.ipcs) + len(weight_systems) for p, _ in todo)
    with tqdm(total=jobs, desc="frontier", unit="job", file=sys.stderr, dynamic_ncols=True) as bar:
        for part, width in todo:
            clients, run = clients_of[part.name], replace(configs[width], partition=part.spec)
            tag = f"{part.name} {model_name(width)}"
            run_start, points = time.perf_counter(), []
            for ipc in part.ipcs:
                for family in SUMMARY_FAMILIES[::-1]:  # random real first: the baseline
                    bar.set_postfix_str(f"{tag} {family} ipc {ipc}")
                    points += summary_points(run, family, clients, splits.test, ipc, dtypes)
                    bar.update()
            for system in plan_systems(run, list(weight_systems)):
                def show(r: int, name: str = f"{tag} {system.name}", total: int = run.fedavg_rounds) -> None:
                    bar.set_postfix_str(f"{name} round {r}/{total}")

                points += weight_points(system.name, system.cfg, clients, splits.test, show)
                bar.update()
            report["runs"].append({
                "partition": part.name, "width": width, "clients": part.spec.num_partitions,
                "scheme": part.spec.scheme, "alpha": part.spec.alpha,
                "classes_per_client": part.spec.classes_per_client, "fedavg_rounds": run.fedavg_rounds,
                "weight_systems": list(weight_systems), "ipcs": list(part.ipcs), "dtypes": list(dtypes),
                "client_sizes": [len(c) for c in clients], "points": points,
                "frontier": frontier_table(points), "seconds": time.perf_counter() - run_start,
                "commit": env["commit"]})
            report["seconds"] = before + time.perf_counter() - start
            atomic_write(args.out / "report.json", json.dumps(report, indent=2, default=str).encode())
            atomic_write(args.out / "report.md", markdown(report).encode())
            plot(report, part.name, args.out)
    report["seconds"] = before + time.perf_counter() - start
    atomic_write(args.out / "report.json", json.dumps(report, indent=2, default=str).encode())
    atomic_write(args.out / "report.md", markdown(report).encode())
    for name in dict.fromkeys(r["partition"] for r in report["runs"]):
        plot(report, name, args.out)
    print(markdown(report))
    print(f"report: {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
