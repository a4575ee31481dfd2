"""DP-DM's one release: exact accounting, the seeded bank, the sensitivity bound, matching, normalisation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import privacy.class_release as class_release
import privacy.methods  # noqa: F401  (registers dp-dm)
from ddcore.bank import EmbeddingBank
from ddcore.config import DistillConfig, DPConfig
from ddcore.data import load_dataset, public_constants
from ddcore.factorised import Factors
from ddcore.mean_matching import match_class_means, mean_matching_loss
from ddcore.methods import distill
from ddcore.methods.base import Synthetic
from ddcore.models import ModelSpec, model_factory
from ddcore.summary import Summary
from privacy.class_release import ClassStatistics, norm_split, release_class_statistics
from privacy.errors import InvalidPrivacyParameterError, PrivacyError, PrivateInitError
from privacy.single_release import (
    SingleReleaseAccountant,
    calibrate_gaussian,
    gaussian_delta,
    gaussian_epsilon,
)
from privacy.statistics import in_normalisation

dp_accounting = pytest.importorskip("dp_accounting")

SPEC = ModelSpec(width=8, depth=2)
BASE = DistillConfig(method="dm", ipc=2, iterations=5, init="noise", model=SPEC, bank_size=3)
STRATEGY = "color_crop_cutout_scale_rotate"

pytestmark = pytest.mark.usefixtures("one_thread")


def dp(cfg: DistillConfig, epsilon: float, delta: float = 1e-4) -> DistillConfig:
    return replace(cfg, dp=DPConfig(enabled=True, target_epsilon=epsilon, delta=delta))


def factory(data):
    return model_factory(SPEC, data.image_shape, data.num_classes)


def pld_epsilon(sigma: float, delta: float) -> float:
    """epsilon of one Gaussian release from Google's PLD accountant (an independent implementation)."""
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(sigma))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("epsilon, delta", [(0.5, 1e-5), (1.0, 1e-5), (4.0, 1e-6), (8.0, 1e-5)])
def test_calibrated_sigma_spends_exactly_the_target_and_agrees_with_dp_accounting(epsilon, delta) -> None:
    sigma = calibrate_gaussian(target_epsilon=epsilon, delta=delta)
    assert gaussian_epsilon(noise_multiplier=sigma, delta=delta) == pytest.approx(epsilon, rel=1e-9)
    assert gaussian_delta(epsilon=epsilon, noise_multiplier=sigma) == pytest.approx(delta, rel=1e-6)
    assert abs(pld_epsilon(sigma, delta) - epsilon) <= 0.05 * epsilon
    rdp = dp_accounting.rdp.RdpAccountant()  # RDP's conversion is looser: it certifies more epsilon
    rdp.compose(dp_accounting.GaussianDpEvent(sigma))
    assert rdp.get_epsilon(delta) > epsilon
    assert calibrate_gaussian(target_epsilon=epsilon / 2, delta=delta) > sigma  # less budget, more noise
    if epsilon == 1.0 and delta == 1e-5:
        assert sigma == pytest.approx(3.7306, abs=1e-3)  # the value the README quotes


def test_single_release_accountant_allows_exactly_one_unsampled_release() -> None:
    acc = SingleReleaseAccountant()
    assert acc.steps == 0 and acc.epsilon(1e-5) == 0.0
    with pytest.raises(InvalidPrivacyParameterError, match="sample rate 1"):
        acc.step(noise_multiplier=2.0, sample_rate=0.5)
    acc.step(noise_multiplier=2.0)
    assert acc.steps == 1 and acc.epsilon(1e-5) == pytest.approx(pld_epsilon(2.0, 1e-5), rel=0.05)
    with pytest.raises(PrivacyError, match="already made"):
        acc.step(noise_multiplier=2.0)
    resumed = SingleReleaseAccountant()
    resumed.load_state_dict(acc.state_dict())
    assert resumed.epsilon(1e-5) == acc.epsilon(1e-5)
    noiseless = SingleReleaseAccountant()
    noiseless.step(noise_multiplier=0.0)
    assert math.isinf(noiseless.epsilon(1e-5))
    assert calibrate_gaussian(target_epsilon=math.inf, delta=1e-5) == 0


def test_bank_is_rebuilt_identically_from_its_seed(tiny) -> None:
    one = EmbeddingBank(factory(tiny), size=3, seed=7, augment=2, strategy=STRATEGY)
    two = EmbeddingBank(factory(tiny), size=3, seed=7, augment=2, strategy=STRATEGY)
    other = EmbeddingBank(factory(tiny), size=3, seed=8, augment=2, strategy=STRATEGY)
    assert torch.equal(one.features(tiny.x), two.features(tiny.x))
    for a, b in zip(one.nets, two.nets, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.allclose(one.features(tiny.x), other.features(tiny.x))
    first, second = one.nets[0].features[0].weight, one.nets[1].features[0].weight
    assert not torch.allclose(first, second)  # K distinct networks


@pytest.mark.parametrize("augment", [0, 3])
def test_a_record_moves_the_release_by_at_most_C_even_through_augmented_views(tiny, augment) -> None:
    C = 0.7
    bank = EmbeddingBank(factory(tiny), size=3, seed=0, augment=augment, strategy=STRATEGY)
    norms = bank.features(tiny.x).norm(dim=1)
    assert (norms <= 1 + 1e-5).all()
    if augment == 0:
        assert (norms > 0.99).all()  # unit blocks: every record uses its whole budget
    a, b, _ = norm_split(C, bank.features(tiny.x[:1]).shape[1])
    assert a * a + b * b == pytest.approx(C * C) and b < a
    g = torch.Generator()
    full = release_class_statistics(bank, tiny, max_norm=C, noise_multiplier=0.0, generator=g)
    for i in (0, 25, len(tiny) - 1):  # remove one record: the scaled release moves by <= C
        keep = [j for j in range(len(tiny)) if j != i]
        less = release_class_statistics(bank, tiny.subset(keep), max_norm=C, noise_multiplier=0.0,
                                        generator=g)
        moved = torch.cat([a * (full.sums - less.sums).flatten(), b * (full.counts - less.counts)]).norm()
        assert moved <= C + 1e-5
        changed = ((full.sums - less.sums).abs().sum(1) > 0).nonzero().flatten().tolist()
        assert changed == [int(tiny.y[i])]  # only the record's own class row
    assert full.counts.tolist() == [20.0, 20.0, 20.0]


def test_noisy_means_approach_the_true_means_as_epsilon_grows(digits) -> None:
    data = digits.train.renormalised(*public_constants(1))
    bank = EmbeddingBank(factory(data), size=2, seed=0)
    exact = release_class_statistics(bank, data, max_norm=1.0, noise_multiplier=0.0,
                                     generator=torch.Generator())
    errors = []
    for epsilon in (0.5, 4.0, 64.0):
        sigma = calibrate_gaussian(target_epsilon=epsilon, delta=1e-5)
        stats = release_class_statistics(bank, data, max_norm=1.0, noise_multiplier=sigma,
                                         generator=torch.Generator().manual_seed(1))
        errors.append(float((stats.means() - exact.means()).norm()))
    assert errors[0] > 3 * errors[1] > 9 * errors[2], errors
    assert errors[2] < 0.05 * float(exact.means().norm())
    both = exact + exact  # what a server adds: sums and counts apart, means unchanged
    torch.testing.assert_close(both.means(), exact.means())
    no_counts = ClassStatistics(exact.sums, torch.zeros(10))
    assert torch.equal(no_counts.means(), exact.sums)  # counts are floored at 1


def test_matching_fixed_means_lowers_the_loss_and_moves_the_images(tiny) -> None:
    bank = EmbeddingBank(factory(tiny), size=2, seed=0)
    targets = release_class_statistics(bank, tiny, max_norm=1.0, noise_multiplier=0.0,
                                       generator=torch.Generator()).means()
    g = torch.Generator().manual_seed(0)
    cfg = replace(BASE, ipc=2)
    start = torch.randn((6, *tiny.image_shape), generator=g)
    labels = torch.arange(3).repeat_interleave(2)
    synthetic = Synthetic.wrap(start.clone().requires_grad_(True), labels, cfg, g)
    losses = match_class_means(targets, bank, synthetic, iterations=30, lr=0.1)
    assert losses[-1] < 0.3 * losses[0], losses
    assert not torch.allclose(synthetic.images(), start)
    assert synthetic.images().abs().max() > 1.0  # unprojected: outside the pixel range (here [-1, 1])
    bounded = Synthetic.wrap(start.clone().requires_grad_(True), labels, cfg, g)
    match_class_means(targets, bank, bounded, iterations=5, lr=0.1, bounds=(-1.0, 1.0))
    assert bounded.images().abs().max() <= 1.0  # projected after every step
    feats = bank.features(tiny.x)
    assert float(mean_matching_loss(feats, tiny.y, targets)) == pytest.approx(0.0, abs=1e-8)  # real data fits


def test_dp_dm_releases_once_with_calibrated_sigma_and_records_the_exact_epsilon(tiny, monkeypatch) -> None:
    draws = []
    real_add_noise = class_release.add_noise

    def counting(tensors, std, generator):
        draws.append((std, [t.shape for t in tensors]))
        return real_add_noise(tensors, std, generator)

    monkeypatch.setattr(class_release, "add_noise", counting)
    cfg = replace(dp(BASE, 2.0, 1e-3), iterations=7)
    summary = distill(tiny, factory(tiny), cfg)
    sigma = calibrate_gaussian(target_epsilon=2.0, delta=1e-3)
    assert len(draws) == 1  # one release, whatever the number of image updates
    assert draws[0][0] == pytest.approx(sigma * cfg.dp.max_grad_norm)
    assert draws[0][1] == [torch.Size([3, 3 * 32 + 1])]  # K classes x (bank features + count)
    meta = summary.meta
    assert meta["method"] == "dp-dm" and meta["accountant"] == "analytic-gaussian"
    assert meta["steps"] == 1 and meta["sample-rate"] == 1.0 and meta["noise-multiplier"] == sigma
    assert meta["epsilon"] == gaussian_epsilon(noise_multiplier=sigma, delta=1e-3)
    assert meta["epsilon"] == pytest.approx(2.0, rel=1e-9)
    assert abs(meta["epsilon"] - pld_epsilon(sigma, 1e-3)) <= 0.05 * meta["epsilon"]
    assert meta["bank-size"] == 3 and meta["bank-seed"] == 0 and len(summary) == 6


def test_dp_dm_starts_from_noise_alone_and_refuses_real_starts(digits) -> None:
    cfg = replace(dp(BASE, 1.0), iterations=0)  # no update: the summary is the start
    data = digits.train.renormalised(*public_constants(1))
    other = data.subset(torch.arange(len(data) - 1, -1, -1)[:500])  # other records, same label space
    first, second = (distill(d, factory(d), cfg) for d in (data, other))
    assert torch.equal(first.images, second.images)  # the start does not depend on the private data
    with pytest.raises(PrivateInitError, match="init='noise'"):
        distill(data, factory(data), replace(cfg, init="real"))
    with pytest.raises(PrivateInitError, match="starts from noise"):
        distill(data, factory(data), cfg, init=first)


@pytest.mark.parametrize("factorised", [False, True])
def test_dp_dm_does_not_depend_on_the_datas_normalisation(factorised) -> None:
    own = load_dataset("digits", seed=0).train  # normalised with the training split's mean and std
    public = load_dataset("digits", seed=0, public_normalisation=True).train
    assert public.mean == (0.5,) and public.std == (0.5,) and own.mean != public.mean
    assert public.x.min() >= -1 and public.x.max() <= 1
    torch.testing.assert_close(own.denormalise(own.x), public.denormalise(public.x))
    cfg = replace(dp(BASE, 4.0), factorised=factorised, factor_hallucinators=2)
    cfg = replace(cfg, dp=replace(cfg.dp, secret_noise=False))  # the same noise in both runs
    a, b = distill(own, factory(own), cfg), distill(public, factory(public), cfg)
    assert a.meta["normalisation"] == "public, mapped to the data's" and b.meta["normalisation"] == "public"
    torch.testing.assert_close(own.denormalise(a.images), public.denormalise(b.images), atol=1e-4, rtol=1e-4)


def test_folding_the_normalisation_into_hallucinators_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    src = load_dataset("digits", seed=0, public_normalisation=True).train
    dst = load_dataset("digits", seed=0).train
    f = Factors(torch.randn((4, 1, 8, 8), generator=g), torch.randn((2, 1, 1, 3, 3), generator=g),
                torch.randn((2, 1), generator=g))
    summary = Summary.from_factors(f, torch.tensor([0, 1, 2, 3]))
    mapped = in_normalisation(summary, src, dst)
    torch.testing.assert_close(dst.denormalise(mapped.images), src.denormalise(summary.images))
    assert torch.equal(mapped.factors.bases, f.bases) and torch.equal(mapped.labels, summary.labels)
