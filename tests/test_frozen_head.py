"""A model that trains only its head (ScatterNet + linear) trains it on features embedded once."""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import Context, RecordDict

from client.app import _keep_features, _kept_features, dp_fedavg_round
from client.task import dp_fedavg_local, fedavg_local
from ddcore import frozen
from ddcore.frozen import FeatureCache, frozen_key, trainable_head, trained_part
from ddcore.models import ModelSpec, build_model
from ddcore.runconfig import from_flat
from ddcore.scatter import ScatterLinear
from privacy.accounting import Accountant
from tests.conftest import blobs

pytestmark = pytest.mark.usefixtures("one_thread")

FLAT = {"dataset": "digits", "model": "scatter", "model-width": 24, "fedavg-rounds": 2, "local-epochs": 2,
        "local-batch-size": 16, "local-lr": 0.5, "max-grad-norm": 0.5, "delta": 1e-3}


@pytest.fixture
def data():
    return blobs(n_per_class=30, num_classes=3, size=16)  # 90 images of 1x16x16


@pytest.fixture
def scatter_calls(monkeypatch) -> list[int]:
    """The batch size of every pass through the scattering (the frozen front's costly part)."""
    calls: list[int] = []
    real = ScatterLinear.scatter

    def counted(self, x):
        calls.append(int(x.shape[0]))
        return real(self, x)

    monkeypatch.setattr(ScatterLinear, "scatter", counted)
    return calls


def initial_state(cfg, data) -> dict[str, torch.Tensor]:
    model = build_model(cfg.distill.model, data.image_shape, 3, torch.Generator().manual_seed(7))
    return {k: v.clone() for k, v in model.state_dict().items()}


def whole_model(monkeypatch) -> None:
    """Make every model train whole, as before the head-only path existed (the reference)."""
    monkeypatch.setattr(frozen, "trainable_head", lambda model: None)


def test_only_a_model_whose_front_is_frozen_trains_its_head_alone(data) -> None:
    g = torch.Generator().manual_seed(0)
    scatter = build_model(ModelSpec(name="scatter", width=24), data.image_shape, 3, g)
    assert trainable_head(scatter) is scatter.classifier
    for name in ("mlp", "convnet", "dpcnn"):  # trainable front layers: the whole model trains
        model = build_model(ModelSpec(name=name, width=8), data.image_shape, 3, g)
        assert trainable_head(model) is None, name
        part, x = trained_part(model, data.x, "none")
        assert part is model and x is data.x
    scatter.project.requires_grad_(True)  # an unfrozen projection trains too
    assert trainable_head(scatter) is None
    frozen_mlp = build_model(ModelSpec(name="mlp", width=8), data.image_shape, 3, g)
    frozen_mlp.body.requires_grad_(False)
    assert trainable_head(frozen_mlp) is frozen_mlp.classifier  # the test is generic, not a name
    frozen_mlp.body.append(torch.nn.Dropout(0.5))  # a front that behaves differently in training
    assert trainable_head(frozen_mlp) is None


@pytest.mark.parametrize("epsilon", [float("inf"), 3.0])
def test_head_only_dp_fedavg_gives_the_whole_models_weights_noise_and_epsilon(
        data, monkeypatch, scatter_calls, epsilon) -> None:
    # the noise from the seed (secret-noise = false), so both paths draw the same
    cfg = from_flat({**FLAT, "dp": True, "target-epsilon": epsilon, "secret-noise": False})
    runs = {}
    for path in ("head", "whole"):
        if path == "whole":
            whole_model(monkeypatch)
        scatter_calls.clear()
        state, accountant, losses = initial_state(cfg, data), Accountant(), []
        for r in range(2):
            state, loss, _, plan = dp_fedavg_local(data, cfg, 3, state, seed=10 + r, accountant=accountant)
            losses.append(loss)
        runs[path] = state, losses, accountant.epsilon(cfg.distill.dp.delta), list(scatter_calls)
    (head, head_losses, head_eps, head_calls), (whole, whole_losses, whole_eps, whole_calls) = runs.values()
    assert (plan.noise_multiplier > 0) == (epsilon < float("inf"))
    assert head_calls == [90, 90] and len(whole_calls) > 2 * 10  # embedded once a round, not at every step
    assert torch.equal(head["project.weight"], whole["project.weight"])
    for key in ("classifier.weight", "classifier.bias"):  # same batches, clipping and noise draws
        assert not torch.equal(head[key], initial_state(cfg, data)[key])
        torch.testing.assert_close(head[key], whole[key], rtol=1e-4, atol=1e-5)
    assert head_losses == pytest.approx(whole_losses, rel=1e-4)
    assert head_eps == whole_eps


def test_head_only_fedavg_gives_the_whole_models_weights_and_a_cache_embeds_once(data, monkeypatch,
                                                                                 scatter_calls) -> None:
    cfg = from_flat({**FLAT, "proximal-mu": 0.1})
    start = initial_state(cfg, data)
    cache = FeatureCache()
    head, head_loss, _ = fedavg_local(data, cfg, 3, start, seed=3, features=cache)
    again, _, _ = fedavg_local(data, cfg, 3, head, seed=4, features=cache)  # the next round, same records
    assert scatter_calls == [90] and len(cache) == 1
    fresh, _, _ = fedavg_local(data, cfg, 3, head, seed=4)  # no cache: embeds again, same result
    assert scatter_calls == [90, 90]
    assert all(torch.equal(again[k], fresh[k]) for k in again)
    whole_model(monkeypatch)
    whole, whole_loss, _ = fedavg_local(data, cfg, 3, start, seed=3)
    assert len(scatter_calls) > 2 + 10
    for key in ("classifier.weight", "classifier.bias"):
        torch.testing.assert_close(head[key], whole[key], rtol=1e-4, atol=1e-5)
    assert head_loss == pytest.approx(whole_loss, rel=1e-4)


def test_the_cache_is_keyed_by_the_records_and_the_frozen_weights(data) -> None:
    g = torch.Generator().manual_seed(0)
    model = build_model(ModelSpec(name="scatter", width=24), data.image_shape, 3, g)
    key = frozen_key(model, data.x)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # the head is not in the key: it trains every round
    assert frozen_key(model, data.x) == key
    assert frozen_key(model, data.x[1:]) != key and frozen_key(model, data.x + 1e-3) != key
    with torch.no_grad():
        model.project.weight.mul_(2.0)
    assert frozen_key(model, data.x) != key
    cache = FeatureCache(capacity=2)
    for k in ("a", "b", "c"):
        cache.put(k, torch.zeros(1))
    assert cache.get("a") is None and cache.latest()[0] == "c" and len(cache) == 2


def test_augmentation_trains_the_whole_model_and_says_why(data, scatter_calls, caplog) -> None:
    cfg = from_flat({**FLAT, "local-dsa-strategy": "flip"})
    g = torch.Generator().manual_seed(0)
    model = build_model(cfg.distill.model, data.image_shape, 3, g)
    with caplog.at_level(logging.WARNING, logger="ddcore.frozen"):
        part, x = trained_part(model, data.x, "flip")
    assert part is model and x is data.x and "local-dsa-strategy=none" in caplog.text
    fedavg_local(data, cfg, 3, initial_state(cfg, data), seed=0)
    assert len(scatter_calls) == cfg.local_epochs * 6  # a pass per step: 2 epochs of 6 batches


def test_a_node_keeps_its_features_across_rounds(data, scatter_calls) -> None:
    cfg = from_flat({**FLAT, "dp": True, "target-epsilon": 3.0})
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                      state=RecordDict(), run_config={})
    state = initial_state(cfg, data)
    for r in (1, 2):  # what fedavg_update does around the round
        features = _kept_features(context)
        state, _, _, _ = dp_fedavg_round(data, cfg, 3, state, r, context, features)
        _keep_features(context, features)
    assert scatter_calls == [90]  # the second round read the node's state
    kept = _kept_features(context).latest()
    assert kept[0] == frozen_key(build_model(cfg.distill.model, data.image_shape, 3,
                                             torch.Generator().manual_seed(7)), data.x)
    assert kept[1].shape == (90, 24)
