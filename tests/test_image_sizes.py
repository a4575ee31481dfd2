"""Defaults that follow the data: the methods work on 8x8, 16x16 and 32x32 colour images untuned."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ddcore.augment import AUTO, apply, resolve, sample_params
from ddcore.config import DistillConfig, TrainConfig
from ddcore.data import Dataset
from ddcore.methods import distill, dm, gm
from ddcore.methods.base import ClassIndex, sgd_image_step
from ddcore.models import ModelSpec, build_model, model_factory
from ddcore.train import train_and_evaluate

SHAPES = [(1, 8, 8), (1, 16, 16), (3, 32, 32)]
SPEC = ModelSpec(width=16, depth=3)
CLASSES = 4


def prototypes(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """One smooth random pattern per class (a coarse grid upsampled), (CLASSES, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    coarse = torch.randn((CLASSES, c, 4, 4), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def noisy_classes(shape: tuple[int, int, int], n_per_class: int, seed: int) -> Dataset:
    """Each image is its class prototype under heavy pixel noise: one image says little, the
    class mean says everything - the regime where a distilled image should beat a real one.
    The noise grows with the side, so a larger image is not simply easier. Pixels are
    normalised per channel to mean 0 and std 1 (with the generating distribution's moments), as
    :func:`ddcore.data.load_dataset` leaves every real dataset."""
    g = torch.Generator().manual_seed(seed)
    protos = prototypes(shape)
    y = torch.arange(CLASSES).repeat_interleave(n_per_class)
    noise = 1.5 * shape[1] / 8
    x = protos[y] + noise * torch.randn((len(y), *shape), generator=g)
    mean = protos.mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1): moments of the mixture
    std = (protos.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + noise ** 2).sqrt()
    name = f"noisy{shape[1]}x{shape[2]}"
    return Dataset((x - mean) / std, y, CLASSES, (0.5,) * shape[0], (0.2,) * shape[0], name)


def test_auto_strategy_follows_size_and_channels() -> None:
    assert resolve(AUTO, (1, 8, 8)) == "none"
    assert "flip" not in resolve(AUTO, (1, 28, 28)) and "rotate" in resolve(AUTO, (1, 28, 28))
    assert "flip" in resolve(AUTO, (3, 32, 32))
    assert resolve("crop", (1, 8, 8)) == "crop"  # an explicit strategy is kept
    small, large = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 28, 28)
    assert torch.equal(apply(small, sample_params(AUTO, 1, torch.Generator(), shape=small.shape)), small)
    # auto draws exactly what the strategy it resolves to draws
    auto = sample_params(AUTO, 1, torch.Generator().manual_seed(0), shape=large.shape)
    grey = sample_params(resolve(AUTO, large.shape), 1, torch.Generator().manual_seed(0))
    assert torch.equal(apply(large, auto), apply(large, grey)) and not torch.equal(apply(large, auto), large)
    with pytest.raises(ValueError, match="shape"):
        sample_params(AUTO, 1, torch.Generator())


def test_one_op_mode_applies_a_single_shared_op() -> None:
    x = torch.randn(4, 1, 28, 28)
    params = sample_params("crop_cutout", 1, torch.Generator().manual_seed(3), mode="one")
    assert params[0][0] == "one" and len(params) == 3
    out = apply(x, params)
    only = [p for p in params[1:] if p[0] == ("crop" if float(params[0][1]["pick"]) < 0.5 else "cutout")]
    assert torch.equal(out, apply(x, only))


@pytest.mark.parametrize("shape", SHAPES)
def test_convnet_keeps_at_least_two_by_two_features(shape) -> None:
    net = build_model(ModelSpec(width=4, depth=3), shape, 10, torch.Generator().manual_seed(0))
    features = net.embed(torch.zeros(1, *shape))
    side = 2 if shape[1] == 8 else shape[1] // 8
    assert features.shape[1] == 4 * side * side


def test_sgd_image_step_is_unchanged_on_28x28_and_scales_with_the_pixels() -> None:
    # the README's MNIST / Fashion-MNIST figures were made with exactly these steps
    assert dm.LR_IMAGES == 1.0 and gm.LR_IMAGES == 0.1
    assert sgd_image_step(dm.LR_IMAGES, (1, 28, 28)) == 1.0
    assert sgd_image_step(gm.LR_IMAGES, (1, 28, 28)) == 0.1
    assert sgd_image_step(1.0, (1, 8, 8)) == 64 / 784
    assert sgd_image_step(0.1, (3, 32, 32)) == 0.1 * (1024 / 784)  # channels do not count


def test_gm_draws_a_fresh_network_every_update_only_where_auto_does_not_augment() -> None:
    cfg = DistillConfig(method="gm", outer_loop=10)
    assert gm.networks_per_update(cfg, (1, 8, 8)) == 1
    assert gm.networks_per_update(cfg, (1, 28, 28)) == 10  # MNIST's figures keep their trajectory
    assert gm.networks_per_update(cfg, (3, 32, 32)) == 10
    assert gm.networks_per_update(replace(cfg, dsa_strategy="none"), (1, 8, 8)) == 10  # explicit: kept


@pytest.mark.parametrize("method", ["dm", "gm"])
@pytest.mark.parametrize("shape, lr_set", [((1, 28, 28), None), ((1, 8, 8), None), ((1, 8, 8), 0.5)])
def test_methods_step_their_images_with_the_resolved_size(method, shape, lr_set, monkeypatch) -> None:
    steps = []
    sgd = torch.optim.SGD

    def spy(params, **kwargs):
        params = list(params)
        steps.append(params[0]["lr"] if isinstance(params[0], dict) else kwargs["lr"])
        return sgd(params, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", spy)
    data = noisy_classes(shape, 2, seed=0)
    cfg = DistillConfig(method=method, ipc=1, iterations=1, batch_real=2, model=SPEC, lr_images=lr_set)
    distill(data, model_factory(SPEC, shape, CLASSES), cfg)
    tuned = {"dm": 1.0, "gm": 0.1}[method]
    if lr_set is not None:
        expected = lr_set
    else:  # 28x28: the literal step the README's figures were made with
        expected = tuned if shape == (1, 28, 28) else sgd_image_step(tuned, shape)
    assert steps[0] == expected  # the images' optimiser is the first SGD built


def matching_loss(method: str, data: Dataset, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The method's loss averaged over fixed probe networks, real batches and augmentations."""
    g = torch.Generator().manual_seed(1234)
    index, classes = ClassIndex(data.y, data.num_classes), sorted(set(labels.tolist()))
    strategy = resolve(AUTO, data.image_shape)
    factory = model_factory(SPEC, data.image_shape, CLASSES)
    total = 0.0
    for _ in range(6):
        net = factory(g)
        real = [data.x[index.sample(c, 32, g)] for c in classes]
        syn = [images[labels == c] for c in classes]
        if method == "dm":
            with torch.no_grad():
                total += float(dm.dm_loss(*dm.embed_pair(net, real, syn, strategy, g)))
        else:
            total += float(gm.gm_loss(net, real, syn, classes, strategy, g).detach())
    return total / 6


# GM's loss on fresh probe networks falls slowly at 8x8: measured 123.6 -> 120.0 in 30 updates with a
# fresh network per update (gm.networks_per_update), 122.6 when the network trained on the synthetic set
# between updates (117.4 with a 4x larger step, which trains worse: 8x8 digits prefer the small step)
LOSS_CASES = [(m, shape, 0.985 if (m, shape) == ("gm", SHAPES[0]) else 0.9)
              for m in ("dm", "gm") for shape in SHAPES]


@pytest.mark.parametrize("method, shape, ratio", LOSS_CASES)
def test_matching_lowers_its_loss_at_every_size(shape, method, ratio, one_thread) -> None:
    data = noisy_classes(shape, 40, seed=1)
    factory = model_factory(SPEC, shape, CLASSES)
    cfg = DistillConfig(method=method, ipc=1, iterations=30, batch_real=32, model=SPEC)  # default step
    start = distill(data, factory, replace(cfg, iterations=0))
    end = distill(data, factory, cfg)
    before = matching_loss(method, data, start.images, start.labels)
    after = matching_loss(method, data, end.images, end.labels)
    assert after < ratio * before, (before, after)


# Gains of the default settings (sgd_image_step) over random real images, measured on these sets with 4
# seeds (2 here): 16x16 DM +13.0, GM +12.8; 32x32x3 DM +13.0, GM +15.2 (on a second noise seed: 16x16
# +12.0, +11.8; 32x32x3 DM +9.3, GM +14.9). 8x8 is held to 5 points: there everything tops out near
# what the 4 class-mean images of the training set reach (87.1% over 16 seeds, 88.9% on seeds 0-3;
# all 160 training images: 95.6%), and random real images are strong and erratic (74.9% over 16
# seeds, 79.6% on seeds 0-3, 73.8% on the 2 here with a 62% run at seed 0). DM: 87.0% over 16
# seeds (+12.1), 88.9% on seeds 0-3 (+9.3), +15 here. GM, with a fresh network per update where auto
# does not augment (gm.networks_per_update): 83.9% over 16 seeds (+9.0; +5.2 when it trained its
# network on the synthetic set), 88.9% on seeds 0-3 (+9.3; was +4.3), +12.2 here.
# 16x16 is held to 5 points since the instrument fix (one DSA op per batch in training, f15cfce):
# random real images rose to 88.75% on the 2 seeds here (88.75% over seeds 0-3 too), DM and GM to
# 95.5% (+6.75; +7.4 / +6.6 over seeds 0-3), near the ceiling of this data. 32x32x3 keeps 10 points:
# DM 98.25%, GM 97.25% against random real 83.5% on the 2 seeds here (seeds 0-3: +13.8 / +13.1).
@pytest.mark.parametrize("method, shape, gain", [("dm", SHAPES[0], 0.05), ("gm", SHAPES[0], 0.05),
                                                 ("dm", SHAPES[1], 0.05), ("gm", SHAPES[1], 0.05),
                                                 ("dm", SHAPES[2], 0.10), ("gm", SHAPES[2], 0.10)])
def test_matching_beats_random_real_images_untuned(shape, method, gain, one_thread) -> None:
    train, test = noisy_classes(shape, 40, seed=1), noisy_classes(shape, 50, seed=2)
    factory = model_factory(SPEC, shape, CLASSES)
    cfg = DistillConfig(method=method, ipc=1, iterations=60, batch_real=32, model=SPEC)  # defaults otherwise
    train_cfg = TrainConfig(epochs=1, min_steps=150)
    scores = {}
    for name in (method, "random_real"):
        accs = []
        for seed in range(2):
            summary = distill(train, factory, replace(cfg, method=name, seed=seed))
            _, result = train_and_evaluate(factory, summary.images, summary.labels, test, train_cfg, seed)
            accs.append(result["accuracy"])
        scores[name] = sum(accs) / len(accs)
    assert scores[method] >= scores["random_real"] + gain, scores
