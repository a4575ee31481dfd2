"""Trajectory matching (MTT, Cazenavette et al. 2022): a student trained on the images follows experts."""

from __future__ import annotations

import logging
import math

import torch

from ddcore.config import DistillConfig, TrainConfig
from ddcore.data import Dataset
from ddcore.methods import register_method
from ddcore.methods.base import Schedule, start_synthetic
from ddcore.methods.options import ImageOptions
from ddcore.methods.soft_labels import Targets
from ddcore.methods.unroll import Params, params_of, tensor_distances, unroll
from ddcore.models import ModelFactory
from ddcore.summary import Summary
from ddcore.train import Progress, num_steps, train_model

log = logging.getLogger(__name__)
Trajectory = list[Params]  # checkpoints after 0, 1, ..., mtt_expert_epochs epochs
# Adam step on the images when lr_images is unset (MTT and IADD; 0.01 left mnist5k IPC 1 images
# near their real start in 100 updates: docs/benchmark_methods.md)
LR_IMAGES = 0.1


def expert_config(cfg: DistillConfig) -> TrainConfig:
    """One epoch of plain SGD at ``lr_net`` with cfg's DSA (MTT's experts: no momentum or decay)."""
    return TrainConfig(epochs=1, lr=cfg.lr_net, momentum=0.0, weight_decay=0.0, min_steps=0, lr_decay=False,
                       dsa_strategy=cfg.dsa_strategy, dsa_mode=cfg.dsa_mode)


def expert_trajectories(
    data: Dataset, model_factory: ModelFactory, cfg: DistillConfig, generator: torch.Generator
) -> list[Trajectory]:
    """Train ``cfg.mtt_experts`` fresh networks on the real data, keeping a checkpoint per epoch."""
    train_cfg = expert_config(cfg)
    experts = []
    for e in range(cfg.mtt_experts):
        net = model_factory(generator)
        trajectory = [params_of(net)]
        for _ in range(cfg.mtt_expert_epochs):
            train_model(net, data.x, data.y, train_cfg, generator)
            trajectory.append(params_of(net))
        experts.append(trajectory)
        log.info("expert %d/%d trained for %d epochs", e + 1, cfg.mtt_experts, cfg.mtt_expert_epochs)
    return experts


def initial_log_lr(data: Dataset, cfg: DistillConfig) -> torch.Tensor:
    """The student's log step size: covers the experts' span, lr_net * expert steps / mtt_syn_steps."""
    expert_steps = cfg.mtt_expert_span * num_steps(len(data), expert_config(cfg))
    return torch.tensor(math.log(cfg.lr_net * expert_steps / cfg.mtt_syn_steps), device=cfg.device)


def match_distances(
    net: torch.nn.Module,
    experts: list[Trajectory],
    images: torch.Tensor,
    labels: torch.Tensor,
    log_lr: torch.Tensor,
    cfg: DistillConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Start a student at a random expert checkpoint t, train it ``mtt_syn_steps`` steps on the images.

    Returns per-tensor (T,) squared distances student->expert_{t+M} and expert_t->expert_{t+M}.
    """
    trajectory = experts[int(torch.randint(len(experts), (1,), generator=generator))]
    t = int(torch.randint(cfg.mtt_max_start + 1, (1,), generator=generator))
    begin, target = trajectory[t], trajectory[t + cfg.mtt_expert_span]
    lrs = log_lr.exp().expand(cfg.mtt_syn_steps)
    student = unroll(net, begin, images, labels, lrs, cfg.dsa_strategy, generator, cfg.dsa_mode)
    return tensor_distances(student, begin, target)


@register_method("mtt")
def distill(
    data: Dataset,
    model_factory: ModelFactory,
    cfg: DistillConfig,
    init: Summary | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Minimise ||student_end - expert_{t+M}||^2 / ||expert_t - expert_{t+M}||^2 over images and lr.

    Experts are trained on ``data`` once per call and kept only for the call.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    synthetic = start_synthetic(data, cfg, init, generator)
    options = ImageOptions(synthetic, data, cfg, generator)  # before the optimiser: may resize the leaves
    targets = Targets(synthetic.labels, data.num_classes, cfg, init)  # hard, or learned soft labels
    experts = expert_trajectories(data, model_factory, cfg, generator)
    net = model_factory(generator)  # the architecture for functional calls; its weights are unused
    log_lr = initial_log_lr(data, cfg).requires_grad_(True)
    images = synthetic.param_groups(cfg.lr_or(LR_IMAGES))
    opt = torch.optim.Adam([*images, {"params": [log_lr], "lr": cfg.lr_lr},
                            *targets.param_groups()])
    schedule = Schedule(cfg)
    for it in schedule:
        with options.autocast():
            num, den = match_distances(net, experts, options.images(), targets.current(), log_lr, cfg,
                                       generator)
            loss = num.sum() / den.sum()
        options.step(loss, opt)
        if progress is not None:
            lr = float(log_lr.detach().exp())
            progress(it + 1, cfg.iterations, {"loss": float(loss.detach()), "lr": lr})
    summary = targets.finish(synthetic.summary(data, cfg))
    return summary.with_meta(**{"syn-lr": float(log_lr.detach().exp())}, **schedule.meta())
