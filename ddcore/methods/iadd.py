"""Importance-aware parameter matching (IADD): MTT's loss with learned, pruned per-tensor weights."""

from __future__ import annotations

import torch

from ddcore.config import DistillConfig
from ddcore.data import Dataset
from ddcore.methods import register_method
from ddcore.methods.base import Schedule, start_synthetic
from ddcore.methods.mtt import LR_IMAGES, expert_trajectories, initial_log_lr, match_distances
from ddcore.methods.options import ImageOptions
from ddcore.methods.soft_labels import Targets
from ddcore.models import ModelFactory
from ddcore.summary import Summary
from ddcore.train import Progress

IMPORTANCE = "importance:"  # meta key prefix: importance:<parameter name> -> weight


def importances(logits: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Per-tensor weights (T,): a softmax over the live tensors scaled to mean 1 there; pruned = 0."""
    masked = logits.masked_fill(~alive, float("-inf"))
    return torch.softmax(masked, 0) * alive.sum()


def importances_of(summary: Summary) -> dict[str, float]:
    """The per-tensor importances an IADD summary records in its meta (empty for other summaries)."""
    return {k[len(IMPORTANCE):]: float(v) for k, v in summary.meta.items() if k.startswith(IMPORTANCE)}


def weighted_match_loss(num: torch.Tensor, den: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i ||student_i - target_i||^2 / sum_i w_i ||start_i - target_i||^2 (MTT when all w_i = 1)."""
    return (weights * num).sum() / (weights * den).sum()


def prune(weights: torch.Tensor, alive: torch.Tensor, threshold: float) -> torch.Tensor:
    """``alive`` without the tensors whose weight fell below ``threshold`` (the heaviest always stays)."""
    keep = alive & (weights >= threshold)
    if not keep.any():
        keep = torch.zeros_like(alive)
        keep[weights.argmax()] = True
    return keep


@register_method("iadd")
def distill(
    data: Dataset,
    model_factory: ModelFactory,
    cfg: DistillConfig,
    init: Summary | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Trajectory matching whose per-tensor importances are learned jointly with the images.

    The final importances go into the summary's meta as ``importance:<parameter name>``
    (read them back with :func:`importances`).
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    synthetic = start_synthetic(data, cfg, init, generator)
    options = ImageOptions(synthetic, data, cfg, generator)  # before the optimiser: may resize the leaves
    targets = Targets(synthetic.labels, data.num_classes, cfg, init)  # hard, or learned soft labels
    experts = expert_trajectories(data, model_factory, cfg, generator)
    net = model_factory(generator)  # the architecture for functional calls
    names = list(experts[0][0])
    logits = torch.zeros(len(names), device=cfg.device, requires_grad=True)  # (T,)
    alive = torch.ones(len(names), dtype=torch.bool, device=cfg.device)
    log_lr = initial_log_lr(data, cfg).requires_grad_(True)
    images = synthetic.param_groups(cfg.lr_or(LR_IMAGES))
    opt = torch.optim.Adam([*images, {"params": [log_lr], "lr": cfg.lr_lr},
                            {"params": [logits], "lr": cfg.iadd_lr_importance}, *targets.param_groups()])
    schedule = Schedule(cfg)
    for it in schedule:
        with options.autocast():
            num, den = match_distances(net, experts, options.images(), targets.current(), log_lr, cfg,
                                       generator)
            loss = weighted_match_loss(num, den, importances(logits, alive))
        options.step(loss, opt)
        with torch.no_grad():
            alive = prune(importances(logits, alive), alive, cfg.iadd_prune)
        if progress is not None:
            progress(it + 1, cfg.iterations, {"loss": float(loss.detach()), "live": float(alive.sum())})
    weights = importances(logits.detach(), alive).cpu()
    meta = {f"{IMPORTANCE}{name}": float(w) for name, w in zip(names, weights, strict=True)}
    meta.update({"syn-lr": float(log_lr.detach().exp()), "pruned-tensors": int((~alive).sum()),
                 **schedule.meta()})
    return targets.finish(synthetic.summary(data, cfg)).with_meta(**meta)
