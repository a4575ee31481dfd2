"""Each method improves its own objective on a tiny problem; baselines pick real images."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ddcore.config import DistillConfig
from ddcore.errors import UnknownNameError
from ddcore.methods import METHODS, distill
from ddcore.methods.base import ClassIndex
from ddcore.methods.dm import dm_loss, embed_pair
from ddcore.methods.gm import gm_loss
from ddcore.methods.herding import herd
from ddcore.models import ModelSpec, model_factory

SPEC = ModelSpec(width=8, depth=2)
CFG = DistillConfig(ipc=2, iterations=30, batch_real=16, init="noise", model=SPEC, outer_loop=2)


def factory(data):
    return model_factory(SPEC, data.image_shape, data.num_classes)


def mean_objective(data, images, labels, loss_fn, probes: int = 8) -> float:
    """The method's loss averaged over fixed probe networks, batches and augmentations."""
    g = torch.Generator().manual_seed(1234)
    index = ClassIndex(data.y, data.num_classes)
    classes = sorted(set(labels.tolist()))
    total = 0.0
    for _ in range(probes):
        net = factory(data)(g)
        real = [data.x[index.sample(c, 16, g)] for c in classes]
        syn = [images[labels == c] for c in classes]
        total += float(loss_fn(net, real, syn, classes, g))
    return total / probes


def _dm(net, real, syn, classes, g):
    with torch.no_grad():
        return dm_loss(*embed_pair(net, real, syn, CFG.dsa_strategy, g))


def _gm(net, real, syn, classes, g):
    return gm_loss(net, real, syn, classes, CFG.dsa_strategy, g).detach()


@pytest.mark.parametrize("method, loss_fn", [("dm", _dm), ("gm", _gm)])
def test_method_lowers_its_matching_loss(tiny, method, loss_fn) -> None:
    # the 28x28 step: at 8x8 the default (sgd_image_step) is 12x smaller and lowers GM's loss from
    # noise too slowly for 30 updates (tests/test_image_sizes.py checks the default's loss)
    cfg = replace(CFG, method=method, lr_images={"dm": 1.0, "gm": 0.1}[method])
    start = distill(tiny, factory(tiny), replace(cfg, iterations=0))
    end = distill(tiny, factory(tiny), cfg)
    assert torch.equal(start.labels, end.labels)
    before = mean_objective(tiny, start.images, start.labels, loss_fn)
    after = mean_objective(tiny, end.images, end.labels, loss_fn)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("method", ["dm", "gm", "random_real", "herding"])
def test_every_method_has_the_shared_shape(tiny, method) -> None:
    s = distill(tiny, factory(tiny), replace(CFG, method=method, iterations=2, init="real"))
    assert s.images.shape == (6, 1, 8, 8) and s.images.dtype == torch.float32
    assert s.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert s.meta["method"] == method and s.meta["ipc"] == 2
    assert torch.isfinite(s.images).all()


def test_random_real_takes_distinct_real_images_and_caps_small_classes(tiny) -> None:
    small = tiny.subset(torch.cat([torch.arange(0, 20), torch.arange(20, 21)]))  # class 1 has 1 image
    s = distill(small, factory(small), replace(CFG, method="random_real", ipc=3))
    assert s.labels.tolist() == [0, 0, 0, 1]
    for img, label in zip(s.images, s.labels, strict=True):
        matches = (small.x == img).flatten(1).all(1)
        assert matches.sum() == 1 and small.y[matches][0] == label
    assert len({img.numpy().tobytes() for img in s.images}) == 4


def test_herding_tracks_the_mean_better_than_a_random_subset() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn((200, 16), generator=g) + torch.linspace(0, 3, 200).unsqueeze(1)
    chosen = herd(feats, 5)
    assert len(set(chosen)) == 5
    herd_err = float(((feats[chosen].mean(0) - feats.mean(0)) ** 2).sum())
    rand_errs = [float(((feats[torch.randperm(200, generator=g)[:5]].mean(0) - feats.mean(0)) ** 2).sum())
                 for _ in range(50)]
    assert herd_err < sorted(rand_errs)[2]


def test_seeded_methods_are_deterministic(tiny) -> None:
    cfg = replace(CFG, method="dm", iterations=3)
    a, b = distill(tiny, factory(tiny), cfg), distill(tiny, factory(tiny), cfg)
    assert torch.equal(a.images, b.images)
    c = distill(tiny, factory(tiny), replace(cfg, seed=1))
    assert not torch.equal(a.images, c.images)


def test_unknown_method_lists_known_ones(tiny) -> None:
    with pytest.raises(UnknownNameError, match=r"unknown method 'nope'; known: .*dm.*gm"):
        distill(tiny, factory(tiny), replace(CFG, method="nope"))
    assert {"dm", "gm", "random_real", "herding"} <= set(METHODS.names())
