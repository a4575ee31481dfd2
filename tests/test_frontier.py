"""The accuracy-per-byte frontier: partition tokens, byte budgets, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from ddcore.errors import ConfigError
from ddcore.partition import PartitionSpec
from simulations.frontier import best_under, budgets, frontier_table, main, parse_partitions


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


def test_a_tiny_frontier_measures_every_system_and_writes_its_report(tmp_path) -> None:
    out = tmp_path / "f"
    code = main(["--out", str(out), "--preset", "quick", "--dataset", "digits", "--clients", "3",
                 "--partitions", "dirichlet-1.0,iidx6", "--ipcs", "1,3", "--scale-ipcs", "1",
                 "--fedavg-rounds", "2", "--set", "model-width=8"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    first, scale = report["partitions"]
    assert (first["clients"], scale["clients"]) == (3, 6) and len(first["client_sizes"]) == 3
    kinds = {(p["family"], p["dtype"], p.get("ipc"), p.get("round")) for p in first["points"]}
    assert kinds == {(f, d, i, None) for f in ("random_real", "distill") for d in ("float32", "uint8")
                     for i in (1, 3)} | {("fedavg", "float32", None, 1), ("fedavg", "float32", None, 2)}
    by = {(p["family"], p["dtype"], p.get("ipc")): p for p in first["points"]}
    for family in ("random_real", "distill"):  # uint8 saves ~3 bytes per pixel; more images cost more
        for ipc in (1, 3):
            pixels = by[(family, "uint8", ipc)]["images"] * 8 * 8
            saved = by[(family, "float32", ipc)]["bytes_up"] - by[(family, "uint8", ipc)]["bytes_up"]
            assert 2.5 * pixels < saved <= 3 * pixels
        assert by[(family, "float32", 1)]["bytes_up"] < by[(family, "float32", 3)]["bytes_up"]
        assert by[(family, "float32", 3)]["images"] > by[(family, "float32", 1)]["images"] >= 10
    fed = [p for p in first["points"] if p["family"] == "fedavg"]
    assert 0 < fed[0]["bytes_up"] < fed[1]["bytes_up"] == 2 * fed[0]["bytes_up"]  # cumulative
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in first["points"])
    assert {p.get("ipc") for p in scale["points"] if p["family"] != "fedavg"} == {1}
    assert (out / "frontier_dirichlet-1.0.png").stat().st_size > 0 and (out / "frontier_iidx6.png").exists()
    assert "| budget (MiB) |" in (out / "report.md").read_text()


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys) -> None:
    for argv, message in ((["--partitions", "dirichlet-x"], "cannot read 'dirichlet-x'"),
                          (["--ipcs", "1,0"], "distinct positive integers"),
                          (["--ipcs", "1", "--partitions", "classes-1", "--set", "dp=true"], "non-DP")):
        out = tmp_path / "never"
        assert main(["--out", str(out), "--preset", "quick", "--dataset", "digits", *argv]) == 2
        assert message in capsys.readouterr().err and not out.exists()
