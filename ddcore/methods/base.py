"""Pieces every method shares: per-class sampling of real data and the initial synthetic set."""

from __future__ import annotations

import torch

from ddcore.config import DistillConfig
from ddcore.data import Dataset
from ddcore.errors import ConfigError
from ddcore.summary import Summary


class ClassIndex:
    """Positions of each class in a label vector, for seeded per-class sampling."""

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        self.positions = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]

    def count(self, c: int) -> int:
        return int(self.positions[c].numel())

    def present(self) -> list[int]:
        """Classes with at least one example."""
        return [c for c, pos in enumerate(self.positions) if pos.numel() > 0]

    def sample(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """Up to ``n`` distinct positions of class ``c``, drawn with ``generator``."""
        pos = self.positions[c]
        return pos[torch.randperm(pos.numel(), generator=generator)[:n]]


def per_class_counts(data: Dataset, ipc: int) -> dict[int, int]:
    """Images to make per present class: ``min(ipc, examples of the class)``."""
    index = ClassIndex(data.y, data.num_classes)
    if not index.present():
        raise ConfigError(f"{data.name}: no examples to distill")
    return {c: min(ipc, index.count(c)) for c in index.present()}


def initial_images(
    data: Dataset, cfg: DistillConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting synthetic images and their labels, class by class.

    ``init="real"`` takes distinct random real images of the class; ``init="noise"`` draws
    N(0, 1) in normalised space (no private pixel enters the summary).
    """
    index = ClassIndex(data.y, data.num_classes)
    images, labels = [], []
    for c, k in per_class_counts(data, cfg.ipc).items():
        if cfg.init == "real":
            images.append(data.x[index.sample(c, k, generator)])
        else:
            images.append(torch.randn((k, *data.image_shape), generator=generator))
        labels.append(torch.full((k,), c, dtype=torch.long))
    return torch.cat(images).clone(), torch.cat(labels)


def start(
    data: Dataset, cfg: DistillConfig, init: Summary | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (a leaf tensor to optimise, on ``cfg.device``) and labels to start from."""
    if init is not None:
        images, labels = init.images.detach().clone(), init.hard_labels().clone()
    else:
        images, labels = initial_images(data, cfg, generator)
    return images.to(cfg.device).requires_grad_(True), labels.to(cfg.device)


def make_summary(images: torch.Tensor, labels: torch.Tensor, data: Dataset, cfg: DistillConfig) -> Summary:
    """Wrap the finished tensors with the metadata every summary carries."""
    return Summary(
        images.detach().cpu().float().contiguous(),
        labels.detach().cpu(),
        None,
        {"method": cfg.method, "ipc": cfg.ipc, "dataset": data.name, "seed": cfg.seed,
         "num-classes": data.num_classes, "init": cfg.init},
    )
