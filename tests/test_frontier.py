"""The accuracy-per-byte frontier: partition tokens, byte budgets, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from ddcore.errors import ConfigError
from ddcore.partition import PartitionSpec
from simulations.frontier import (
    WEIGHT_SYSTEMS,
    best_under,
    budgets,
    frontier_table,
    main,
    parse_partitions,
    verdict,
)


def test_partition_tokens_name_scheme_parameter_and_client_count() -> None:
    base = PartitionSpec(num_partitions=10, seed=3)
    parts = parse_partitions("dirichlet-0.1, classes-2,iid,dirichlet-0.5x100", base, (1, 10), (10,))
    assert [(p.spec.scheme, p.spec.num_partitions, p.ipcs) for p in parts] == [
        ("dirichlet", 10, (1, 10)), ("pathological", 10, (1, 10)), ("iid", 10, (1, 10)),
        ("dirichlet", 100, (10,))]
    assert parts[0].spec.alpha == 0.1 and parts[1].spec.classes_per_client == 2 and parts[3].spec.seed == 3
    for bad in ("dirichlet", "classes-two", "iid,iid", "shards-2"):
        with pytest.raises(ConfigError, match="--partitions"):
            parse_partitions(bad, base, (1,), (1,))


def test_the_table_names_the_most_accurate_system_within_each_budget() -> None:
    points = [
        {"family": "random_real", "system": "random_real", "dtype": "uint8", "ipc": 1, "bytes_up": 800,
         "accuracy": 0.50},
        {"family": "distill", "system": "dm", "dtype": "uint8", "ipc": 1, "bytes_up": 800, "accuracy": 0.60},
        {"family": "distill", "system": "dm", "dtype": "float32", "ipc": 1, "bytes_up": 3_200,
         "accuracy": 0.60},
        {"family": "fedavg", "system": "fedavg", "dtype": "float32", "round": 1, "bytes_up": 40_000,
         "accuracy": 0.55},
        {"family": "fedavg", "system": "fedavg", "dtype": "float32", "round": 2, "bytes_up": 80_000,
         "accuracy": 0.70},
    ]
    assert budgets(points) == [1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000]
    rows = {r["budget_bytes"]: r for r in frontier_table(points)}
    assert rows[1_000]["best"]["system"] == "dm" and rows[1_000]["fedavg"] is None
    assert rows[5_000]["best"]["bytes_up"] == 800  # equal accuracy: the cheaper point
    assert rows[50_000]["best"]["system"] == "dm" and rows[50_000]["fedavg"]["round"] == 1
    assert rows[100_000]["best"]["round"] == 2
    assert best_under(points, 799) is None


def test_a_tiny_frontier_measures_every_system_and_width_and_writes_its_report(tmp_path) -> None:
    out = tmp_path / "f"
    code = main(["--out", str(out), "--preset", "quick", "--dataset", "digits", "--clients", "3",
                 "--partitions", "dirichlet-1.0,iidx6", "--ipcs", "1,3", "--scale-ipcs", "1",
                 "--widths", "8,16", "--dtypes", "uint8,float32", "--fedavg-rounds", "2"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    runs = {(r["partition"], r["width"]): r for r in report["runs"]}
    assert set(runs) == {(p, w) for p in ("dirichlet-1.0", "iidx6") for w in (8, 16)}
    first, scale = runs[("dirichlet-1.0", 8)], runs[("iidx6", 8)]
    assert (first["clients"], scale["clients"]) == (3, 6) and len(first["client_sizes"]) == 3
    kinds = {(p["family"], p["dtype"], p.get("ipc"), p.get("round")) for p in first["points"]}
    assert kinds == {(f, d, i, None) for f in ("random_real", "distill") for d in ("float32", "uint8")
                     for i in (1, 3)} | {(s, "float32", None, r) for s in WEIGHT_SYSTEMS for r in (1, 2)}
    by = {(p["family"], p["dtype"], p.get("ipc")): p for p in first["points"]}
    for family in ("random_real", "distill"):  # uint8 saves ~3 bytes per pixel; more images cost more
        for ipc in (1, 3):
            pixels = by[(family, "uint8", ipc)]["images"] * 8 * 8
            saved = by[(family, "float32", ipc)]["bytes_up"] - by[(family, "uint8", ipc)]["bytes_up"]
            assert 2.5 * pixels < saved <= 3 * pixels
        assert by[(family, "float32", 1)]["bytes_up"] < by[(family, "float32", 3)]["bytes_up"]
        assert by[(family, "float32", 3)]["images"] > by[(family, "float32", 1)]["images"] >= 10
    for system in WEIGHT_SYSTEMS:
        fed = [p for p in first["points"] if p["family"] == system]
        assert 0 < fed[0]["bytes_up"] < fed[1]["bytes_up"] == 2 * fed[0]["bytes_up"]  # cumulative
    # a summary's bytes do not depend on the model; a round of weights grows with the width
    wide = runs[("dirichlet-1.0", 16)]
    wide_by = {(p["family"], p["dtype"], p.get("ipc"), p.get("round")): p for p in wide["points"]}
    assert wide_by[("distill", "uint8", 3, None)]["bytes_up"] == by[("distill", "uint8", 3)]["bytes_up"]
    narrow_round = next(p for p in first["points"] if p["family"] == "fedavg")["bytes_up"]
    assert wide_by[("fedavg", "float32", None, 1)]["bytes_up"] > 2 * narrow_round
    # FedAvgM's first round is FedAvg's (momentum starts at the first update); the second differs
    for width_run in (first, wide):
        acc = {(p["family"], p.get("round")): p["accuracy"] for p in width_run["points"]}
        assert acc[("fedavgm", 1)] == acc[("fedavg", 1)] and acc[("fedavgm", 2)] != acc[("fedavg", 2)]
    assert all(0.0 <= p["accuracy"] <= 1.0 for r in report["runs"] for p in r["points"])
    assert {p.get("ipc") for p in scale["points"] if "ipc" in p} == {1}
    assert (out / "frontier_dirichlet-1.0.png").stat().st_size > 0 and (out / "frontier_iidx6.png").exists()
    text = (out / "report.md").read_text()
    assert "## dirichlet-1.0, ConvNet-16" in text and "| budget (MiB) |" in text
    assert "Best distillation" in text
    summary = [line for line in text.splitlines() if line.startswith("| dirichlet-1.0 | ConvNet-")]
    assert len(summary) == 2  # the summary table: one row per (partition, width)


def test_resume_adds_runs_and_refuses_other_settings_or_an_overwrite(tmp_path, capsys) -> None:
    out = tmp_path / "f"
    base = ["--out", str(out), "--preset", "quick", "--dataset", "digits", "--clients", "3",
            "--partitions", "dirichlet-1.0", "--ipcs", "1"]
    assert main([*base, "--widths", "8", "--fedavg-rounds", "1", "--weight-systems", "fedavg"]) == 0
    first = (out / "report.json").read_bytes()
    # without --resume the report is not overwritten
    assert main([*base, "--widths", "8"]) == 2
    assert "--resume" in capsys.readouterr().err and (out / "report.json").read_bytes() == first
    # other settings (beyond width and rounds) are refused, the file untouched
    assert main([*base, "--widths", "16", "--resume", "--iterations", "3"]) == 2
    assert "iterations" in capsys.readouterr().err and (out / "report.json").read_bytes() == first
    # a wider model with another round count is added; the width-8 run is kept, not re-measured
    assert main([*base, "--widths", "8,16", "--resume", "--fedavg-rounds", "2",
                 "--weight-systems", "none"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [(r["width"], r["fedavg_rounds"]) for r in report["runs"]] == [(8, 1), (16, 2)]
    assert report["runs"][0] == json.loads(first)["runs"][0]
    assert not [p for p in report["runs"][1]["points"] if "round" in p] and len(report["invocations"]) == 2


def test_verdict_says_how_far_distillation_is_from_the_best_weights_and_where_they_catch_up() -> None:
    points = [
        {"family": "distill", "system": "dm", "dtype": "uint8", "ipc": 10, "bytes_up": 100, "accuracy": 0.80},
        {"family": "fedavg", "system": "fedavg", "dtype": "float32", "round": 1, "bytes_up": 1_000,
         "accuracy": 0.70},
        {"family": "fedavgm", "system": "fedavgm", "dtype": "float32", "round": 2, "bytes_up": 2_000,
         "accuracy": 0.82},
        {"family": "fedavgm", "system": "fedavgm", "dtype": "float32", "round": 3, "bytes_up": 3_000,
         "accuracy": 0.85},
    ]
    v = verdict(points, small_budget=2_000)
    assert v["best_weights"]["round"] == 3 and abs(v["gap_points"] - 5.0) < 1e-9
    assert abs(v["bytes_ratio"] - 100 / 3_000) < 1e-12
    assert v["weights_reach_distill"]["round"] == 2  # the cheapest weight point at >= 80%
    assert v["weights_win_small_budgets"] == [2_000]  # at 1,000 bytes distillation (80%) beats 70%


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys) -> None:
    for argv, message in ((["--partitions", "dirichlet-x"], "cannot read 'dirichlet-x'"),
                          (["--ipcs", "1,0"], "distinct positive integers"),
                          (["--widths", "0"], "distinct positive integers"),
                          (["--dtypes", "int4"], "--dtypes"),
                          (["--weight-systems", "fedsgd"], "--weight-systems"),
                          (["--fedavg-rounds", "0"], "fedavg-rounds >= 1"),
                          (["--ipcs", "1", "--partitions", "classes-1", "--set", "dp=true"], "non-DP")):
        out = tmp_path / "never"
        assert main(["--out", str(out), "--preset", "quick", "--dataset", "digits", *argv]) == 2
        assert message in capsys.readouterr().err and not out.exists()
