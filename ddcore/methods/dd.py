"""Meta-model matching (DD, Wang et al. 2018): images and per-step learning rates, learned by unrolling."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ddcore.config import DistillConfig, TrainConfig
from ddcore.data import Dataset
from ddcore.methods import register_method
from ddcore.methods.base import ClassIndex, Schedule, start_synthetic
from ddcore.methods.options import ImageOptions
from ddcore.methods.soft_labels import Targets
from ddcore.methods.unroll import params_of, unroll
from ddcore.models import ModelFactory
from ddcore.summary import Summary
from ddcore.train import Progress

TRAIN_MOMENTUM = TrainConfig().momentum  # the heavy-ball momentum train_model applies to Summary.lrs
# Adam step on the images when lr_images is unset: suits IPC 10; IPC 1 prefers a larger one
# (measured in docs/benchmark_methods.md)
LR_IMAGES = 0.01


def to_trainer_lrs(step_sizes: torch.Tensor) -> torch.Tensor:
    """Plain-SGD step sizes as train_model learning rates: lr / (1 - momentum) is the same step."""
    return step_sizes * (1 - TRAIN_MOMENTUM)


def initial_log_lrs(cfg: DistillConfig, init: Summary | None) -> torch.Tensor:
    """Log step sizes (syn_steps,) to start from: ``init``'s learned ones if they fit, else ``lr_net``."""
    if init is not None and init.lrs is not None and init.lrs.numel() == cfg.syn_steps:
        return (init.lrs.detach().float() / (1 - TRAIN_MOMENTUM)).log().to(cfg.device)
    return torch.full((cfg.syn_steps,), math.log(cfg.lr_net), device=cfg.device)


@register_method("dd")
def distill(
    data: Dataset,
    model_factory: ModelFactory,
    cfg: DistillConfig,
    init: Summary | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Learn images and step sizes so that ``syn_steps`` SGD steps on them fit a real batch.

    Each update draws a fresh network (or reuses one with ``cfg.dd_fixed_init``), trains it
    functionally on the synthetic set, and backpropagates the trained network's loss on
    ``dd_batch_real`` real images per class through the whole unroll. The unroll is plain SGD on
    the plain images (``cfg.dd_augment`` applies ``dsa_strategy`` in it, which cost accuracy at
    IPC 1: docs/benchmark_methods.md); ``Summary.lrs`` holds the learned steps converted
    for train_model's momentum SGD.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    index = ClassIndex(data.y, data.num_classes)
    synthetic = start_synthetic(data, cfg, init, generator)
    options = ImageOptions(synthetic, data, cfg, generator)  # before the optimiser: may resize the leaves
    targets = Targets(synthetic.labels, data.num_classes, cfg, init)  # hard, or learned soft labels
    classes = sorted(set(synthetic.labels.tolist()))
    log_lrs = initial_log_lrs(cfg, init).requires_grad_(True)  # (syn_steps,)
    images = synthetic.param_groups(cfg.lr_or(LR_IMAGES))
    opt = torch.optim.Adam([*images, {"params": [log_lrs], "lr": cfg.lr_lr},
                            *targets.param_groups()])
    fixed = model_factory(generator) if cfg.dd_fixed_init else None
    strategy = cfg.dsa_strategy if cfg.dd_augment else "none"
    schedule = Schedule(cfg)
    for it in schedule:
        net = fixed if fixed is not None else model_factory(generator)
        with options.autocast():
            trained = unroll(net, params_of(net), options.images(), targets.current(), log_lrs.exp(),
                             strategy, generator, cfg.dsa_mode)
            idx = torch.cat([index.sample(c, cfg.dd_batch_real, generator) for c in classes])
            real_x, real_y = data.x[idx].to(cfg.device), data.y[idx].to(cfg.device)  # (b, C, H, W), (b,)
            loss = F.cross_entropy(functional_call(net, trained, (real_x,)), real_y)
        options.step(loss, opt)
        if progress is not None:
            lr = float(log_lrs.detach().exp().mean())
            progress(it + 1, cfg.iterations, {"loss": float(loss.detach()), "lr": lr})
    summary = targets.finish(synthetic.summary(data, cfg)).with_meta(
        **{"fixed-init": cfg.dd_fixed_init, "lrs-momentum": TRAIN_MOMENTUM}, **schedule.meta())
    return replace(summary, lrs=to_trainer_lrs(log_lrs.detach().exp()).cpu())
