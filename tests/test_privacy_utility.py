"""The privacy-utility sweep: every method and epsilon runs on the same partitions and is audited."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ddcore.runconfig import from_flat, run_preset
from privacy.audit import client_update_gradient
from privacy.record import PRIVACY_KEYS
from simulations.common import check_partitions
from simulations.privacy_utility import FedAvgSettings, fedavg_settings, main, parse_epsilons, plan_systems

TINY = ["--preset", "quick", "--dataset", "digits", "--clients", "3", "--ipc", "2"]


@pytest.mark.slow
def test_sweep_reports_a_row_per_method_and_epsilon_with_its_audits(tmp_path) -> None:
    out = tmp_path / "pu"
    code = main([*TINY, "--methods", "dm,fedavg", "--epsilons", "4,inf", "--fedavg-rounds", "2",
                 "--audit-samples", "60", "--lira-shadows", "2", "--inversion-steps", "5", "--canaries", "60",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["system"]: r for r in report["rows"]}
    assert sorted(rows) == sorted(["dm", "dp-dm@eps=4", "dp-dm@eps=inf",
                                   "fedavg", "dp-fedavg@eps=4", "dp-fedavg@eps=inf"])
    for name, r in rows.items():
        assert 0 <= r["accuracy"] <= 1, name
        assert r["bytes_up"] > 0 and 0 <= r["mia_auc"] <= 1 and r["mia_members"] == 60
    for name in ("dp-dm@eps=4", "dp-fedavg@eps=4"):  # the accountant spent (almost all of) the budget
        r = rows[name]
        assert 0.9 * 4 <= r["epsilon_spent"] <= 4 + 1e-6, r["epsilon_spent"]
        assert r["noise_multiplier"] > 0 and 0 < r["sample_rate"] <= 1 and r["steps"] > 0
        assert len(r["per_client"]) == 3
        for record in r["per_client"].values():  # one privacy record for DP distillation and DP-FedAvg
            assert set(record) == set(PRIVACY_KEYS) and record["max-grad-norm"] == 1.0, name
    no_noise = rows["dp-dm@eps=inf"]
    assert no_noise["noise_multiplier"] == 0 and math.isinf(no_noise["epsilon_spent"])
    assert rows["dm"]["epsilon_spent"] is None and rows["dm"]["noise_multiplier"] is None
    # summaries have a memorisation audit, FedAvg models a LiRA audit
    assert 0 <= rows["dp-dm@eps=4"]["memorisation_closer_to_private"] <= 1
    assert rows["fedavg"]["memorisation_closer_to_private"] is None
    assert rows["fedavg"]["lira"]["num_shadow_models"] == 2 and rows["dm"]["lira"] is None
    for name, r in rows.items():  # canary audit: 60 canaries certify less than 4, so no DP row can exceed it
        assert r["canaries"] == 60 and 0 <= r["eps_lower_bound"] <= r["canary_max_certifiable"] < 4, name
        assert 0 <= r["canary_correct"] <= r["canary_guesses"] <= 60, name
        fedavg = "fedavg" in name
        assert set(r["canary_audits"]) == ({"loss", "update"} if fedavg else {"loss", "distance"}), name
        # the server's view of every row is attacked, and no finite-epsilon row's ROC passes e^eps FPR + delta
        assert r["server_view"]["kind"] == ("weights" if fedavg else "images"), name
        assert 0 <= r["server_view_tpr_at_0.1pct_fpr"] <= 1, name
        if r["dp"] and math.isfinite(r["epsilon_target"]):
            assert r["server_view"]["dp_bound_holds"] is True, name
        assert r["canary_bound_exceeds_epsilon"] is False, (name, r["eps_lower_bound"], r["epsilon_spent"])
    assert report["audit"]["canaries"] == 60 and report["audit"]["canary_violations"] == []
    cases = {(r["case"], r["batch_size"]) for r in report["inversion"]}
    assert cases == {("no DP", 1), ("no DP", 8), ("DP", 1), ("DP", 8)}
    for name in ("accuracy_vs_epsilon.png", "mia_vs_epsilon.png", "inversion_dp_eps4_b8.png", "report.md"):
        assert (out / name).stat().st_size > 0, name


@pytest.mark.parametrize("flags, message", [
    (["--epsilons", "0,1"], "must all be > 0"),
    (["--epsilons", "one"], "numbers > 0 or inf"),
    (["--methods", "dm,psg"], "unknown --methods"),
    (["--set", "delta=0.5"], "delta"),
    (["--lira-shadows", "3"], "even"),
    (["--canaries", "-1"], "--canaries -1: audit sizes must be >= 0"),
    (["--set", "canaries=5"], "with --canaries, not --set"),
    (["--canaries", "5000"], "5000 inverted canaries need 5000 source images"),
])
def test_bad_input_fails_before_running_and_writes_nothing(tmp_path, capsys, flags, message) -> None:
    out = tmp_path / "never"
    assert main([*TINY, *flags, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_budgets_are_checked_up_front(tmp_path, capsys) -> None:
    # epsilon 0.01 cannot be certified at delta 1e-5 (below the accountant's floor): refused before Ray starts
    assert main([*TINY, "--epsilons", "0.01", "--out", str(tmp_path / "x")]) == 2
    assert "dp-gm@eps=0.01" in capsys.readouterr().err
    # delta must be below 1/n for every client: each of 3 digits clients holds more than 100 examples
    assert main([*TINY, "--set", "delta=0.01", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "client" in err and "1/n" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_plan_puts_non_dp_first_and_starts_dp_distillation_from_noise() -> None:
    cfg = from_flat({"dataset": "digits", "num-clients": 3}, base=run_preset("quick"))
    planned = plan_systems(cfg, ["gm", "fedavg"], parse_epsilons("inf,1"))
    names = [s.name for _, s in planned]
    assert names == ["gm", "dp-gm@eps=1", "dp-gm@eps=inf", "fedavg", "dp-fedavg@eps=1", "dp-fedavg@eps=inf"]
    gm_dp = planned[1][1].cfg
    assert gm_dp.distill.dp.enabled and gm_dp.distill.init == "noise" and gm_dp.distill.method == "gm"
    assert not planned[0][1].cfg.distill.dp.enabled and planned[3][1].kind == "fedavg"
    check_partitions(cfg)


def test_dp_client_update_is_clipped_and_noised(digits) -> None:
    from ddcore.models import ModelSpec, build_model

    g = torch.Generator().manual_seed(0)
    model = build_model(ModelSpec(name="mlp", width=16), digits.train.image_shape, 10, g)
    x, y = digits.train.x[:8], digits.train.y[:8]
    plain = client_update_gradient(model, x, y, noise_multiplier=0.0, max_grad_norm=None, generator=g)
    clipped = client_update_gradient(model, x, y, noise_multiplier=0.0, max_grad_norm=1e-3, generator=g)
    noisy = client_update_gradient(model, x, y, noise_multiplier=5.0, max_grad_norm=1e-3, generator=g)

    def norm(grads):
        return float(torch.sqrt(sum((t * t).sum() for t in grads)))

    assert norm(clipped) <= 1e-3 + 1e-6 < norm(plain)  # mean of clipped gradients: norm <= C
    assert norm(noisy) > 10 * norm(clipped)  # sigma C noise per coordinate dwarfs the clipped signal
    again = client_update_gradient(model, x, y, noise_multiplier=0.0, max_grad_norm=None, generator=g)
    assert all(torch.equal(a, b) for a, b in zip(plain, again, strict=True))  # the audited model is untouched


def test_dp_fedavg_settings_reach_only_the_dp_fedavg_rows_and_statistics_rows_release_once() -> None:
    cfg = from_flat({"dataset": "digits", "num-clients": 3}, base=run_preset("quick"))
    tuned = FedAvgSettings(dp={"local-lr": "0.5", "max-grad-norm": "0.1", "local-batch-size": "128"})
    planned = plan_systems(cfg, ["statistics", "fedavg"], [2.0], {"fedavg": tuned})
    by_name = {s.name: s.cfg for _, s in planned}
    assert sorted(by_name) == ["dp-fedavg@eps=2", "dp-statistics@eps=2", "fedavg", "statistics"]
    tuned = by_name["dp-fedavg@eps=2"]
    assert (tuned.local_lr, tuned.distill.dp.max_grad_norm, tuned.local_batch_size) == (0.5, 0.1, 128)
    for name in ("fedavg", "statistics", "dp-statistics@eps=2"):  # plain FedAvg keeps its own recipe
        assert by_name[name].local_lr == cfg.local_lr and by_name[name].distill.dp.max_grad_norm == 1.0
    assert by_name["statistics"].summary_kind == by_name["dp-statistics@eps=2"].summary_kind == "statistics"
    assert by_name["dp-statistics@eps=2"].distill.dp.enabled and not by_name["statistics"].distill.dp.enabled


def test_the_presets_fedavg_settings_reach_every_fedavg_row_and_no_other() -> None:
    cfg = from_flat({"dataset": "digits", "num-clients": 3}, base=run_preset("quick"))
    tuned = FedAvgSettings(rows={"model": "dpcnn", "fedavg-rounds": "4"}, dp={"local-lr": "0.5"})
    planned = plan_systems(cfg, ["statistics", "fedavg"], [2.0, math.inf], {"fedavg": tuned})
    by_name = {s.name: s.cfg for _, s in planned}
    for name in ("fedavg", "dp-fedavg@eps=2", "dp-fedavg@eps=inf"):  # plain FedAvg: the DP rows' network
        assert (by_name[name].distill.model.name, by_name[name].fedavg_rounds) == ("dpcnn", 4)
    assert by_name["fedavg"].local_lr == cfg.local_lr and by_name["dp-fedavg@eps=inf"].local_lr == 0.5


def test_the_no_noise_settings_reach_only_the_epsilon_inf_dp_fedavg_row() -> None:
    cfg = from_flat({"dataset": "digits", "num-clients": 3}, base=run_preset("quick"))
    tuned = FedAvgSettings(dp={"local-lr": "0.5", "local-batch-size": "128"},
                           no_noise={"local-batch-size": "16"})
    planned = plan_systems(cfg, ["statistics", "fedavg"], [2.0, math.inf], {"fedavg": tuned})
    by_name = {s.name: s.cfg for _, s in planned}
    assert (by_name["dp-fedavg@eps=inf"].local_batch_size, by_name["dp-fedavg@eps=inf"].local_lr) == (16, 0.5)
    assert by_name["dp-fedavg@eps=2"].local_batch_size == 128
    for name in ("fedavg", "statistics", "dp-statistics@eps=2", "dp-statistics@eps=inf"):
        assert by_name[name].local_batch_size == cfg.local_batch_size
    for name in ("statistics", "dp-statistics@eps=2"):
        assert by_name[name].distill.model.name == "convnet"


def test_fedavg_scatter_rows_train_scatternet_with_their_own_tuned_settings() -> None:
    cfg = from_flat({"dataset": "digits", "num-clients": 3, "fedavg-rounds": 3}, base=run_preset("quick"))
    methods = ["fedavg", "fedavg-scatter"]
    tuned = {m: fedavg_settings(m, "fmnist", {"fedavg-rounds": "3"}, {}) for m in methods}
    assert "fedavg-rounds" not in tuned["fedavg"].rows  # the command line beats the preset's rounds
    planned = plan_systems(cfg, methods, [1.0, math.inf], tuned)
    by_name = {s.name: s for _, s in planned}
    assert {by_name[n].kind for n in by_name} == {"fedavg"}
    for name in ("fedavg-scatter", "dp-fedavg-scatter@eps=1", "dp-fedavg-scatter@eps=inf"):
        model = by_name[name].cfg.distill.model
        assert (model.name, model.width, by_name[name].cfg.local_dsa_strategy) == ("scatter", 384, "none")
    for name in ("fedavg", "dp-fedavg@eps=1"):  # the DPCNN rows keep their own network and DP-SGD
        assert by_name[name].cfg.distill.model.name == "dpcnn"
    dp_scatter, dp_cnn = by_name["dp-fedavg-scatter@eps=1"].cfg, by_name["dp-fedavg@eps=1"].cfg
    assert dp_scatter.local_lr == float(tuned["fedavg-scatter"].dp["local-lr"]) != dp_cnn.local_lr == 0.4
    plain_scatter = by_name["fedavg-scatter"].cfg  # plain FedAvg keeps its own tuned local SGD
    assert plain_scatter.local_lr == float(tuned["fedavg-scatter"].rows["local-lr"]) != dp_scatter.local_lr
    assert by_name["fedavg-scatter"].cfg.fedavg_rounds == 3  # the command line's rounds
    overridden = {m: fedavg_settings(m, "fmnist", {}, {"local-lr": "3"}) for m in methods}
    assert all(o.dp["local-lr"] == "3" for o in overridden.values())  # --dp-fedavg-set: every FedAvg method
    assert overridden["fedavg"].no_noise == {"local-batch-size": 64}  # and it beats the no-noise settings
