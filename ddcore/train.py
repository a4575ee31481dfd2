"""The one training and evaluation loop: every method, the server and FedAvg use it."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ddcore.augment import augment
from ddcore.config import TrainConfig
from ddcore.data import Dataset
from ddcore.models import ModelFactory

Progress = Callable[[int, int, dict[str, float]], None]  # (step, total, metrics)


def num_steps(n: int, cfg: TrainConfig) -> int:
    """SGD steps that ``cfg`` asks for on ``n`` examples."""
    return max(cfg.epochs * math.ceil(n / cfg.batch_size), cfg.min_steps) if n else 0


def train_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    generator: torch.Generator,
    *,
    lrs: torch.Tensor | None = None,
    progress: Progress | None = None,
    proximal_mu: float = 0.0,
) -> nn.Module:
    """Train ``model`` in place with SGD on (images, labels) and return it.

    Parameters
    ----------
    images : torch.Tensor
        (n, C, H, W) normalised images.
    labels : torch.Tensor
        int64 (n,) or soft (n, K) targets.
    lrs : torch.Tensor | None
        Learned per-step learning rates (cycled); replaces ``cfg.lr`` and its decay.
    proximal_mu : float
        FedProx's proximal term (Li et al. 2020): ``mu / 2 * ||w - w0||^2`` is added to every
        step's loss, ``w0`` being the weights ``model`` starts from (the global model). 0 = off.
    """
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    n = images.shape[0]
    total = num_steps(n, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu else []
    model.train()
    step = 0
    while step < total:
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, cfg.batch_size):
            if step >= total:
                break
            idx = order[start : start + cfg.batch_size]
            if lrs is not None:
                lr = float(lrs[step % len(lrs)])
            else:
                lr = cfg.lr * (0.1 if cfg.lr_decay and step >= total // 2 else 1.0)
            for group in opt.param_groups:
                group["lr"] = lr
            x = augment(images[idx], cfg.dsa_strategy, generator, cfg.dsa_mode)
            loss = F.cross_entropy(model(x), labels[idx])
            objective = loss + proximal_mu / 2 * proximal(model, anchor) if proximal_mu else loss
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()
            step += 1
            if progress is not None:
                progress(step, total, {"loss": float(loss.detach())})
    return model


def proximal(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """``||w - w0||^2`` over every parameter of ``model`` against ``anchor`` (same order)."""
    return sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 1024) -> dict[str, float]:
    """Return ``{"accuracy": fraction, "loss": mean cross-entropy}`` of ``model`` on ``data``."""
    device = next(model.parameters()).device
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(data), batch_size):
        x = data.x[start : start + batch_size].to(device)
        y = data.y[start : start + batch_size].to(device)
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    n = max(len(data), 1)
    return {"accuracy": correct / n, "loss": loss_sum / n}


def train_and_evaluate(
    factory: ModelFactory,
    images: torch.Tensor,
    labels: torch.Tensor,
    test: Dataset,
    cfg: TrainConfig,
    seed: int,
    *,
    lrs: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """Train a fresh model (initialised from ``seed``) and evaluate it on ``test``."""
    generator = torch.Generator().manual_seed(seed)
    model = train_model(factory(generator), images, labels, cfg, generator, lrs=lrs, progress=progress)
    return model, evaluate(model, test)
