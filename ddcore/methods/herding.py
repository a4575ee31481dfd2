"""Herding coreset (Welling 2009): greedily pick real images whose mean embedding tracks the class mean."""

from __future__ import annotations

import torch

from ddcore.config import DistillConfig
from ddcore.data import Dataset
from ddcore.methods import register_method
from ddcore.methods.base import ClassIndex, make_summary, per_class_counts
from ddcore.models import ModelFactory
from ddcore.summary import Summary
from ddcore.train import Progress


def herd(features: torch.Tensor, k: int) -> list[int]:
    """Indices of ``k`` rows of ``features`` (n, D) chosen greedily to match their mean."""
    mean = features.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(mean)
    available = torch.ones(features.shape[0], dtype=torch.bool)
    for t in range(1, k + 1):
        candidate_means = (running + features) / t  # mean if each row were added next
        dist = ((candidate_means - mean) ** 2).sum(1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        running = running + features[i]
    return chosen


@register_method("herding")
def distill(
    data: Dataset,
    model_factory: ModelFactory,
    cfg: DistillConfig,
    init: Summary | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Herding in the embedding space of a randomly initialised network from ``model_factory``."""
    generator = torch.Generator().manual_seed(cfg.seed)
    net = model_factory(generator).eval()
    index = ClassIndex(data.y, data.num_classes)
    images, labels = [], []
    counts = per_class_counts(data, cfg.ipc)
    for step, (c, k) in enumerate(counts.items(), start=1):
        pos = index.positions[c]
        with torch.no_grad():
            feats = torch.cat([net.embed(data.x[pos[i : i + 512]].to(cfg.device)).cpu()
                               for i in range(0, pos.numel(), 512)])
        images.append(data.x[pos[herd(feats, k)]])
        labels.append(torch.full((k,), c, dtype=torch.long))
        if progress is not None:
            progress(step, len(counts), {})
    return make_summary(torch.cat(images), torch.cat(labels), data, cfg)
