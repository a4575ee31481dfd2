"""Real Flower simulations (Ray backend) of 3 clients: every kind of reply, and the compare driver."""

from __future__ import annotations

import pytest
import torch

from ddcore.runconfig import from_flat, run_preset
from simulations.common import System, check_partitions, run_in_simulation
from simulations.compare import FEDAVGM_MOMENTUM, FEDPROX_MU, plan_systems
from simulations.compare import main as compare_main

DIGITS_3 = {"dataset": "digits", "num-clients": 3, "min-clients": 3, "fedavg-rounds": 0}
SEED_METHODS = {"dd": {"method": "dd", "soft-labels": "learned"}, "mtt": {"method": "mtt", "multires": 0.5},
                "iadd": {"method": "iadd", "residual-alpha": 0.5, "residual-every": 1,
                         "allow-near-copies": True}}  # residual mixing pastes real patches in


@pytest.mark.slow
def test_one_simulation_runs_every_kind_of_client_reply() -> None:
    """One Ray simulation (its start-up costs more than these tiny runs) serves every system below."""
    quick = run_preset("quick")
    rounds = from_flat({**DIGITS_3, "ipc": 2, "rounds": 2, "fedavg-rounds": 1}, base=quick)
    seeds = from_flat({**DIGITS_3, "ipc": 1, "iterations": 3, "syn-steps": 2, "mtt-syn-steps": 2,
                       "mtt-experts": 1, "mtt-expert-epochs": 2, "mtt-max-start": 1, "mtt-expert-span": 1},
                      base=quick)
    stats = from_flat({**DIGITS_3, "ipc": 2, "iterations": 20, "summary-kind": "statistics", "bank-size": 2},
                      base=quick)
    dp_stats = from_flat({"dp": True, "target-epsilon": 4.0, "init": "noise"}, base=stats)
    weights = from_flat({"fedavg-rounds": 2}, base=rounds)
    systems = [System("distill", "distill", rounds), System("fedavg", "fedavg", rounds),
               *(System(s.name + "-2", "fedavg", s.cfg)
                 for s in plan_systems(weights, ["fedavg", "fedprox", "fedavgm"])),
               *(System(name, "distill", from_flat(flat, base=seeds)) for name, flat in SEED_METHODS.items()),
               System("statistics", "distill", stats), System("dp-statistics", "distill", dp_stats)]
    splits = check_partitions(rounds)
    assert all(s.cfg.partition == rounds.partition for s in systems)  # one federation, same clients
    results = run_in_simulation(rounds, splits.test, systems)

    three_client_rounds_count_the_bytes_actually_sent(results, splits.test.image_shape)
    every_seed_method_runs_in_the_flower_client_through_the_run_config(results)
    statistics_clients_release_once_and_the_server_distills_from_their_sum(results)
    flowers_fedprox_and_fedavgm_run_the_same_clients_and_count_the_same_bytes(results, rounds)


def three_client_rounds_count_the_bytes_actually_sent(results: dict, image_shape: tuple) -> None:
    distill = results["distill"]
    first = [e for e in distill.ledger.entries if e.round == 1]
    second = [e for e in distill.ledger.entries if e.round == 2]
    assert sorted(e.client_id for e in first) == sorted(e.client_id for e in second) == [0, 1, 2]
    assert all(e.status == "accepted" for e in first + second)
    c, h, w = image_shape
    for e in first + second:
        # float32 images plus int64 labels: exactly the summary's array bytes
        assert e.array_bytes_up == e.images * (c * h * w * 4 + 8)
        assert e.bytes_up > e.array_bytes_up  # plus .npy headers, metadata and metrics
        assert e.seconds > 0 and e.peak_mb > 0
    # round 1 sends only the config; round 2 (iterative) also sends the global weights
    assert all(b.bytes_down > a.bytes_down + 1000 for a, b in zip(first, second, strict=True))
    assert len(distill.pooled) == sum(e.images for e in second)  # newest summary per client
    assert [h["round"] for h in distill.ledger.history] == [1, 2]
    assert distill.ledger.history[0]["bytes_up_cum"] == sum(e.bytes_up for e in first)
    assert distill.ledger.history[1]["bytes_up_cum"] == sum(e.bytes_up for e in first + second)

    fedavg = results["fedavg"].ledger
    model_bytes = fedavg.entries[0].array_bytes_up
    assert model_bytes > 0 and all(e.array_bytes_up == model_bytes for e in fedavg.entries)
    assert len(fedavg.history) == 1


def flowers_fedprox_and_fedavgm_run_the_same_clients_and_count_the_same_bytes(results: dict, cfg) -> None:
    from server.run import initial_model

    splits = check_partitions(cfg)
    start = initial_model(cfg, splits.test).state_dict()
    model_bytes = sum(v.numpy().nbytes for v in start.values())
    finals = {}
    for name in ("fedavg-2", "fedprox-2", "fedavgm-2"):
        res = results[name]
        entries = res.ledger.entries
        assert [e.round for e in entries] == [1, 1, 1, 2, 2, 2], name
        assert all(e.status == "accepted" and e.array_bytes_up == model_bytes for e in entries), name
        assert all(e.bytes_down > model_bytes for e in entries), name  # the global weights go down
        assert [h["round"] for h in res.ledger.history] == [1, 2], name
        finals[name] = res.final_state
    # FedProx's clients received proximal-mu and applied it: every weight stays nearer the start
    drift = {name: sum(float(((s[k] - start[k]) ** 2).sum()) for k in start) for name, s in finals.items()}
    assert FEDPROX_MU > 0 and drift["fedprox-2"] < drift["fedavg-2"], drift
    # FedAvgM's round 2 adds momentum * round 1's update: a different model from FedAvg's mean
    assert FEDAVGM_MOMENTUM > 0 and drift["fedavgm-2"] != drift["fedavg-2"], drift


def every_seed_method_runs_in_the_flower_client_through_the_run_config(results: dict) -> None:
    for name in SEED_METHODS:
        res = results[name]
        assert [e.status for e in res.ledger.entries] == ["accepted"] * 3, name
        assert len(res.pooled) == sum(e.images for e in res.ledger.entries) > 0
        assert 0.0 <= res.ledger.history[-1]["accuracy"] <= 1.0
    assert results["dd"].pooled.soft and not results["mtt"].pooled.soft  # learned labels travel
    assert not torch.equal(results["mtt"].pooled.images, results["iadd"].pooled.images)


def statistics_clients_release_once_and_the_server_distills_from_their_sum(results: dict) -> None:
    for name in ("statistics", "dp-statistics"):
        res = results[name]
        entries = res.ledger.entries
        assert [e.status for e in entries] == ["accepted"] * 3, name
        dim = res.pooled.meta["bank-size"] * 16 * 2 * 2  # quick: width 16; 8x8 pools to 4x4, then 2x2
        # what travels: float32 sums (10, D) and counts (10,), nothing else
        assert all(e.array_bytes_up == 10 * (dim + 1) * 4 and e.images == 0 for e in entries), name
        assert res.pooled.labels.tolist() == [k for k in range(10) for _ in range(2)], name
        assert res.pooled.meta["method"] == "statistics" and res.pooled.meta["clients"] == 3
        assert 0.0 <= res.ledger.history[-1]["accuracy"] <= 1.0
    assert results["statistics"].privacy() is None
    assert all(e.examples > 0 for e in results["statistics"].ledger.entries)
    spent = results["dp-statistics"].privacy()
    assert 3.99 < spent["epsilon_spent_max"] <= 4.0 + 1e-9
    assert all(p["steps"] == 1 for p in spent["per_client"].values())
    assert all(e.examples == 0 for e in results["dp-statistics"].ledger.entries)  # sizes stay private
    assert not torch.equal(results["statistics"].pooled.images, results["dp-statistics"].pooled.images)


def test_compare_refuses_bad_input_before_running(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    code = compare_main(["--preset", "quick", "--dataset", "digits", "--clients", "3", "--ipc", "500",
                         "--out", str(out)])
    assert code == 2 and "ipc 500 is larger than every class" in capsys.readouterr().err
    assert not out.exists()
    code = compare_main(["--preset", "quick", "--partition", "zipf", "--out", str(out)])
    assert code == 2 and "unknown partition 'zipf'" in capsys.readouterr().err
    assert not out.exists()
    code = compare_main(["--preset", "quick", "--systems", "distill,pooled", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--systems takes distinct names of distill, distill_real, statistics" in err
    code = compare_main(["--preset", "quick", "--set", "summary-kind=statistics", "rounds=2",
                         "--out", str(out)])
    assert code == 2 and "summary-kind 'statistics' is one release" in capsys.readouterr().err
    assert not out.exists()
    code = compare_main(["--preset", "quick", "--set", "init=real", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "distill: init='real' starts every image from a private record" in err
    assert not out.exists()


@pytest.mark.slow
def test_compare_reports_leakage_columns_for_every_system(tmp_path) -> None:
    """End to end: the default systems plus statistics; the server's view of each is attacked, and no
    image system but random_real sends a near-copy."""
    import json

    out = tmp_path / "cmp"
    code = compare_main(["--preset", "quick", "--dataset", "digits", "--clients", "3", "--ipc", "2",
                         "--fedavg-rounds", "2", "--audit-samples", "50", "--canaries", "30",
                         "--systems", "distill,statistics,random_real,fedavg", "--out", str(out)])
    assert code == 0
    methods = json.loads((out / "report.json").read_text())["methods"]
    for name in ("distill", "statistics", "random_real", "fedavg"):
        leak = methods[name]["leakage"]
        assert 0 <= leak["mia_auc"] <= 1 and leak["mia_members"] == 50, name
        assert 0 <= leak["server_view_tpr_at_0.1pct_fpr"] <= 1, name
    views = {name: methods[name]["leakage"]["server_view"] for name in methods}
    assert [views[n]["kind"] for n in methods] == ["images", "statistics", "images", "weights"]
    # the default distillation starts from noise: nothing it sends is a near-copy of a private record
    assert views["distill"]["near_copies"] == 0 and methods["distill"]["leakage"]["near_copy_fraction"] == 0
    # random real images are private records: every one is a near-copy, and they are found as members
    rr = views["random_real"]
    held = sum(c["examples"] for c in methods["random_real"]["clients"])
    assert rr["near_copy_fraction"] == 1.0
    assert abs(rr["tpr_at_0.1pct_fpr"] - rr["received_images"] / held) <= 0.02
    assert (out / "closest_distill.png").exists() and (out / "closest_random_real.png").exists()
    assert {r["client"] for r in views["statistics"]["per_client"]} == {0, 1, 2}
    assert {r["round"] for r in views["fedavg"]["per_client"]} == {1, 2}
    for name in methods:  # the canary audit beside the (absent) accountant
        leak = methods[name]["leakage"]
        assert leak["canaries"] == 30 and 0 <= leak["eps_lower_bound"] <= leak["canary_max_certifiable"], name
        assert leak["epsilon_spent"] is None and leak["canary_bound_exceeds_epsilon"] is False, name
    # its guesses come from the server-view attacks too
    assert set(methods["random_real"]["leakage"]["canary_audits"]) == {"loss", "distance"}
    assert set(methods["statistics"]["leakage"]["canary_audits"]) == {"loss", "distance", "tracing"}
    assert set(methods["fedavg"]["leakage"]["canary_audits"]) == {"loss", "update"}
    text = (out / "report.md").read_text()
    assert "What the server sees" in text and "near-copies sent" in text and "30 canaries" in text


@pytest.mark.parametrize("preset", ["default", "fmnist", "quick"])
def test_compare_trains_on_no_canary_unless_asked(preset) -> None:
    from simulations import compare

    def parsed(*extra: str):
        return compare.settings(compare.build_parser().parse_args(["--preset", preset, "--out", "x", *extra]))

    _, budget, cfg = parsed()
    assert budget.canaries == 0 and cfg.canaries == 0 and budget.lira_shadows == 0
    _, budget, cfg = parsed("--canaries", "40")
    assert budget.canaries == 40 and cfg.canaries == 40
    from simulations import privacy_utility  # where privacy is the question the audit stays on

    args = privacy_utility.build_parser().parse_args(["--preset", preset, "--out", "x"])
    from simulations.common import audit_budget

    assert audit_budget(args).canaries > 0
