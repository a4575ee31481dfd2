"""Statistic summaries: one release per client, added up by the server, distilled there."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from ddcore.config import DistillConfig, DPConfig
from ddcore.data import Dataset
from ddcore.errors import ConfigError, SummaryError
from ddcore.models import ModelSpec, model_factory
from ddcore.runconfig import from_flat
from privacy.class_release import norm_split
from privacy.statistics import bank_of, feature_dim, read_statistics, release, synthesise, to_arrays
from tests.conftest import blobs

CFG = DistillConfig(ipc=2, iterations=30, bank_size=3, model=ModelSpec(width=8))


def bank_for(data: Dataset, cfg: DistillConfig = CFG):
    factory = model_factory(cfg.model, data.image_shape, data.num_classes, "cpu")
    return bank_of(factory, cfg, data.image_shape)


def test_releases_of_disjoint_clients_add_up_to_the_release_of_their_union() -> None:
    data = blobs(n_per_class=12)
    bank = bank_for(data)
    half = torch.arange(len(data)) % 2 == 0
    a, _ = release(data.subset(torch.nonzero(half).flatten()), bank, CFG, torch.Generator().manual_seed(1))
    b, _ = release(data.subset(torch.nonzero(~half).flatten()), bank, CFG, torch.Generator().manual_seed(2))
    whole, meta = release(data, bank, CFG, torch.Generator().manual_seed(3))
    total = a + b
    assert torch.allclose(total.sums, whole.sums, atol=1e-5) and torch.equal(total.counts, whole.counts)
    assert whole.counts.tolist() == [12.0, 12.0, 12.0] and meta["dp"] is False
    # each record's feature has norm <= 1, so a class mean does too
    assert float(whole.means().norm(dim=1).max()) <= 1 + 1e-5


def test_a_dp_release_spends_its_target_and_adds_noise_of_the_calibrated_size() -> None:
    data = blobs(n_per_class=40)
    cfg = replace(CFG, dp=DPConfig(enabled=True, target_epsilon=2.0, delta=1e-5, max_grad_norm=1.0))
    bank = bank_for(data, cfg)
    exact, _ = release(data, bank, CFG, torch.Generator().manual_seed(0))
    noisy, meta = release(data, bank, cfg, torch.Generator().manual_seed(0))
    assert meta["dp"] is True and meta["accountant"] == "analytic-gaussian" and meta["steps"] == 1
    assert math.isclose(meta["epsilon"], 2.0, rel_tol=1e-6) and meta["delta"] == 1e-5
    sigma = meta["noise-multiplier"]
    a, _, _ = norm_split(1.0, exact.sums.shape[1])
    # the sums' noise is N(0, (sigma C / a)^2) per entry in feature units: its sample std over
    # 3 x D entries lies within a few percent of that
    measured = float((noisy.sums - exact.sums).std())
    assert abs(measured / (sigma / a) - 1) < 0.1
    assert not torch.equal(noisy.counts, exact.counts)
    assert "records" not in meta and "num-examples" not in meta  # the exact size is not released


def test_the_server_refuses_releases_that_do_not_fit_the_run() -> None:
    data = blobs(n_per_class=5)
    bank = bank_for(data)
    dim = feature_dim(bank, data.image_shape)
    stats, meta = release(data, bank, CFG, torch.Generator().manual_seed(0))
    arrays = to_arrays(stats)
    ok = read_statistics(arrays, meta, CFG, num_classes=3, dim=dim)
    assert torch.equal(ok.counts, stats.counts)
    cases = [
        ({**arrays, "sums": arrays["sums"][:, :-1]}, meta, r"expected \(3, \d+\)"),
        ({**arrays, "counts": np.zeros(4, np.float32)}, meta, r"counts \(4,\)"),
        ({**arrays, "sums": np.where(arrays["sums"] > 0, np.nan, arrays["sums"])}, meta, "sums contain NaN"),
        ({**arrays, "counts": arrays["counts"].astype(np.int64)}, meta, "counts must be floating point"),
        ({**arrays, "counts": np.full(3, 1e30, np.float32)}, meta, "beyond"),
        ({**arrays, "images": np.zeros((1, 1, 8, 8), np.float32)}, meta, r"unexpected \['images'\]"),
        ({"sums": arrays["sums"]}, meta, r"missing \['counts'\]"),
        (arrays, {**meta, "bank-seed": 7}, "bank"),
        (arrays, {**meta, "kind": "images"}, "expected a statistics release"),
    ]
    for bad, bad_meta, message in cases:
        with pytest.raises(SummaryError, match=message):
            read_statistics(bad, bad_meta, CFG, num_classes=3, dim=dim)


def test_the_server_distills_images_from_the_summed_means_of_the_present_classes() -> None:
    data = blobs(n_per_class=20)
    public = Dataset(torch.empty((0, 1, 8, 8)), torch.empty(0, dtype=torch.long), 4, (0.5,), (0.5,), "blobs")
    bank = bank_for(data)
    stats, _ = release(data, bank, CFG, torch.Generator().manual_seed(0))
    padded = type(stats)(torch.cat([stats.sums, torch.zeros((1, stats.sums.shape[1]))]),
                         torch.cat([stats.counts, torch.zeros(1)]))  # class 3: no record anywhere
    losses: list[float] = []
    summary = synthesise(padded, bank, CFG, public, torch.Generator().manual_seed(0), lr=0.3,
                         progress=lambda step, total, m: losses.append(m["loss"]))
    assert summary.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(losses) == CFG.iterations and losses[-1] < 0.5 * losses[0]
    lo, hi = public.pixel_bounds()
    assert float(summary.images.min()) >= lo and float(summary.images.max()) <= hi


def test_statistics_runs_are_one_shot_float32_releases() -> None:
    with pytest.raises(ConfigError, match="unknown summary-kind 'sums'"):
        from_flat({"summary-kind": "sums"})
    for flat in ({"rounds": 2}, {"summary-dtype": "uint8"}, {"summary-resolution": 14}):
        with pytest.raises(ConfigError, match="summary-kind 'statistics' is one release"):
            from_flat({"summary-kind": "statistics", **flat})


def test_a_client_asked_again_reuses_its_exact_sums_and_adds_fresh_noise(monkeypatch) -> None:
    import privacy.statistics
    from client.task import release_statistics

    data = blobs(n_per_class=10)
    cfg = from_flat({"bank-size": 2, "model-width": 8, "dp": True, "target-epsilon": 3.0, "delta": 1e-3,
                     "secret-noise": False})  # noise from the seed: repeatable (and strippable)
    first, meta, _, exact = release_statistics(data, cfg, 3, seed=5)
    calls = []
    original = privacy.statistics.public_sums
    monkeypatch.setattr(privacy.statistics, "public_sums", lambda *a: calls.append(1) or original(*a))
    again, _, _, kept = release_statistics(data, cfg, 3, seed=5, exact=exact)
    assert not calls and kept is exact  # nothing embedded again
    assert all(np.array_equal(first[k], again[k]) for k in ("sums", "counts"))  # same seed, same release
    other, _, _, _ = release_statistics(data, cfg, 3, seed=6, exact=exact)
    assert not np.array_equal(first["sums"], other["sums"])  # another request: its own noise
    assert math.isclose(meta["epsilon"], 3.0, rel_tol=1e-6)


def test_dp_noise_is_secret_by_default_so_the_runs_seed_does_not_redraw_it() -> None:
    """The server knows the run's seeds: a release whose noise followed them could be denoised."""
    from client.task import release_statistics

    data = blobs(n_per_class=10)
    flat = {"bank-size": 1, "model-width": 8, "dp": True, "target-epsilon": 3.0, "delta": 1e-3}
    secret = from_flat(flat)
    assert secret.distill.dp.secret_noise
    first, _, _, exact = release_statistics(data, secret, 3, seed=5)
    again, _, _, _ = release_statistics(data, secret, 3, seed=5, exact=exact)
    assert not np.array_equal(first["sums"], again["sums"])  # same seed, fresh noise
    public = from_flat({**flat, "secret-noise": False})
    a, _, _, _ = release_statistics(data, public, 3, seed=5, exact=exact)
    b, _, _, _ = release_statistics(data, public, 3, seed=5, exact=exact)
    assert np.array_equal(a["sums"], b["sums"])  # the seed alone fixes it: strippable by the server
