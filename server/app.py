"""The Flower ServerApp of ``flwr run``: federated distillation, reported like ``compare``."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from ddcore.files import environment
from ddcore.plots import plot_summary
from ddcore.runconfig import from_flat, run_splits, to_flat
from server.report import write_report
from server.run import run_distillation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run-config once, run the distillation rounds, write the report."""
    cfg = from_flat(dict(context.run_config))
    cfg.check_sends_no_record()  # before any client is asked for anything
    splits = run_splits(cfg)
    result = run_distillation(grid, cfg, splits.test)
    out = Path(cfg.out_dir)
    report = {"title": "feddistill (flwr run)", "config": to_flat(cfg),
              "environment": environment(cfg.distill.device),
              "methods": {result.name: result.to_dict()}}
    write_report(out, report)
    if result.pooled is not None:
        plot_summary(result.pooled, splits.test, out / "pooled_summary.png")
    final = report["methods"][result.name]["final_accuracy"]
    log(INFO, "final accuracy %s; report in %s", final, out.resolve())
