"""Write an experiment's report.json, report.md and PNG plots into its output folder."""

from __future__ import annotations

import json
from pathlib import Path

from ddcore.files import atomic_write


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(report: dict) -> str:
    """The comparison table (and the verdict) as Markdown."""
    rows = ["| system | final acc (%) | best acc (%) | rounds | up (MiB) | down (MiB) | wall (s) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in report["methods"].items():
        rows.append(f"| {name} | {_pct(m['final_accuracy'])} | {_pct(m['best_accuracy'])} | {m['rounds']} "
                    f"| {_mb(m['bytes_up'])} | {_mb(m['bytes_down'])} | {m['wall_seconds']:.1f} |")
    lines = [f"# {report.get('title', 'feddistill report')}", "", *rows, ""]
    audited = {name: m["leakage"] for name, m in report["methods"].items() if m.get("leakage")}
    if audited:
        lines += ["Leakage (membership inference on the global model: loss-threshold attack, "
                  f"{next(iter(audited.values()))['mia_members']} clients' training examples vs as many "
                  "held-out ones; memorisation: fraction of pooled images nearer to a private than to a "
                  "held-out image, 0.5 = no sign):", "",
                  "| system | MIA AUC | TPR @ 1% FPR | TPR @ 0.1% FPR | LiRA AUC | closer to private |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, leak in audited.items():
            lira = leak.get("lira") or {}
            lines.append(f"| {name} | {_num(leak['mia_auc'])} | {_num(leak['mia_tpr_at_1pct_fpr'])} "
                         f"| {_num(leak['mia_tpr_at_0.1pct_fpr'])} | {_num(lira.get('auc'))} "
                         f"| {_num(leak['memorisation_closer_to_private'])} |")
        lines.append("")
    lines += [f"- {v}" for v in report.get("verdicts", [])]
    res = report.get("resources")
    if res:
        lines += ["", f"Whole run: {res['wall_seconds']:.0f} s wall, peak memory "
                  f"{res['peak_rss_mb']:.0f} MiB ({res['note']})."]
    lines += ["", "Bytes: Flower's `count_bytes()` of every record in every message "
              "(arrays as .npy buffers, plus config and metric entries), both directions, all clients."]
    rejected = [(name, c) for name, m in report["methods"].items() for c in m["clients"]
                if c["status"] in ("rejected", "failed")]
    if rejected:
        lines += ["", "## Rejected or failed clients", ""]
        lines += [f"- {name}, round {c['round']}, node {c['node_id']}: {c['status']} ({c['reason']})"
                  for name, c in rejected]
    return "\n".join(lines) + "\n"


def plot_history(report: dict, out: Path) -> None:
    """accuracy_vs_round.png and accuracy_vs_bytes.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, fname, xlabel in (("round", "accuracy_vs_round.png", "round"),
                               ("bytes_up_cum", "accuracy_vs_bytes.png", "cumulative uploaded MiB")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (name, m), marker in zip(report["methods"].items(), "os^vDP*X", strict=False):
            hist = m["history"]
            if not hist:
                continue
            xs = [h[key] / (2**20 if key != "round" else 1) for h in hist]
            size = 9 if len(hist) == 1 else 4  # one-shot systems are single points: make them visible
            ax.plot(xs, [100 * h["accuracy"] for h in hist], marker=marker, markersize=size,
                    fillstyle="none", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        if key != "round":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def write_report(out: Path, report: dict) -> None:
    """report.json, report.md and the history plots, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", json.dumps(report, indent=2, default=str).encode())
    atomic_write(out / "report.md", markdown(report).encode())
    plot_history(report, out)
