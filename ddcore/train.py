"""The one training and evaluation loop: every method, the server and FedAvg use it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ddcore.augment import augment
from ddcore.config import TrainConfig
from ddcore.data import Dataset
from ddcore.models import ModelFactory

Progress = Callable[[int, int, dict[str, float]], None]  # (step, total, metrics)


@dataclass(frozen=True)
class SoftTargets:
    """Per-example soft targets for a distillation term in :func:`train_model` (FedAF's server loss).

    Every step adds ``weight * T^2 * KL(probs[i] || softmax(model(x_i) / T))``, averaged over the
    batch; an all-zero row is an example without a target (it adds nothing). The ``T^2`` factor
    (Hinton et al. 2015) keeps the term's gradients on the scale of the cross-entropy's at any T.
    """

    probs: torch.Tensor  # (n, K): rows are distributions, or all zero (no target)
    weight: float
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.temperature <= 0:
            raise ValueError(f"soft targets need weight >= 0 and temperature > 0, got {self.weight}, "
                             f"{self.temperature}")


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
    soft_targets: SoftTargets | None = None,
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
    soft_targets : SoftTargets | None
        A distillation term against per-example soft targets (rows aligned with ``images``),
        added to every step's loss beside the cross-entropy on ``labels``. None = off.
    """
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    n = images.shape[0]
    kd = soft_targets if soft_targets is not None and soft_targets.weight > 0 else None
    if kd is not None and kd.probs.shape[0] != n:
        raise ValueError(f"{kd.probs.shape[0]} soft-target rows for {n} images")
    targets = kd.probs.to(device) if kd is not None else torch.empty(0)
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
            logits = model(x)
            loss = F.cross_entropy(logits, labels[idx])
            objective = loss + proximal_mu / 2 * proximal(model, anchor) if proximal_mu else loss
            if kd is not None:
                objective = objective + kd.weight * distillation_loss(logits, targets[idx], kd.temperature)
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


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(targets || softmax(logits / T))`` per row, averaged over the batch (zero rows add 0).

    ``logits`` (b, K), ``targets`` (b, K) distributions or all-zero rows.
    """
    log_q = F.log_softmax(logits.float() / temperature, 1)  # (b, K)
    kl = (torch.xlogy(targets, targets) - targets * log_q).sum(1)  # (b,): 0 where the row is zero
    return temperature**2 * kl.mean()


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
