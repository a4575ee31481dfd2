"""Collaborative rounds (FedAF, Wang et al. CVPR 2024): a global model's class means down, soft labels up.

From round 2 on, a client refines its summary with DM under fresh random networks plus
``weight * sum_c ||mean_i anchor.embed(aug(syn_c,i)) - target_c||^2`` under the frozen global model
(the *anchor*), where ``target_c`` is the mean embedding of the global summary's images of class c
(:func:`class_means`, computed by the server; no image goes down). It also reports the mean of
``softmax(anchor(x) / T)`` over its real images of each class (:func:`class_soft_labels`); the server
combines these count-weighted (:func:`combine`) and trains the global model with them as a
distillation term (:class:`ddcore.train.SoftTargets`). No Flower here: the apps move the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ddcore.augment import apply, sample_params
from ddcore.config import DistillConfig
from ddcore.data import Dataset
from ddcore.errors import ConfigError
from ddcore.methods import check_method
from ddcore.methods.dm import ExtraTerm, match
from ddcore.methods.options import options_meta
from ddcore.models import ModelFactory, embed_frozen
from ddcore.summary import Summary
from ddcore.train import Progress


@dataclass(frozen=True)
class ClassTargets:
    """Per-class mean embeddings of the global summary under the global model (what goes down)."""

    means: torch.Tensor  # (K, D) float32
    present: torch.Tensor  # (K,) bool: the classes the global summary holds (other rows mean nothing)

    def __post_init__(self) -> None:
        if self.means.dim() != 2 or tuple(self.present.shape) != (self.means.shape[0],):
            raise ValueError(f"class targets need means (K, D) and present (K,), got "
                             f"{tuple(self.means.shape)} and {tuple(self.present.shape)}")


@dataclass(frozen=True)
class ClassSoftLabels:
    """Per-class soft labels of real data (what goes up), or their count-weighted combination."""

    probs: torch.Tensor  # (K, K) float32: row c = mean softmax(model(x) / T) over class c; zero if absent
    counts: torch.Tensor  # (K,) int64: real images of each class behind the rows

    def per_example(self, labels: torch.Tensor) -> torch.Tensor:
        """Row ``labels[i]`` for every example (n, K): zero rows for classes nobody reported."""
        return self.probs[labels]


@torch.no_grad()
def class_means(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                chunk: int = 64) -> ClassTargets:
    """Mean ``model.embed`` of ``images`` (n, C, H, W) per class of ``labels`` (n,), no augmentation."""
    model.eval()
    device = next(model.parameters()).device
    features = embed_frozen(model, images.to(device), chunk, None).cpu()  # (n, D)
    labels = labels.cpu()
    sums = torch.zeros((num_classes, features.shape[1])).index_add(0, labels, features)  # (K, D)
    counts = torch.bincount(labels, minlength=num_classes)  # (K,)
    return ClassTargets(sums / counts.clamp(min=1)[:, None], counts > 0)


def anchor_term(anchor: nn.Module, targets: ClassTargets, weight: float, strategy: str,
                mode: str) -> ExtraTerm:
    """``weight * sum_c ||mean anchor.embed(aug(syn_c)) - targets.means[c]||^2`` over the covered classes.

    One augmentation draw per class per update (DSA, as DM's), applied to all of the class's images.
    """

    def term(syn: list[torch.Tensor], classes: list[int], generator: torch.Generator) -> torch.Tensor:
        kept = [(s, c) for s, c in zip(syn, classes, strict=True) if bool(targets.present[c])]
        if not kept:
            return torch.zeros(())
        images = torch.cat([apply(s, sample_params(strategy, 1, generator, mode, tuple(s.shape)))
                            for s, _ in kept])  # (m, C, H, W)
        features = anchor.embed(images).float().split([s.shape[0] for s, _ in kept])  # per class (m_c, D)
        means = targets.means.to(images.device)  # (K, D)
        loss = sum(((f.mean(0) - means[c]) ** 2).sum() for f, (_, c) in zip(features, kept, strict=True))
        return weight * loss

    return term


def distill_toward(
    data: Dataset,
    model_factory: ModelFactory,
    cfg: DistillConfig,
    *,
    anchor: nn.Module,
    targets: ClassTargets,
    weight: float,
    init: Summary | None = None,
    progress: Progress | None = None,
) -> Summary:
    """DM on ``data`` plus the anchor term (:func:`anchor_term`) toward ``targets`` under ``anchor``.

    ``model_factory`` gives DM's fresh random networks; ``anchor`` (the global model) is frozen
    here. ``weight`` 0 is plain DM. The term covers the classes that both the synthetic set and
    ``targets`` hold; the summary's meta records the weight and how many classes it covered.
    """
    if cfg.method != "dm" or cfg.dp.enabled or cfg.soft_labels != "none":
        raise ConfigError("collaborative matching is DM without DP or summary soft labels: use method='dm', "
                          "dp=false and soft-labels='none'")
    check_method(cfg)  # DM's own options (factorised, multires, ...)
    if weight < 0:
        raise ConfigError(f"collab-weight must be >= 0, got {weight}")
    if targets.means.shape[0] != data.num_classes:
        raise ValueError(f"targets cover {targets.means.shape[0]} classes, the data has {data.num_classes}")
    anchor.eval().requires_grad_(False)
    extra = anchor_term(anchor, targets, weight, cfg.dsa_strategy, cfg.dsa_mode) if weight else None
    summary = match(data, model_factory, cfg, init, progress, extra)
    held = set(summary.hard_labels().tolist())
    covered = sum(1 for c in held if bool(targets.present[c]))
    return summary.with_meta(**options_meta(cfg), **{"collab-weight": weight, "anchor-classes": covered})


@torch.no_grad()
def class_soft_labels(model: nn.Module, data: Dataset, temperature: float,
                      batch_size: int = 1024) -> ClassSoftLabels:
    """Mean ``softmax(model(x) / temperature)`` over ``data``'s images of each class, and the counts."""
    model.eval()
    device = next(model.parameters()).device
    k = data.num_classes
    sums = torch.zeros((k, k), dtype=torch.float64)
    for start in range(0, len(data), batch_size):
        logits = model(data.x[start : start + batch_size].to(device)).float().cpu()  # (b, K)
        probs = torch.softmax(logits / temperature, 1).double()
        sums.index_add_(0, data.y[start : start + batch_size], probs)
    counts = torch.bincount(data.y, minlength=k)  # (K,)
    return ClassSoftLabels((sums / counts.clamp(min=1)[:, None]).float(), counts)


def combine(parts: list[ClassSoftLabels], num_classes: int) -> ClassSoftLabels:
    """Row c: the count-weighted mean of the parts' rows c (zero where no part holds class c)."""
    weighted = torch.zeros((num_classes, num_classes), dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.long)
    for part in parts:
        weighted += part.counts[:, None].double() * part.probs.double()
        counts += part.counts
    return ClassSoftLabels((weighted / counts.clamp(min=1)[:, None]).float(), counts)
