"""DP-FedAvg tuning: a grid scored on a validation split carved from the training data."""

from __future__ import annotations

import json

import pytest

from ddcore.errors import ConfigError
from simulations.tune_dp_fedavg import main, parse_grid

TINY = ["--preset", "quick", "--dataset", "digits", "--num-clients", "2", "--validation", "300",
        "--set", "model=mlp", "model-width=16", "fedavg-rounds=1", "local-batch-size=64", "delta=1e-4"]


def test_the_grid_is_the_product_of_the_listed_values() -> None:
    assert parse_grid("local-lr=0.1,0.5 max-grad-norm=1") == [
        {"local-lr": "0.1", "max-grad-norm": "1"}, {"local-lr": "0.5", "max-grad-norm": "1"}]
    for bad, words in (("local-lr", "KEY=V1,V2"), ("lr=0.1", "no run-config key"),
                       ("local-lr=0.1 local-lr=0.2", "distinct"), ("", "empty"),
                       ("partition=pathological", "--partition"), ("local-lr=0.1 alpha=0.1", "--alpha")):
        with pytest.raises(ConfigError, match=words):
            parse_grid(bad)


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "tune"
    assert main([*TINY[:-1], "delta=0.1", "--grid", "local-lr=0.1", "--out", str(out)]) == 2
    assert "delta 0.1 >= 1/n" in capsys.readouterr().err
    assert main([*TINY, "--grid", "local-lr=-1", "--out", str(out)]) == 2
    assert "local-lr must be > 0" in capsys.readouterr().err
    assert main([*TINY, "--validation", "5000", "--grid", "local-lr=0.1", "--out", str(out)]) == 2
    assert "--validation must be in 1..1437" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.usefixtures("one_thread")
def test_every_point_runs_the_dp_recipe_and_is_ranked_on_validation(tmp_path) -> None:
    out = tmp_path / "tune"
    assert main([*TINY, "--epsilon", "2", "--grid", "local-lr=0.01,0.3", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert sorted(r["point"]["local-lr"] for r in rows) == ["0.01", "0.3"]
    assert rows[0]["val_accuracy"] >= rows[1]["val_accuracy"] and report["best"] == rows[0]["point"]
    assert all(1.9 <= r["epsilon_spent"] <= 2.0 and r["noise_multiplier"] > 0 for r in rows)
    assert report["validation"] == 300 and "| rank |" in (out / "report.md").read_text()
    assert report["points_done"] == "2 of 2"


@pytest.mark.usefixtures("one_thread")
def test_a_stopped_grid_keeps_the_points_it_measured(tmp_path, monkeypatch) -> None:
    import simulations.recipes

    real, calls = simulations.recipes.fedavg_recipe, []

    def recipe_that_stops(cfg, features=None):
        calls.append(cfg)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops the grid during its second point
        return real(cfg, features)

    monkeypatch.setattr(simulations.recipes, "fedavg_recipe", recipe_that_stops)
    out = tmp_path / "tune"
    with pytest.raises(KeyboardInterrupt):
        main([*TINY, "--epsilon", "2", "--grid", "local-lr=0.01,0.3", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert report["points_done"] == "1 of 2"
    assert [r["point"] for r in report["rows"]] == [{"local-lr": "0.01"}]
