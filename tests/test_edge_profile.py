"""The edge profile counts the bytes each compact form really sends and trains a working server model."""

from __future__ import annotations

import json

import numpy as np

from simulations.edge_profile import main

ARGS = ["--preset", "quick", "--set", "dataset=digits", "num-clients=3", "ipc=2", "train-min-steps=100",
        "--resolution", "4", "--threads", "1", "--pool-iterations", "5"]


def test_edge_profile_reports_cost_bytes_and_accuracy_per_form(tmp_path) -> None:
    assert main(["--out", str(tmp_path), *ARGS]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert "| uint8 | 4 |" in (tmp_path / "report.md").read_text()
    client = report["profiled_client"]
    assert client["client_id"] == 0 and client["seconds"] > 0 and client["peak_rss_mb"] > 0
    n = client["images"]
    assert n > 0 and [c["iterations"] for c in report["clients"]] == [10, 5, 5]

    forms = {(f["dtype"], f["resolution"]): f for f in report["forms"]}
    assert sorted(forms) == sorted((d, r) for d in ("float32", "float16", "uint8") for r in (8, 4))
    for (dtype, res), f in forms.items():
        # images at that dtype and side, int64 labels, plus uint8's 2-float image range
        extra = 8 if dtype == "uint8" else 0
        assert f["array_bytes"] == n * (res * res * np.dtype(dtype).itemsize + 8) + extra
        assert f["bytes_on_wire"] > f["array_bytes"]  # .npy headers, metadata, metrics
        assert f["all_clients_bytes"] > f["bytes_on_wire"]
    for res in (8, 4):
        sizes = [forms[(d, res)]["bytes_on_wire"] for d in ("float32", "float16", "uint8")]
        assert sizes == sorted(sizes, reverse=True)
    assert forms[("float32", 8)]["accuracy"] > 0.2  # chance is 0.1: the pooled summaries trained a model


def test_edge_profile_refuses_bad_input(tmp_path, capsys) -> None:
    assert main(["--out", str(tmp_path), *ARGS, "--client", "3"]) == 2
    assert "--client 3 is outside 0..2" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--set", "summary-dtype=int4"]) == 2
    assert "unknown summary-dtype" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()
