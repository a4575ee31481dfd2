"""Soft labels: a teacher's softened logits (any method), or label logits learned with the images.

``soft_labels="teacher"`` relabels a finished summary with ``softmax(teacher(x) / T)`` of a
network trained on the real data; ``soft_labels="learned"`` lets the unrolled methods (DD, MTT,
IADD) train per-image label logits jointly with the images, since their inner training on the
summary is differentiable in its targets. Either way the summary's labels are (n, K) rows that
are probability distributions.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F

from ddcore.config import DistillConfig, TrainConfig
from ddcore.data import Dataset
from ddcore.models import ModelFactory
from ddcore.summary import Summary
from ddcore.train import evaluate, train_model

log = logging.getLogger(__name__)
LOGIT_SCALE = 5.0  # learned logits start at scale * one-hot: about 0.94 on the class for K = 10
TEACHER_BATCH = 64  # the teacher's mini-batch: small clients still get several steps per epoch


class Targets:
    """The targets an unrolled method trains on: fixed hard labels, or learned (n, K) distributions.

    With ``cfg.soft_labels == "learned"`` the logits are a leaf to optimise (``param_groups``),
    started from ``init``'s soft labels when they fit, else from ``LOGIT_SCALE * one_hot``;
    otherwise ``current()`` is the hard labels and there is nothing to optimise.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int, cfg: DistillConfig,
                 init: Summary | None = None) -> None:
        self.labels = labels  # (n,) int64
        self.lr = cfg.lr_labels
        self.logits: torch.Tensor | None = None  # (n, K) when learned
        if cfg.soft_labels == "learned":
            if init is not None and init.soft and init.labels.shape == (labels.shape[0], num_classes):
                start = init.labels.detach().float().clamp_min(1e-6).log().to(labels.device)
            else:
                start = F.one_hot(labels, num_classes).float() * LOGIT_SCALE
            self.logits = start.requires_grad_(True)

    def current(self) -> torch.Tensor:
        """int64 (n,) hard labels, or the current (n, K) distributions (differentiable)."""
        return self.labels if self.logits is None else torch.softmax(self.logits, 1)

    def param_groups(self) -> list[dict]:
        """Optimiser groups: the label logits at ``lr_labels``, or none."""
        return [] if self.logits is None else [{"params": [self.logits], "lr": self.lr}]

    def finish(self, summary: Summary) -> Summary:
        """``summary`` carrying the learned distributions (unchanged when labels are not learned)."""
        if self.logits is None:
            return summary
        return replace(summary, labels=self.current().detach().float().cpu())


def teacher_labels(summary: Summary, data: Dataset, model_factory: ModelFactory,
                   cfg: DistillConfig) -> Summary:
    """``summary`` relabelled with ``softmax(teacher(x) / teacher_temperature)``, rows (n, K).

    The teacher is a fresh ``model_factory`` network trained on ``data`` for ``teacher_epochs``
    epochs with cfg's DSA; its accuracy on ``data`` goes into the meta.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    train_cfg = TrainConfig(epochs=cfg.teacher_epochs, lr=cfg.lr_net, batch_size=TEACHER_BATCH, min_steps=0,
                            dsa_strategy=cfg.dsa_strategy, dsa_mode=cfg.dsa_mode)
    teacher = train_model(model_factory(generator), data.x, data.y, train_cfg, generator)
    accuracy = evaluate(teacher, data)["accuracy"]
    log.info("teacher: %d epochs, %.3f accuracy on the client's data", cfg.teacher_epochs, accuracy)
    with torch.no_grad():
        logits = teacher(summary.images.to(cfg.device)).float()  # (n, K)
    probs = torch.softmax(logits / cfg.teacher_temperature, 1).cpu()
    return replace(summary, labels=probs).with_meta(**{"teacher-accuracy": accuracy})
