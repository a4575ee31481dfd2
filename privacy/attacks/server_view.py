"""Attacks on what the server receives from each client (threat model: an honest-but-curious server).

Each system sends something else, and each gets the attack that fits it:

- **images** (distilled summaries, random real images): the share of received images that are
  near-copies of a private record (:func:`privacy.attacks.memorisation.near_copy_threshold`,
  against the whole private set), and a membership attack whose score for a record is minus its
  L2 distance to the nearest received image (:func:`image_view`);
- **statistics** (per-class sums of bank features): the tracing attack of Homer et al. (2008)
  and Dwork, Smith, Steinke, Ullman & Vadhan (2015), score ``<phi(x) - mu_ref, m - mu_ref>`` with
  ``m`` the release's mean of the record's class and ``mu_ref`` the same class's mean over
  held-out reference records (:func:`tracing_scores`);
- **weights** (FedAvg updates): the change in a record's loss from the model a client received
  to the one it sent back (:func:`update_scores`).

Members are the clients' records, non-members held-out records of the same distribution.
Every attack reports its ROC AUC and TPR at 1% and 0.1% FPR (:func:`roc_summary`). Under DP every
ROC point must sit under ``e^eps FPR + delta`` (:func:`dp_bound_check`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import roc_curve

from ddcore.data import Dataset
from privacy.attacks.membership import per_sample_loss
from privacy.attacks.memorisation import near_copy_threshold, pixels_of
from privacy.attacks.metrics import roc_summary
from privacy.attacks.nearest import nearest_l2
from privacy.errors import AuditError


def membership_summary(member_scores: torch.Tensor, nonmember_scores: torch.Tensor) -> dict:
    """AUC, TPR at 1% / 0.1% FPR of scores (higher = member), with the sample sizes."""
    if len(member_scores) == 0 or len(nonmember_scores) == 0:
        raise AuditError("a membership attack needs at least one member and one non-member score")
    scores = torch.cat([member_scores, nonmember_scores]).double().numpy()
    truth = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    return {**roc_summary(scores, truth), "members": len(member_scores), "nonmembers": len(nonmember_scores)}


def nearest_scores(received: torch.Tensor, candidates: Dataset) -> torch.Tensor:
    """Minus each candidate's L2 distance (pixels in [0, 1]) to the nearest received image (n,)."""
    d, _ = nearest_l2(candidates.x, received, transform=pixels_of(candidates))
    return -d


def image_view(received: torch.Tensor, private: Dataset, heldout: Dataset, *,
               threshold: float | None = None, seed: int = 0) -> dict:
    """The image attacks on ``received`` (normalised like ``private``), all private records as members.

    ``near_copy_fraction``: received images within the near-copy threshold (L2 in pixels; the 1st
    percentile of private records' distances to their nearest other record, unless ``threshold``
    is given) of some private record. The membership attack scores every private record (members)
    and every held-out record (non-members) by minus its distance to the nearest received image:
    a record that was sent scores 0, above every non-member. ``sent_share``: private records with
    a received image within the threshold, the share an attacker finds at (almost) no false
    positive.
    """
    if len(received) == 0:
        raise AuditError("the server received no image to attack")
    if threshold is None:
        threshold = near_copy_threshold(private, seed=seed)
    pixels = pixels_of(private)
    to_private, _ = nearest_l2(received, private.x, transform=pixels)
    members, nonmembers = nearest_scores(received, private), nearest_scores(received, heldout)
    return {"near_copy_fraction": float((to_private <= threshold).float().mean()),
            "near_copies": int((to_private <= threshold).sum()), "received_images": len(received),
            "near_copy_threshold": threshold, "sent_share": float((-members <= threshold).float().mean()),
            **membership_summary(members, nonmembers)}


def tracing_scores(features: torch.Tensor, labels: torch.Tensor, release_means: torch.Tensor,
                   reference_means: torch.Tensor) -> torch.Tensor:
    """``<phi(x) - mu_ref_y, m_y - mu_ref_y>`` per record (n,): features (n, D), labels (n,), means (K, D)."""
    ref = reference_means[labels]
    return ((features - ref) * (release_means[labels] - ref)).sum(1)


def class_reference(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean feature (K, D) of held-out reference records (0 for a class with none)."""
    sums = torch.zeros((num_classes, features.shape[1]), dtype=torch.float64).index_add_(0, labels,
                                                                                        features.double())
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).double()
    return (sums / counts[:, None]).float()


def update_scores(before: torch.nn.Module, after: torch.nn.Module, candidates: Dataset) -> torch.Tensor:
    """How much a client's update lowered each candidate's loss: loss under the model it received
    minus loss under the model it sent back (n,); higher = more likely in the client's data."""
    return per_sample_loss(before, candidates) - per_sample_loss(after, candidates)


def dp_bound_check(member_scores: torch.Tensor, nonmember_scores: torch.Tensor, *, epsilon: float,
                   delta: float, beta: float = 0.05) -> dict:
    """Does every ROC point of the attack sit under ``TPR <= e^eps FPR + delta``?

    ``max_excess``: the largest ``TPR - e^eps FPR - delta`` over the measured points (> 0 can
    happen by sampling alone: at FPR 0 the bound is delta, and the top score is a member about
    half the time whatever the mechanism). ``violations``: the points where even the
    Clopper-Pearson bounds disagree with DP - the lower confidence bound of the TPR above
    ``e^eps`` times the upper bound of the FPR plus delta, each at ``1 - beta / (2 points)``
    (Bonferroni over the points), so all verdicts together hold at confidence ``1 - beta``.
    ``holds`` is True when there is none. An infinite epsilon always holds.
    """
    from scipy.stats import beta as beta_dist

    scores = torch.cat([member_scores, nonmember_scores]).double().numpy()
    truth = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    fpr, tpr, _ = roc_curve(truth, scores)
    if not math.isfinite(epsilon):
        return {"epsilon": epsilon, "delta": delta, "max_excess": None, "violations": 0, "holds": True,
                "points": len(fpr)}
    bound = math.exp(epsilon)
    n_in, n_out = len(member_scores), len(nonmember_scores)
    level = beta / (2 * len(fpr))
    tp, fp = np.rint(tpr * n_in), np.rint(fpr * n_out)
    tpr_low = np.where(tp > 0, beta_dist.ppf(level, tp, n_in - tp + 1), 0.0)
    fpr_high = np.where(fp < n_out, beta_dist.ppf(1 - level, fp + 1, n_out - fp), 1.0)
    violations = int((tpr_low > bound * fpr_high + delta).sum())
    return {"epsilon": epsilon, "delta": delta, "max_excess": float((tpr - bound * fpr - delta).max()),
            "violations": violations, "holds": violations == 0, "points": len(fpr), "beta": beta}
