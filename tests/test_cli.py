"""The ddcore command line: outputs on success; one-line errors, exit 2, nothing written on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from ddcore.cli import main
from ddcore.runconfig import RunConfig, to_flat

ROOT = Path(__file__).resolve().parents[1]


def test_distill_writes_metrics_summary_and_picture(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        code = main(["distill", "--dataset", "digits", "--method", "dm", "--ipc", "2", "--preset", "quick",
                     "--out", str(out), "--quiet", "--threads", str(threads + 1)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["torch_threads"] == threads + 1  # --threads reached torch
    assert metrics["method"] == "dm" and metrics["ipc"] == 2 and metrics["dataset"] == "digits"
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["distill_seconds"] > 0
    assert 0.0 <= metrics["random_real_test_accuracy"] <= 1.0
    assert metrics["images"] == 20 and metrics["config"]["ipc"] == 2
    assert (out / "summary.pt").stat().st_size > 0 and (out / "synthetic.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left
    assert "importances" not in metrics and not (out / "importances.png").exists()  # IADD's only


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--method", "magic"], "unknown method 'magic'"),
    (["--ipc", "5000"], "ipc 5000 is larger than every class"),
    (["--dataset", "nowhere/x.npz"], "no such file"),
    (["--dataset", "cifar10"], "needs --data-dir"),
    (["--ipc", "0"], "ipc must be >= 1"),
    (["--init", "zeros"], "unknown init"),
    (["--threads", "-1"], "--threads must be >= 0"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message) -> None:
    out = tmp_path / "run"
    code = main(["distill", "--dataset", "digits", "--preset", "quick", "--quiet", "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_ddcore_never_imports_flower() -> None:
    code = ("import sys, ddcore, ddcore.cli, ddcore.partition, ddcore.runconfig; "
            "from ddcore.partition import partition_indices, PartitionSpec; import numpy as np; "
            "partition_indices(np.arange(20) % 2, PartitionSpec(num_partitions=2)); "
            "assert 'flwr' not in sys.modules, 'flwr imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_pyproject_run_config_equals_the_defaults() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert config == to_flat(RunConfig())


def test_iadd_reports_and_plots_its_learned_importances(tmp_path) -> None:
    out = tmp_path / "iadd"
    code = main(["distill", "--dataset", "digits", "--method", "iadd", "--ipc", "1", "--preset", "quick",
                 "--iterations", "4", "--mtt-syn-steps", "2", "--mtt-experts", "1",
                 "--mtt-expert-epochs", "5", "--iadd-lr-importance", "0.5", "--out", str(out), "--quiet",
                 "--no-baseline"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    weights = metrics["importances"]
    assert list(weights)[:2] == ["features.0.weight", "features.0.bias"]  # one per tensor, network order
    live = [w for w in weights.values() if w > 0]
    assert len(live) == len(weights) - metrics["pruned_tensors"]
    assert abs(sum(live) / len(live) - 1.0) < 1e-5  # mean 1 over the live tensors
    assert len(set(weights.values())) > 1  # learned: no longer all equal after 4 updates at step 0.5
    assert (out / "importances.png").stat().st_size > 0
