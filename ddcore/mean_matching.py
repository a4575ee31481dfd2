"""Optimise synthetic images so their mean bank features match given (fixed) class means."""

from __future__ import annotations

import torch

from ddcore.bank import EmbeddingBank
from ddcore.methods.base import Synthetic
from ddcore.train import Progress

OPTIMISERS = ("adam", "sgd")


def mean_matching_loss(features: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over the classes in ``labels`` of |mean feature of the class - its target|^2.

    ``features`` (n, D) of the synthetic images, ``labels`` (n,), ``targets`` (K, D).
    """
    classes = labels.unique()
    sums = torch.zeros((targets.shape[0], features.shape[1]), dtype=features.dtype, device=features.device)
    sums = sums.index_add(0, labels, features)  # (K, D)
    counts = torch.bincount(labels, minlength=targets.shape[0]).clamp(min=1).to(features.dtype)
    return ((sums / counts[:, None] - targets)[classes] ** 2).sum()


def match_class_means(
    targets: torch.Tensor,
    bank: EmbeddingBank,
    synthetic: Synthetic,
    *,
    iterations: int,
    lr: float,
    optimiser: str = "adam",
    bounds: tuple[float, float] | None = None,
    progress: Progress | None = None,
) -> list[float]:
    """Step ``synthetic`` ``iterations`` times towards ``targets`` (K, D); returns the losses.

    Every step embeds all synthetic images with the whole bank (no sampling: the targets are
    fixed, so the loss is deterministic). With ``bounds`` (the normalised values a real pixel
    can take) the images are projected back into them after every step, so the finished set
    needs no clamping that would undo what was matched. Using the targets any number of times
    is post-processing: when they were released under DP, this costs no further privacy.
    """
    if optimiser not in OPTIMISERS:
        raise ValueError(f"unknown optimiser {optimiser!r}; known: {', '.join(OPTIMISERS)}")
    groups = synthetic.param_groups(lr)
    opt = (torch.optim.Adam(groups) if optimiser == "adam" else torch.optim.SGD(groups, momentum=0.5))
    targets = targets.to(synthetic.labels.device)
    losses = []
    for it in range(iterations):
        loss = mean_matching_loss(bank.features(synthetic.images()), synthetic.labels, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bounds is not None:
            with torch.no_grad():
                synthetic.leaves.clamp_(*bounds)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(it + 1, iterations, {"loss": losses[-1]})
    return losses
