"""Write an experiment's report.json, report.md and PNG plots into its output folder."""

from __future__ import annotations

import json
from pathlib import Path

from ddcore.files import atomic_write, with_provenance


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def canary_bound_cell(row: dict) -> str:
    """The canary audit's epsilon lower bound, marked when it exceeds the accountant's epsilon."""
    bound = row.get("eps_lower_bound")
    if bound is None:
        return "-"
    if row.get("canary_bound_exceeds_epsilon"):
        return f"**{bound:.2f} > eps spent: DP BUG**"
    return f"{bound:.2f}"


def canary_guesses_cell(row: dict) -> str:
    """``guesses (right)`` of the canary bound, with the score that made it."""
    if row.get("canary_guesses") is None:
        return "-"
    return f"{row['canary_guesses']} ({row['canary_correct']}, {row['canary_score']})"


def canary_note(row: dict, beta: float | None) -> str:
    """What the canary columns mean for this run (count, confidence, the most it can certify)."""
    if row.get("canaries") is None:
        return "No canary audit (--canaries 0)."
    top = row.get("canary_max_certifiable")
    return (f"Canary audit (Steinke, Nasr & Jagielski 2023, one run): {row['canaries']} canaries (held-out "
            f"images, inverted, wrong label), {row['canaries_included']} of them put into the clients' "
            f"data; guesses from minus the global model's loss and (summaries) minus the distance to the "
            f"nearest synthetic image; eps lower bound at {100 * (1 - (beta or 0.05)):.0f}% confidence, "
            f"at most {_num(top)} certifiable with this setting even if every guess were right. "
            "A bound above 'eps spent' is a DP bug (docs/privacy_audit.md).")


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def near_copies_cell(view: dict | None) -> str:
    """Near-copies among the received images (count and share), or what the system sent instead."""
    if view is None:
        return "-"
    if view["kind"] != "images":
        return f"0 (sends {view['kind']})"
    return f"{view['near_copies']} of {view['received_images']} ({_share(view['near_copy_fraction'])})"


def dp_bound_cell(view: dict | None) -> str:
    """Whether every ROC point of the server-view attack sits under e^eps FPR + delta (DP rows)."""
    checked = ([view.get("dp_bound"), (view.get("total") or {}).get("dp_bound")]
               + [r.get("dp_bound") for r in view.get("per_client", [])] if view else [])
    if view is None or "dp_bound_holds" not in view or all(c is None for c in checked):
        return "-"  # no DP: there is no bound to check
    return "holds" if view["dp_bound_holds"] else "**VIOLATED**"


def leakage_table(report: dict) -> list[str]:
    """One row per system: accuracy, upload, epsilon, near-copies sent, the server-view attack, canaries.

    With a ``reference`` report (``--reference``), the accuracy each system gained or gave up.
    """
    methods = {n: m for n, m in report["methods"].items() if m.get("leakage")}
    if not methods:
        return []
    ref = (report.get("reference") or {}).get("accuracy", {})
    head = ("| system | acc (%) | " + ("vs reference (points) | " if ref else "")
            + "upload (MiB) | eps spent | near-copies sent | server-view attack | AUC | TPR @ 1% FPR "
            "| TPR @ 0.1% FPR | DP bound "
            "| canary eps lower bound |")
    rows = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for name, m in methods.items():
        leak, view = m["leakage"], m["leakage"].get("server_view")
        delta = ""
        if ref:
            before = ref.get(name)
            delta = ("- | " if before is None or m["final_accuracy"] is None
                     else f"{100 * (m['final_accuracy'] - before):+.2f} | ")
        attack = "-" if view is None else view["attack"]
        rows.append(f"| {name} | {_pct(m['final_accuracy'])} | {delta}{_mb(m['bytes_up'])} "
                    f"| {_num(leak.get('epsilon_spent'))} | {near_copies_cell(view)} | {attack} "
                    f"| {_num((view or {}).get('auc'))} | {_num((view or {}).get('tpr_at_1pct_fpr'))} "
                    f"| {_num((view or {}).get('tpr_at_0.1pct_fpr'))} | {dp_bound_cell(view)} "
                    f"| {canary_bound_cell(leak)} |")
    notes = ["Server view (an honest-but-curious server attacks what it received): images - near-copies of "
             "private records (L2 in pixels within the 1st percentile of private records' distances to their "
             "nearest other record) and a membership attack scoring every private record (members) and every "
             "held-out record (non-members) by minus its distance to the nearest received image; statistics "
             "- the tracing attack <phi(x) - mu_ref, mean_release - mu_ref> on each client's release (the "
             "most exposed client shown; the server's sum in report.json); weights - the change in each "
             "record's loss from the model a client received to the one it sent back (round 1 and the last; "
             "the most exposed client shown). DP bound: every ROC point under e^eps FPR + delta "
             "(Clopper-Pearson, 95%)."]
    for name, m in methods.items():
        view = m["leakage"].get("server_view") or {}
        if view.get("closest_png"):
            notes.append(f"Closest pairs of {name}: [{view['closest_png']}]({view['closest_png']}).")
    if ref:
        notes.append(f"Reference: {ref and report['reference']['path']} (commit "
                     f"{report['reference'].get('commit')}).")
    return ["## What the server sees", "", *rows, "", *notes, ""]


def markdown(report: dict) -> str:
    """The comparison table (and the verdict) as Markdown."""
    rows = ["| system | final acc (%) | best acc (%) | rounds | up (MiB) | down (MiB) | wall (s) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in report["methods"].items():
        rows.append(f"| {name} | {_pct(m['final_accuracy'])} | {_pct(m['best_accuracy'])} | {m['rounds']} "
                    f"| {_mb(m['bytes_up'])} | {_mb(m['bytes_down'])} | {m['wall_seconds']:.1f} |")
    lines = [f"# {report.get('title', 'feddistill report')}", "", *rows, "", *leakage_table(report)]
    audited = {name: m["leakage"] for name, m in report["methods"].items() if m.get("leakage")}
    if audited:
        lines += ["## The global model", "",
                  "Leakage (membership inference on the global model: loss-threshold attack, "
                  f"{next(iter(audited.values()))['mia_members']} clients' training examples vs as many "
                  "held-out ones; memorisation: fraction of pooled images nearer to a private than to a "
                  "held-out image, 0.5 = no sign):", "",
                  "| system | MIA AUC | TPR @ 1% FPR | TPR @ 0.1% FPR | LiRA AUC | closer to private "
                  "| eps spent | eps lower bound | canary guesses (right) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, leak in audited.items():
            lira = leak.get("lira") or {}
            lines.append(f"| {name} | {_num(leak['mia_auc'])} | {_num(leak['mia_tpr_at_1pct_fpr'])} "
                         f"| {_num(leak['mia_tpr_at_0.1pct_fpr'])} | {_num(lira.get('auc'))} "
                         f"| {_num(leak['memorisation_closer_to_private'])} "
                         f"| {_num(leak.get('epsilon_spent'))} | {canary_bound_cell(leak)} "
                         f"| {canary_guesses_cell(leak)} |")
        beta = report.get("audit", {}).get("canary_beta")
        lines += ["", canary_note(next(iter(audited.values())), beta), ""]
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
    atomic_write(out / "report.md", with_provenance(markdown(report), report).encode())
    plot_history(report, out)
