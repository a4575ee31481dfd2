"""The canary audit wired into the drivers: canaries in the clients' data, columns, the DP-bug alarm."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from client.task import local_data
from ddcore.partition import partition_indices
from ddcore.runconfig import RUN_PRESETS, from_flat, run_preset
from ddcore.summary import Summary
from privacy.audit import audit_samples, run_canaries
from simulations.common import AUDIT_BUDGETS, System
from simulations.privacy_utility import audit_row

pytestmark = pytest.mark.usefixtures("one_thread")

CLIENTS = 3


@pytest.fixture(scope="module")
def cfg():
    return from_flat({"dataset": "digits", "num-clients": CLIENTS, "canaries": 40}, base=run_preset("quick"))


def test_every_preset_has_an_audit_budget_and_quick_is_the_smallest() -> None:
    assert set(AUDIT_BUDGETS) == set(RUN_PRESETS)
    quick = AUDIT_BUDGETS["quick"]
    for name, budget in AUDIT_BUDGETS.items():
        for f in fields(budget):  # 0 = an audit a preset turns off on purpose
            value = getattr(budget, f.name)
            assert value == 0 or value >= getattr(quick, f.name), (name, f.name)
    assert AUDIT_BUDGETS["quick"] != AUDIT_BUDGETS["default"]
    assert AUDIT_BUDGETS["fmnist"].lira_shadows == 0  # a shadow would rerun the whole federated recipe


def test_each_included_canary_goes_into_exactly_one_simulated_clients_data(cfg, digits) -> None:
    canaries = run_canaries(cfg, digits)
    assert canaries is not None and len(canaries) == 40 and 0 < int(canaries.included.sum()) < 40
    parts = partition_indices(digits.train.y.numpy(), cfg.partition)
    seen = []
    for pid, part in enumerate(parts):
        data = local_data(cfg, {"partition-id": pid, "num-partitions": CLIENTS})
        assert torch.equal(data.x[:len(part)], digits.train.x[part])  # the partition, then its canaries
        extra = data.x[len(part):]
        assert torch.equal(extra, canaries.inserted(pid, CLIENTS).x)
        seen.append(extra)
    inserted = torch.cat(seen)
    assert len(inserted) == int(canaries.included.sum())
    for i in range(len(canaries)):  # an included canary is in some client's data, an excluded one in none
        found = (inserted == canaries.data.x[i]).flatten(1).all(1).any()
        assert bool(found) == bool(canaries.included[i]), i
    no_canaries = from_flat({"canaries": 0}, base=cfg)
    assert len(local_data(no_canaries, {"partition-id": 0, "num-partitions": CLIENTS})) == len(parts[0])


class FinishedRun:
    """What audit_row reads of a finished system: a summary and the privacy its clients reported."""

    def __init__(self, pooled: Summary, epsilon: float) -> None:
        self.pooled, self.final_state, self.received = pooled, None, None
        record = {"epsilon": epsilon, "delta": 1e-5, "noise-multiplier": 1.0, "sample-rate": 0.1,
                  "steps": 10}
        self.privacy = {"epsilon_spent_max": epsilon, "per_client": {"0": record}}

    def to_dict(self) -> dict:
        return {"final_accuracy": 0.5, "best_accuracy": 0.5, "bytes_up": 1, "bytes_down": 1,
                "wall_seconds": 1.0, "privacy": self.privacy, "clients": []}


@pytest.mark.parametrize("copies, epsilon, alarm",
                         [(True, 0.5, True), (True, 50.0, False), (False, 0.5, False)])
def test_a_dp_row_whose_canary_bound_exceeds_its_epsilon_is_flagged_loudly(cfg, digits, capsys, copies,
                                                                            epsilon, alarm) -> None:
    canaries = run_canaries(cfg, digits)
    # a "DP" summary that holds the inserted canaries themselves (a broken mechanism), or one that does not
    g = torch.Generator().manual_seed(1)
    images = canaries.inserted().x if copies else torch.randn((20, *digits.train.image_shape), generator=g)
    pooled = Summary(images, torch.zeros(len(images), dtype=torch.long))
    dp = from_flat({"dp": True, "target-epsilon": epsilon}, base=cfg)
    members, nonmembers = audit_samples(digits, 20, seed=0)
    row = audit_row({"method": "dp-dm", "dp": True, "epsilon_target": epsilon},
                    System("dp-dm", "distill", dp), FinishedRun(pooled, epsilon), digits, members, nonmembers,
                    AUDIT_BUDGETS["quick"], canaries)
    assert row["canary_score"] == "distance" and row["canaries"] == 40
    assert row["canary_guesses"] >= row["canary_correct"] >= 0
    assert 0 < row["canary_max_certifiable"] < 10
    err = capsys.readouterr().err
    assert row["canary_bound_exceeds_epsilon"] is alarm and ("WARNING: dp-dm" in err) is alarm
    if copies:  # (nearly) every guess right: far above epsilon 0.5, near what 40 canaries can certify
        assert row["canary_correct"] >= 0.95 * row["canary_guesses"] and row["eps_lower_bound"] > 1.0
    else:
        assert row["eps_lower_bound"] < 0.5
