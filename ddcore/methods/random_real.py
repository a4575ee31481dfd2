"""Random real samples: the baseline every distillation method must beat."""

from __future__ import annotations

from dataclasses import replace

import torch

from ddcore.config import DistillConfig
from ddcore.data import Dataset
from ddcore.methods import register_method
from ddcore.methods.base import initial_images, make_summary
from ddcore.models import ModelFactory
from ddcore.summary import Summary
from ddcore.train import Progress


@register_method("random_real")
def distill(
    data: Dataset,
    model_factory: ModelFactory,
    cfg: DistillConfig,
    init: Summary | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Pick ``min(ipc, n_c)`` distinct real images of every class ``c``, seeded."""
    generator = torch.Generator().manual_seed(cfg.seed)
    images, labels = initial_images(data, replace(cfg, init="real"), generator)
    return make_summary(images, labels, data, cfg)
