"""DD, MTT and IADD each lower their own objective on a tiny problem and return the shared Summary."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ddcore.config import DistillConfig
from ddcore.errors import ConfigError
from ddcore.methods import METHODS, distill
from ddcore.methods.base import ClassIndex
from ddcore.methods.dd import TRAIN_MOMENTUM
from ddcore.methods.iadd import importances, prune, weighted_match_loss
from ddcore.methods.mtt import expert_trajectories, initial_log_lr, match_distances
from ddcore.methods.unroll import params_of, unroll
from ddcore.models import ModelSpec, model_factory
from ddcore.runconfig import from_flat

SPEC = ModelSpec(width=8, depth=2)
CFG = DistillConfig(ipc=2, iterations=30, batch_real=16, dd_batch_real=16, init="noise", model=SPEC,
                    syn_steps=3, mtt_syn_steps=3, mtt_expert_epochs=3, mtt_expert_span=2, mtt_max_start=1)


def factory(data):
    return model_factory(SPEC, data.image_shape, data.num_classes)


def dd_objective(data, images, labels, step_sizes, probes: int = 8) -> float:
    """Loss on real data of fixed probe networks after the unroll on (images, labels)."""
    g = torch.Generator().manual_seed(1234)
    index = ClassIndex(data.y, data.num_classes)
    total = 0.0
    for _ in range(probes):
        net = factory(data)(g)
        trained = unroll(net, params_of(net), images, labels, step_sizes, CFG.dsa_strategy, g)
        idx = torch.cat([index.sample(c, 16, g) for c in range(data.num_classes)])
        logits = functional_call(net, trained, (data.x[idx],))
        total += float(F.cross_entropy(logits, data.y[idx]).detach())
    return total / probes


def match_objective(data, images, labels, log_lr, weights=None, probes: int = 8) -> float:
    """MTT's normalised distance (IADD's with ``weights``) over fixed experts and start points."""
    g = torch.Generator().manual_seed(1234)
    experts = expert_trajectories(data, factory(data), CFG, g)
    net = factory(data)(g)
    total = 0.0
    for _ in range(probes):
        num, den = match_distances(net, experts, images, labels, log_lr, CFG, g)
        w = torch.ones_like(num) if weights is None else weights
        total += float(weighted_match_loss(num, den, w).detach())
    return total / probes


def test_dd_lowers_the_real_loss_after_its_unroll(tiny) -> None:
    cfg = replace(CFG, method="dd", lr_net=0.1, lr_images=0.05, lr_lr=0.05)  # 3 steps must train
    start = distill(tiny, factory(tiny), replace(cfg, iterations=0))
    end = distill(tiny, factory(tiny), cfg)
    before = dd_objective(tiny, start.images, start.labels, start.lrs / (1 - TRAIN_MOMENTUM))
    after = dd_objective(tiny, end.images, end.labels, end.lrs / (1 - TRAIN_MOMENTUM))
    assert after < 0.8 * before, (before, after)


def test_dd_learns_positive_finite_step_sizes_and_resumes_from_them(tiny) -> None:
    cfg = replace(CFG, method="dd", iterations=10)
    s = distill(tiny, factory(tiny), cfg)
    assert s.lrs is not None and s.lrs.shape == (cfg.syn_steps,)
    assert torch.isfinite(s.lrs).all() and (s.lrs > 0).all()
    initial = (1 - TRAIN_MOMENTUM) * cfg.lr_net
    assert not torch.allclose(s.lrs, torch.full_like(s.lrs, initial))  # they were learned
    resumed = distill(tiny, factory(tiny), replace(cfg, iterations=0), init=s)
    assert torch.allclose(resumed.lrs, s.lrs) and torch.equal(resumed.images, s.images)


def test_mtt_lowers_its_trajectory_distance(tiny) -> None:
    cfg = replace(CFG, method="mtt")
    start = distill(tiny, factory(tiny), replace(cfg, iterations=0))
    end = distill(tiny, factory(tiny), cfg)
    before = match_objective(tiny, start.images, start.labels, initial_log_lr(tiny, cfg))
    after = match_objective(tiny, end.images, end.labels, torch.tensor(end.meta["syn-lr"]).log())
    assert after < 0.8 * before, (before, after)


def learned_importances(data, summary) -> torch.Tensor:
    names = [n for n, _ in factory(data)(torch.Generator()).named_parameters()]
    return torch.tensor([summary.meta[f"importance:{n}"] for n in names])


def test_iadd_lowers_its_weighted_distance_with_the_learned_importances(tiny) -> None:
    cfg = replace(CFG, method="iadd", iadd_lr_importance=0.05)
    start = distill(tiny, factory(tiny), replace(cfg, iterations=0))
    end = distill(tiny, factory(tiny), cfg)
    weights = learned_importances(tiny, end)
    assert torch.isclose(weights.mean(), torch.tensor(1.0)) and weights.std() > 0.1  # learned, none pruned
    before = match_objective(tiny, start.images, start.labels, initial_log_lr(tiny, cfg), weights)
    after = match_objective(tiny, end.images, end.labels, torch.tensor(end.meta["syn-lr"]).log(), weights)
    assert after < 0.8 * before, (before, after)


def test_iadd_prunes_tensors_and_records_it(tiny) -> None:
    end = distill(tiny, factory(tiny), replace(CFG, method="iadd", iadd_lr_importance=0.1, iadd_prune=0.2))
    weights = learned_importances(tiny, end)
    alive = weights > 0
    assert int((~alive).sum()) == end.meta["pruned-tensors"] >= 1
    assert torch.isclose(weights[alive].mean(), torch.tensor(1.0))


def test_importances_prune_below_threshold_but_keep_the_heaviest() -> None:
    alive = torch.tensor([True, True, True, False])
    w = importances(torch.tensor([0.0, 2.0, -3.0, 5.0]), alive)
    assert w[3] == 0 and torch.isclose(w.sum(), torch.tensor(3.0))
    assert prune(w, alive, 0.1).tolist() == [True, True, False, False]
    assert prune(w, alive, 10.0).tolist() == [False, True, False, False]


@pytest.mark.parametrize("method", ["dd", "mtt", "iadd"])
def test_extra_methods_have_the_shared_shape(tiny, method) -> None:
    s = distill(tiny, factory(tiny), replace(CFG, method=method, iterations=2, init="real",
                                             dd_fixed_init=True))
    assert s.images.shape == (6, 1, 8, 8) and s.images.dtype == torch.float32
    assert s.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert s.meta["method"] == method and s.meta["ipc"] == 2
    assert torch.isfinite(s.images).all()
    assert (s.lrs is not None) == (method == "dd")
    assert method in METHODS.names()


def test_run_config_keys_reach_the_methods() -> None:
    cfg = from_flat({"method": "mtt", "syn-steps": 7, "dd-fixed-init": "true", "mtt-expert-epochs": 9,
                     "iadd-prune": 0.2, "dd-augment": "true", "mtt-syn-steps": 4}).distill
    assert (cfg.method, cfg.syn_steps, cfg.dd_fixed_init, cfg.mtt_expert_epochs, cfg.iadd_prune) == \
        ("mtt", 7, True, 9, 0.2)
    assert (cfg.dd_augment, cfg.mtt_syn_steps) == (True, 4)
    with pytest.raises(ConfigError, match="raise mtt-expert-epochs"):
        from_flat({"mtt-expert-epochs": 2})
