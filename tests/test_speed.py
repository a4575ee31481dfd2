"""The speed features: chunked low-precision real embeddings, time budgets, and the benchmark's parts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ddcore.config import DistillConfig
from ddcore.errors import ConfigError
from ddcore.methods import distill
from ddcore.methods.options import real_dtype
from ddcore.models import ModelSpec, build_model, embed_frozen, model_factory

SPEC = ModelSpec(width=8, depth=2)


def _net(generator_seed: int = 0) -> torch.nn.Module:
    net = build_model(SPEC, (1, 12, 12), 3, torch.Generator().manual_seed(generator_seed)).train()
    return net.requires_grad_(False)


def test_chunked_embedding_equals_one_pass() -> None:
    x = torch.randn(50, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    net = _net()
    whole = net.embed(x)
    for chunk in (1, 7, 50, 1000):
        assert torch.allclose(embed_frozen(net, x, chunk, None), whole, atol=1e-5)


def test_bf16_embedding_is_close_and_float32_without_a_graph() -> None:
    x = torch.randn(40, 1, 12, 12, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    net = _net()
    whole = net.embed(x).detach()
    low = embed_frozen(net, x, 16, torch.bfloat16)
    assert low.dtype == torch.float32 and not low.requires_grad
    assert float((low - whole).norm() / whole.norm()) < 2e-2


def test_real_precision_resolves_auto_by_hardware(monkeypatch) -> None:
    assert real_dtype(DistillConfig(real_precision="fp32")) is None
    assert real_dtype(DistillConfig(real_precision="bf16")) is torch.bfloat16
    monkeypatch.setattr("ddcore.methods.options.native_bf16", lambda device: False)
    assert real_dtype(DistillConfig(real_precision="auto")) is None
    monkeypatch.setattr("ddcore.methods.options.native_bf16", lambda device: True)
    assert real_dtype(DistillConfig(real_precision="auto")) is torch.bfloat16


@pytest.mark.parametrize("method", ["dm", "gm"])
def test_time_budget_stops_early_and_records_what_was_done(tiny, method) -> None:
    cfg = DistillConfig(method=method, ipc=2, iterations=100_000, batch_real=8, model=SPEC, time_budget=0.3)
    summary = distill(tiny, model_factory(SPEC, tiny.image_shape, tiny.num_classes), cfg)
    done = summary.meta["iterations-done"]
    assert 1 <= done < 100_000
    assert 0.3 <= summary.meta["distill-seconds"] < 30


def test_without_a_budget_every_iteration_runs(tiny) -> None:
    cfg = DistillConfig(method="dm", ipc=2, iterations=7, batch_real=8, model=SPEC)
    summary = distill(tiny, model_factory(SPEC, tiny.image_shape, tiny.num_classes), cfg)
    assert summary.meta["iterations-done"] == 7


def test_time_budget_is_refused_where_it_cannot_apply(tiny) -> None:
    with pytest.raises(ConfigError, match="multires"):
        DistillConfig(time_budget=10, multires=0.5)
    with pytest.raises(ConfigError, match="time-budget"):
        DistillConfig(time_budget=-1)
    cfg = DistillConfig(method="herding", ipc=2, model=SPEC, time_budget=5)
    with pytest.raises(ConfigError, match="does not run by time"):
        distill(tiny, model_factory(SPEC, tiny.image_shape, tiny.num_classes), cfg)


def test_same_seed_same_summary_in_bf16(tiny) -> None:
    cfg = DistillConfig(method="dm", ipc=2, iterations=5, batch_real=8, model=SPEC, real_precision="bf16")
    factory = model_factory(SPEC, tiny.image_shape, tiny.num_classes)
    a, b = distill(tiny, factory, cfg), distill(tiny, factory, replace(cfg))
    assert torch.equal(a.images, b.images)
