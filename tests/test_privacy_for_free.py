"""System recipes in one process (LiRA's shadows) and the privacy-for-free driver on small data."""

from __future__ import annotations

import json

import pytest
import torch

from client.task import fedavg_local
from ddcore.runconfig import from_flat, run_preset
from privacy.attacks.membership import lira_result, lira_scores, logit_confidence, train_shadows
from simulations.privacy_for_free import main, parse_systems
from simulations.recipes import average, recipe, shadow_trainer, split_clients

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = [
    "--preset",
    "quick",
    "--dataset",
    "digits",
    "--ipc",
    "2",
    "--pool",
    "200",
    "--shadows",
    "2",
    "--canaries",
    "20",
]


def test_split_clients_partitions_the_data(digits) -> None:
    data = digits.train.subset(torch.arange(101))
    parts = split_clients(data, 3, torch.Generator().manual_seed(0))
    assert sorted(len(p) for p in parts) == [33, 34, 34]
    rows = torch.cat([p.x.flatten(1) for p in parts])
    assert torch.equal(rows.unique(dim=0), data.x.flatten(1).unique(dim=0))  # every record once


def test_average_weighs_clients_by_their_examples() -> None:
    states = [{"w": torch.tensor([0.0, 4.0])}, {"w": torch.tensor([3.0, 0.0])}]
    assert torch.allclose(average(states, [1, 3])["w"], torch.tensor([2.25, 1.0]))


def test_fedavg_recipe_of_one_client_and_round_is_that_client_update(digits) -> None:
    cfg = from_flat({"fedavg-rounds": 1}, base=run_preset("quick"))
    data = digits.train.subset(torch.arange(80))
    out = recipe("fedavg", cfg)([data], torch.Generator().manual_seed(5))
    # the recipe draws the initial model, then the client's seed, from the same generator
    g = torch.Generator().manual_seed(5)
    from ddcore.models import build_model

    start = build_model(cfg.distill.model, data.image_shape, data.num_classes, g).state_dict()
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    expected, *_ = fedavg_local(data, cfg, data.num_classes, start, seed)
    for k, v in out.model.state_dict().items():
        assert torch.allclose(v, expected[k]), k
    assert out.pooled is None and out.eps_spent is None


def test_distill_recipe_pools_every_clients_summary(digits) -> None:
    cfg = from_flat({"method": "random_real", "ipc": 2, "allow-near-copies": True}, base=run_preset("quick"))
    data = digits.train.subset(torch.arange(300))
    out = recipe("distill", cfg)(
        split_clients(data, 2, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1)
    )
    assert len(out.pooled) == 2 * 2 * 10  # two clients, ipc 2, ten classes
    # random real images are members: each one is a training image of the run
    flat = data.x.flatten(1)
    assert all(bool((flat == img.flatten()).all(1).any()) for img in out.pooled.images)


def test_lira_over_a_federated_recipe_finds_members_of_an_overfitted_fedavg(digits) -> None:
    """FedAvg trained long on 50 records: the shadows (the same recipe) let LiRA tell members apart."""
    cfg = from_flat(
        {
            "fedavg-rounds": 25,
            "local-epochs": 2,
            "local-lr": 0.05,
            "local-batch-size": 16,
            "train-dsa-strategy": "none",
        },
        base=run_preset("quick"),
    )
    pool = digits.train.subset(torch.arange(100))
    included = torch.arange(100) % 2 == 0
    g = torch.Generator().manual_seed(0)
    target = recipe("fedavg", cfg)(split_clients(pool.subset(included.nonzero().flatten()), 2, g), g)
    shadows = train_shadows(
        pool, shadow_trainer("fedavg", cfg, 2), num_shadow=8, generator=torch.Generator().manual_seed(1)
    )
    result = lira_result(lira_scores(logit_confidence(target.model, pool), shadows), included, 8)
    assert result.auc > 0.8, result  # measured 0.93 (0.64 after one round)
    assert result.num_members == 50 and result.num_nonmembers == 50


def test_parse_systems_expands_dp_systems_per_epsilon() -> None:
    rows = parse_systems("dm,dp-fedavg", [1.0, 8.0])
    assert [r[0] for r in rows] == ["dm", "dp-fedavg@eps=1", "dp-fedavg@eps=8"]
    assert rows[1][2] == {"dp": True, "target-epsilon": 1.0} and rows[0][1] == "distill"
    assert [r[0] for r in parse_systems("fedavg,dp-dm@8,dp-fedavg@eps=2", [1.0])] == [
        "fedavg", "dp-dm@eps=8", "dp-fedavg@eps=2"]


@pytest.mark.slow
def test_driver_audits_every_system(tmp_path) -> None:
    out = tmp_path / "free"
    code = main(
        [*TINY, "--systems", "random_real,dm-noise,dp-dm,fedavg", "--epsilons", "4", "--out", str(out)]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["system"]: r for r in report["rows"]}
    assert sorted(rows) == ["dm-noise", "dp-dm@eps=4", "fedavg", "random_real"]
    members = report["setting"]["members"]
    assert 60 < members < 140  # a fair coin per record of 200
    for name, r in rows.items():
        assert 0 <= r["accuracy"] <= 1 and r["lira"]["num_shadow_models"] == 2, name
        assert r["lira"]["num_members"] == members and r["lira"]["num_nonmembers"] == 200 - members, name
        assert r["bound_exceeds_epsilon"] is False, name
        assert r["eps_lb_members"] >= 0 and 0 <= r["eps_lb_canaries"] <= r["canary_max_certifiable"], name
    # random real images are copies of members; summaries started from noise are not
    assert rows["random_real"]["near_copy_fraction"] == 1.0
    # ... so the summary itself tells members apart: its images are members at distance 0
    assert rows["random_real"]["summary_attack"]["tpr_at_0_1pct_fpr"] > 0.2
    assert rows["dm-noise"]["summary_attack"]["tpr_at_0_1pct_fpr"] < 0.1
    assert rows["dm-noise"]["near_copy_fraction"] < 0.5
    assert 3.9 <= rows["dp-dm@eps=4"]["epsilon_spent"] <= 4.0 + 1e-9
    assert rows["fedavg"].get("near_copy_fraction") is None and rows["fedavg"]["epsilon_spent"] is None
    for name in ("attack_vs_accuracy.png", "closest_random_real.png", "report.md"):
        assert (out / name).stat().st_size > 0, name


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--shadows", "3"], "--shadows must be even"),
        (["--systems", "dm,bogus"], "unknown --systems"),
        (["--systems", "dm@4"], "only DP systems"),
        (["--epsilons", "1,inf"], "epsilons must be finite"),
        (["--ipc", "40"], "--ipc"),
        (["--pool", "5"], "too small"),
    ],
)
def test_driver_refuses_bad_settings_before_running(tmp_path, capsys, flags, message) -> None:
    out = tmp_path / "never"
    assert main([*TINY, *flags, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
