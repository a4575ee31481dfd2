"""The ridge head of the statistics system: ScatterNet features, second moments, closed-form head."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from ddcore.config import DistillConfig, DPConfig
from ddcore.errors import ConfigError, SummaryError
from ddcore.models import ModelSpec, build_model, model_factory
from ddcore.runconfig import from_flat
from privacy.class_release import (
    ClassStatistics,
    exact_statistics,
    noisy_release,
    norm_split,
    symmetric,
    upper_triangle,
)
from privacy.statistics import (
    bank_of,
    public_view,
    read_statistics,
    release,
    ridge_head,
    ridge_model,
    to_arrays,
)
from tests.conftest import blobs

SPEC = ModelSpec(name="scatter", width=24)
CFG = DistillConfig(bank_size=1, model=SPEC)


def scatter_bank(data, cfg: DistillConfig = CFG):
    return bank_of(model_factory(cfg.model, data.image_shape, data.num_classes), cfg, data.image_shape)


def test_the_scatter_model_learns_only_its_head_and_ignores_the_inputs_normalisation() -> None:
    data = blobs(n_per_class=4, size=16)
    model = build_model(SPEC, data.image_shape, 3, torch.Generator().manual_seed(0))
    twin = build_model(SPEC, data.image_shape, 3, torch.Generator().manual_seed(0))
    other = build_model(SPEC, data.image_shape, 3, torch.Generator().manual_seed(1))
    assert sorted(model.state_dict()) == ["classifier.bias", "classifier.weight", "project.weight"]
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == ["classifier.weight", "classifier.bias"]
    assert torch.equal(model.project.weight, twin.project.weight)  # the seed fixes the projection
    assert not torch.equal(model.project.weight, other.project.weight)
    features = model.embed(data.x)
    assert features.shape == (12, 24) and torch.allclose(features.norm(dim=1), torch.ones(12))
    # another per-channel normalisation of the same pixels gives the same features
    assert torch.allclose(model.embed(data.x * 3.0 - 1.0), features, atol=2e-3)


def test_the_upper_triangle_round_trips_a_symmetric_matrix() -> None:
    a = torch.randn(5, 5, dtype=torch.float64)
    m = a @ a.T
    triangle = upper_triangle(m)
    assert triangle.numel() == 15 and torch.allclose(symmetric(triangle, 5), m)
    assert torch.isclose(triangle.norm(), m.norm())  # svec keeps the Frobenius norm
    with pytest.raises(ValueError, match="15 entries, got 14"):
        symmetric(triangle[:-1], 5)


def test_one_record_moves_the_scaled_release_with_moments_by_at_most_c() -> None:
    data = blobs(n_per_class=4, size=16)
    bank = scatter_bank(data)
    c = 1.7
    full = exact_statistics(bank, data, moments=True)
    a, b, m = norm_split(c, full.sums.shape[1], moments=True)
    assert math.isclose(a * a + b * b + m * m, c * c, rel_tol=1e-9)
    for drop in range(len(data)):
        keep = [i for i in range(len(data)) if i != drop]
        less = exact_statistics(bank, data.subset(keep), moments=True)
        moved = torch.cat([(a * (full.sums - less.sums)).flatten(), b * (full.counts - less.counts),
                           m * (full.moments - less.moments)])
        assert float(moved.norm()) <= c + 1e-6
        # and a record (|phi| = 1) moves it by C itself: the split spends all of C
        assert float(moved.norm()) > c - 1e-4  # features are float32


def test_summed_releases_give_the_ridge_fit_of_the_pooled_features() -> None:
    data = blobs(n_per_class=30, size=16)
    bank = scatter_bank(data)
    halves = [data.subset(list(range(i, len(data), 2))) for i in (0, 1)]
    parts = [exact_statistics(bank, h, moments=True) for h in halves]
    total = ClassStatistics.total([noisy_release(p.sums, p.counts, max_norm=1.0, noise_multiplier=0.0,
                                                 generator=torch.Generator(), moments=p.moments)
                                    for p in parts])
    weights = ridge_head(total, ridge_lambda=1e-3)
    with torch.no_grad():
        phi = bank.features(data.x).double()
    onehot = torch.nn.functional.one_hot(data.y, 3).double()
    penalty = 1e-3 * len(data) / phi.shape[1]
    direct = torch.linalg.solve(phi.T @ phi + penalty * torch.eye(phi.shape[1], dtype=torch.float64),
                                phi.T @ onehot).T
    assert torch.allclose(weights.double(), direct, atol=1e-4)
    assert float(((phi.float() @ weights.T).argmax(1) == data.y).float().mean()) == 1.0


def test_the_ridge_model_classifies_with_the_heads_weights_and_needs_one_network() -> None:
    data = blobs(n_per_class=20, size=16)
    bank = scatter_bank(data)
    stats, _ = release(data, bank, CFG, torch.Generator().manual_seed(0), moments=True)
    factory = model_factory(SPEC, data.image_shape, 3)
    model = ridge_model(stats, factory, CFG, ridge_lambda=1e-3)
    with torch.no_grad():
        assert float((model(data.x).argmax(1) == data.y).float().mean()) == 1.0
        assert torch.allclose(model.embed(data.x), bank.features(data.x), atol=1e-5)  # the clients' features
    with pytest.raises(SummaryError, match="bank-size 1"):
        ridge_model(stats, factory, replace(CFG, bank_size=2), ridge_lambda=1e-3)
    with pytest.raises(SummaryError, match="second moments"):
        ridge_head(ClassStatistics(stats.sums, stats.counts), 1e-3)
    with pytest.raises(SummaryError, match="linear classifier"):
        ridge_model(stats, model_factory(ModelSpec(width=8), data.image_shape, 3), CFG, 1e-3)


def test_the_server_checks_the_moments_and_reads_their_noise_from_the_privacy_record() -> None:
    data = blobs(n_per_class=20, size=16)
    cfg = replace(CFG, dp=DPConfig(enabled=True, target_epsilon=1.0, delta=1e-5, max_grad_norm=1.0))
    bank = scatter_bank(data, cfg)
    exact = public_sums_of(data, bank)
    stats, meta = release(data, bank, cfg, torch.Generator().manual_seed(0), exact, moments=True)
    arrays = to_arrays(stats)
    read = read_statistics(arrays, meta, cfg, num_classes=3, dim=24, moments=True)
    _, _, m = norm_split(1.0, 24, moments=True)
    assert math.isclose(read.noise_std, meta["noise-multiplier"] / m, rel_tol=1e-6)
    measured = float((stats.moments - exact.moments.float()).std())  # 300 entries: within ~10%
    assert abs(measured / read.noise_std - 1) < 0.15
    with pytest.raises(SummaryError, match=r"missing \['moments'\]"):
        read_statistics({k: arrays[k] for k in ("sums", "counts")}, meta, cfg, num_classes=3, dim=24,
                        moments=True)
    with pytest.raises(SummaryError, match=r"unexpected \['moments'\]"):
        read_statistics(arrays, meta, cfg, num_classes=3, dim=24)
    with pytest.raises(SummaryError, match=r"moments \(299,\): expected \(300,\)"):
        read_statistics({**arrays, "moments": arrays["moments"][:-1]}, meta, cfg, num_classes=3, dim=24,
                        moments=True)
    # the noise of N clients adds in quadrature on the server's total
    total = ClassStatistics.total([read] * 4)
    assert math.isclose(total.noise_std, 2 * read.noise_std, rel_tol=1e-9)
    # with the noise term, the penalised moments stay positive definite: the head is finite
    assert torch.isfinite(ridge_head(total, 1e-3)).all()


def public_sums_of(data, bank):
    return exact_statistics(bank, public_view(data), moments=True)


def test_statistics_head_settings_are_checked() -> None:
    assert from_flat({"statistics-head": "ridge"}).statistics_head == "ridge"
    with pytest.raises(ConfigError, match="unknown statistics-head 'lda'"):
        from_flat({"statistics-head": "lda"})
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ConfigError, match="ridge-lambda must be a finite number > 0"):
            from_flat({"ridge-lambda": bad})
    assert np.isfinite(from_flat({}).ridge_lambda)
