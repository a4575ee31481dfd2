"""FADRM options of the matching methods (residual, multi-resolution, precision) and soft labels."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from client.task import distill_local
from ddcore.cli import build_config, build_parser
from ddcore.config import DistillConfig, DPConfig, TrainConfig
from ddcore.errors import ConfigError
from ddcore.methods import distill
from ddcore.methods.base import ClassIndex, start_synthetic
from ddcore.methods.dd import TRAIN_MOMENTUM
from ddcore.methods.dm import dm_loss, embed_pair
from ddcore.methods.options import ImageOptions, real_patches
from ddcore.methods.soft_labels import LOGIT_SCALE
from ddcore.methods.unroll import params_of, unroll
from ddcore.models import ModelSpec, model_factory
from ddcore.runconfig import RunConfig, from_flat, run_preset, to_flat
from ddcore.train import train_and_evaluate

SPEC = ModelSpec(width=8, depth=2)
CFG = DistillConfig(method="dm", ipc=2, iterations=6, batch_real=16, dd_batch_real=16, init="noise",
                    model=SPEC, syn_steps=3, mtt_syn_steps=3, mtt_expert_epochs=3, mtt_expert_span=2,
                    mtt_max_start=1)


def factory(data):
    return model_factory(SPEC, data.image_shape, data.num_classes)


def class_mean_distance(data, summary) -> float:
    """Mean L2 distance of each synthetic image to the real mean of its class."""
    means = torch.stack([data.x[data.y == c].mean(0) for c in range(data.num_classes)])
    return float((summary.images - means[summary.hard_labels()]).flatten(1).norm(dim=1).mean())


def roughness(images: torch.Tensor) -> float:
    """Mean squared difference of neighbouring pixels (high for noise, low for smooth images)."""
    return float(((images[..., 1:, :] - images[..., :-1, :]) ** 2).mean()
                 + ((images[..., 1:] - images[..., :-1]) ** 2).mean())


def test_residual_mix_is_the_convex_combination_with_same_class_real_patches(digits, one_thread) -> None:
    data = digits.train
    cfg = replace(CFG, residual_alpha=0.25)
    synthetic = start_synthetic(data, cfg, None, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    options = ImageOptions(synthetic, data, cfg, generator)
    before = synthetic.leaves.detach().clone()
    replay = torch.Generator().set_state(generator.get_state())
    options.mix()
    patches = real_patches(data, ClassIndex(data.y, data.num_classes), synthetic.labels, (8, 8), replay)
    assert torch.allclose(synthetic.leaves, 0.25 * before + 0.75 * patches, atol=1e-6)
    assert synthetic.leaves.requires_grad and synthetic.leaves.is_leaf  # still the optimised tensor
    assert data.x.min() - 1e-5 <= patches.min() and patches.max() <= data.x.max() + 1e-5  # resampled pixels


def test_uncropped_patches_are_real_images_of_the_right_class(digits, monkeypatch) -> None:
    data = digits.train
    monkeypatch.setattr("ddcore.methods.options.PATCH_SCALE", (1.0, 1.0))
    labels = torch.tensor([0, 3, 3, 9])
    patches = real_patches(data, ClassIndex(data.y, 10), labels, (8, 8), torch.Generator().manual_seed(0))
    for patch, label in zip(patches, labels, strict=True):
        same = (data.x - patch).flatten(1).abs().amax(1) < 1e-5
        assert same.any() and (data.y[same] == label).all()


def test_residual_mixing_pulls_dm_images_toward_real_data(digits, one_thread) -> None:
    data = digits.train
    cfg = replace(CFG, lr_images=1e-6)  # the images barely move by themselves
    plain = distill(data, factory(data), cfg)
    mixed = distill(data, factory(data), replace(cfg, residual_alpha=0.5, residual_every=1))
    assert class_mean_distance(data, mixed) < 0.7 * class_mean_distance(data, plain)
    assert mixed.meta["residual-alpha"] == 0.5 and mixed.meta["residual-every"] == 1


def test_multires_optimises_half_size_leaves_then_full_size(digits, one_thread) -> None:
    data = digits.train
    cfg = replace(CFG, multires=0.5, iterations=4)
    synthetic = start_synthetic(data, cfg, None, torch.Generator().manual_seed(0))
    options = ImageOptions(synthetic, data, cfg, torch.Generator())
    opt = torch.optim.SGD(synthetic.param_groups(0.1), momentum=0.5)
    sides = []
    for _ in range(cfg.iterations):
        images = options.images()
        assert images.shape == (20, 1, 8, 8)
        sides.append(synthetic.leaves.shape[-1])
        options.step((images - 1).pow(2).sum(), opt)
    assert sides == [4, 4, 8, 8]
    assert opt.param_groups[0]["params"][0] is synthetic.leaves  # the optimiser follows the new leaf


def test_multires_summary_is_full_size_and_smooth(digits, one_thread) -> None:
    data = digits.train
    cfg = replace(CFG, iterations=10)
    plain = distill(data, factory(data), cfg)
    multires = distill(data, factory(data), replace(cfg, multires=0.9))  # 9 updates at 4x4, 1 at 8x8
    assert multires.images.shape == plain.images.shape == (20, 1, 8, 8)
    assert roughness(multires.images) < 0.4 * roughness(plain.images)  # noise start, upsampled from 4x4
    assert multires.meta["multires"] == 0.9


def dm_objective(data, summary, probes: int = 8) -> float:
    """DM's loss in float32 over fixed probe networks and real batches."""
    g = torch.Generator().manual_seed(1234)
    index = ClassIndex(data.y, data.num_classes)
    total = 0.0
    for _ in range(probes):
        net = factory(data)(g)
        real = [data.x[index.sample(c, 16, g)] for c in range(data.num_classes)]
        syn = [summary.images[summary.labels == c] for c in range(data.num_classes)]
        with torch.no_grad():
            total += float(dm_loss(*embed_pair(net, real, syn, CFG.dsa_strategy, g)))
    return total / probes


def test_bf16_precision_runs_and_lowers_dms_loss(digits, one_thread) -> None:
    data = digits.train
    # the 28x28 step: the 8x8 default (sgd_image_step) is 12x smaller, slow from noise in 20 updates
    cfg = replace(CFG, iterations=20, precision="bf16", lr_images=1.0)
    start = distill(data, factory(data), replace(cfg, iterations=0))
    end = distill(data, factory(data), cfg)
    assert end.images.dtype == torch.float32 and torch.isfinite(end.images).all()
    before, after = dm_objective(data, start), dm_objective(data, end)
    assert after < 0.5 * before, (before, after)
    assert end.meta["precision"] == "bf16"
    fp32 = distill(data, factory(data), replace(cfg, precision="fp32"))
    assert not torch.equal(end.images, fp32.images)  # the bf16 forward passes changed the updates
    options = ImageOptions(start_synthetic(data, cfg, None, torch.Generator()), data, cfg, torch.Generator())
    with options.autocast():
        assert factory(data)(torch.Generator()).embed(data.x[:4]).dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["dm", "gm", "dd", "mtt", "iadd"])
def test_every_matching_method_runs_with_all_image_options(tiny, one_thread, method) -> None:
    learned = method in ("dd", "mtt", "iadd")
    cfg = replace(CFG, method=method, iterations=4, residual_alpha=0.5, residual_every=1, multires=0.5,
                  precision="bf16", soft_labels="learned" if learned else "none", outer_loop=2)
    s = distill(tiny, factory(tiny), cfg)
    assert s.images.shape == (6, 1, 8, 8) and torch.isfinite(s.images).all()
    assert s.hard_labels().tolist() == [0, 0, 1, 1, 2, 2]
    if learned:
        assert s.labels.shape == (6, 3) and torch.allclose(s.labels.sum(1), torch.ones(6))
    assert (s.meta["method"], s.meta["precision"], s.meta["multires"]) == (method, "bf16", 0.5)


def dd_real_loss(data, summary, probes: int = 8) -> float:
    """DD's objective: loss on real data of probe networks after the unroll on the summary."""
    g = torch.Generator().manual_seed(1234)
    index = ClassIndex(data.y, data.num_classes)
    steps = summary.lrs / (1 - TRAIN_MOMENTUM)
    total = 0.0
    for _ in range(probes):
        net = factory(data)(g)
        trained = unroll(net, params_of(net), summary.images, summary.labels, steps, CFG.dsa_strategy, g)
        idx = torch.cat([index.sample(c, 16, g) for c in range(data.num_classes)])
        total += float(F.cross_entropy(functional_call(net, trained, (data.x[idx],)), data.y[idx]).detach())
    return total / probes


def test_learned_soft_labels_alone_lower_dds_objective(tiny, one_thread) -> None:
    cfg = replace(CFG, method="dd", iterations=30, lr_net=0.1, soft_labels="learned", lr_labels=0.1,
                  lr_images=1e-9, lr_lr=1e-9)  # only the labels learn
    start = distill(tiny, factory(tiny), replace(cfg, iterations=0))
    end = distill(tiny, factory(tiny), cfg)
    initial = torch.softmax(LOGIT_SCALE * F.one_hot(start.hard_labels(), 3).float(), 1)
    assert torch.allclose(start.labels, initial)
    assert end.labels.shape == (6, 3) and (end.labels >= 0).all()
    assert torch.allclose(end.labels.sum(1), torch.ones(6))
    assert (end.labels - initial).abs().max() > 0.1  # they were learned
    before, after = dd_real_loss(tiny, start), dd_real_loss(tiny, end)
    assert after < 0.97 * before, (before, after)


def test_learned_soft_labels_with_images_lower_dds_objective(tiny, one_thread) -> None:
    cfg = replace(CFG, method="dd", iterations=30, lr_net=0.1, lr_images=0.05, lr_lr=0.05,
                  soft_labels="learned")
    start = distill(tiny, factory(tiny), replace(cfg, iterations=0))
    end = distill(tiny, factory(tiny), cfg)
    before, after = dd_real_loss(tiny, start), dd_real_loss(tiny, end)
    assert after < 0.8 * before, (before, after)
    resumed = distill(tiny, factory(tiny), replace(cfg, iterations=0), init=end)  # resumes the labels
    assert torch.allclose(resumed.labels, end.labels, atol=1e-5)


def test_teacher_soft_labels_are_distributions_that_train_a_model(digits, one_thread) -> None:
    data = digits.train
    cfg = replace(CFG, method="random_real", init="real", ipc=5, soft_labels="teacher", teacher_epochs=10)
    s = distill(data, factory(data), cfg)
    classes = torch.arange(10).repeat_interleave(5)
    assert s.labels.shape == (50, 10) and s.labels.dtype == torch.float32 and (s.labels >= 0).all()
    assert torch.allclose(s.labels.sum(1), torch.ones(50), atol=1e-5)
    assert s.labels.max() < 0.999  # soft, not one-hot
    assert s.meta["teacher-accuracy"] > 0.5 and s.meta["soft-labels"] == "teacher"
    assert (s.labels.argmax(1) == classes).float().mean() > 0.5  # the teacher mostly agrees
    train = TrainConfig(epochs=50, min_steps=100)
    _, result = train_and_evaluate(factory(data), s.images, s.labels, digits.test, train, seed=0)
    assert result["accuracy"] > 0.25  # chance is 0.1


def test_dp_refuses_real_patches_and_teacher_labels() -> None:
    dp = DPConfig(enabled=True, target_epsilon=1.0)
    with pytest.raises(ConfigError, match=r"residual mixing copies real patches.*residual-alpha=1"):
        DistillConfig(dp=dp, init="noise", residual_alpha=0.9)
    with pytest.raises(ConfigError, match=r"teacher soft labels.*DP forbids"):
        DistillConfig(dp=dp, init="noise", soft_labels="teacher")
    DistillConfig(dp=dp, init="noise", residual_alpha=1.0)  # off is fine


@pytest.mark.parametrize("changes, message", [
    ({"precision": "fp16"}, "fp16 needs a CUDA device"),
    ({"precision": "fp8"}, "unknown precision 'fp8'"),
    ({"soft_labels": "maybe"}, "unknown soft-labels"),
    ({"residual_alpha": 0.0}, r"residual-alpha must be in \(0, 1\]"),
    ({"residual_every": 0}, "residual-every >= 1"),
    ({"multires": 1.0}, r"multires .* in \[0, 1\)"),
    ({"teacher_epochs": 0}, "teacher-epochs >= 1"),
])
def test_bad_option_values_raise(changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        DistillConfig(**changes)


@pytest.mark.parametrize("method, changes, message", [
    ("random_real", {"multires": 0.5}, "method 'random_real' does not support multires"),
    ("herding", {"precision": "bf16", "residual_alpha": 0.5}, "does not support residual-alpha, precision"),
    ("dm", {"soft_labels": "learned"}, r"needs a method that unrolls .*dd, iadd, mtt.*not 'dm'.*teacher"),
    ("gm", {"soft_labels": "learned"}, "not 'gm'"),
])
def test_an_option_a_method_cannot_apply_raises(tiny, method, changes, message) -> None:
    with pytest.raises(ConfigError, match=message):
        distill(tiny, factory(tiny), replace(CFG, method=method, **changes))


def test_options_round_trip_through_the_run_config_and_the_cli() -> None:
    flat = {"method": "dd", "residual-alpha": 0.8, "residual-every": 10, "multires": 0.5, "precision": "bf16",
            "soft-labels": "learned", "lr-labels": 0.2, "teacher-epochs": 3, "teacher-temperature": 2.0}
    cfg = from_flat(flat)
    d = cfg.distill
    assert (d.residual_alpha, d.residual_every, d.multires, d.precision, d.soft_labels, d.lr_labels,
            d.teacher_epochs, d.teacher_temperature) == (0.8, 10, 0.5, "bf16", "learned", 0.2, 3, 2.0)
    assert from_flat(to_flat(cfg)) == cfg
    assert {k: to_flat(cfg)[k] for k in flat} == flat
    assert to_flat(RunConfig())["soft-labels"] == "none"
    args = build_parser().parse_args(["distill", "--method", "dd", "--residual-alpha", "0.8", "--multires",
                                      "0.5", "--precision", "bf16", "--soft-labels", "learned"])
    expected = replace(run_preset("central").distill, method="dd", residual_alpha=0.8, multires=0.5,
                       precision="bf16", soft_labels="learned")  # the CLI's own preset underneath
    assert build_config(args).distill == expected


def test_the_flower_client_task_distills_with_the_options(tiny, one_thread) -> None:
    cfg = from_flat({"method": "mtt", "ipc": 2, "iterations": 3, "model-width": 8, "model-depth": 2,
                     "syn-steps": 2, "mtt-expert-epochs": 3, "mtt-max-start": 1, "residual-alpha": 0.5,
                     "residual-every": 1, "multires": 0.5, "precision": "bf16", "soft-labels": "learned",
                     "allow-near-copies": True})  # residual mixing pastes real patches in
    summary, _ = distill_local(tiny, cfg, tiny.num_classes, seed=3)
    assert summary.images.shape == (6, 1, 8, 8) and summary.soft
    assert torch.allclose(summary.labels.sum(1), torch.ones(6))
    assert (summary.meta["residual-alpha"], summary.meta["soft-labels"]) == (0.5, "learned")
