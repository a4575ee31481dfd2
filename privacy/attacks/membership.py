"""Membership inference on a trained model: loss threshold and LiRA with shadow models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddcore.data import Dataset
from privacy.attacks.metrics import roc_summary
from privacy.errors import PrivacyError

# (training data, generator) -> a model trained the way the target was
ShadowTrainer = Callable[[Dataset, torch.Generator], nn.Module]


@dataclass(frozen=True)
class AttackResult:
    """How well an attack tells members from non-members (0.5 AUC = guessing)."""

    attack: str
    auc: float
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    num_members: int
    num_nonmembers: int
    num_shadow_models: int = 0

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _result(attack: str, scores: np.ndarray, n_in: int, n_out: int, shadows: int = 0) -> AttackResult:
    is_member = np.r_[np.ones(n_in), np.zeros(n_out)]
    r = roc_summary(scores, is_member)
    return AttackResult(attack, r["auc"], r["tpr_at_1pct_fpr"], r["tpr_at_0.1pct_fpr"], n_in, n_out, shadows)


def _check(members: Dataset, nonmembers: Dataset) -> None:
    if len(members) == 0 or len(nonmembers) == 0:
        raise PrivacyError("membership inference needs at least one member and one non-member sample")


@torch.no_grad()
def per_sample_loss(model: nn.Module, data: Dataset, batch_size: int = 512) -> torch.Tensor:
    """Cross-entropy of every example (n,), the model in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = [F.cross_entropy(model(data.x[i:i + batch_size].to(device)), data.y[i:i + batch_size].to(device),
                           reduction="none").cpu() for i in range(0, len(data), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def logit_confidence(model: nn.Module, data: Dataset, batch_size: int = 512) -> torch.Tensor:
    """LiRA's statistic: log(p_y / (1 - p_y)) of the true label, computed stably from logits (n,)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(data), batch_size):
        logits = model(data.x[i:i + batch_size].to(device)).double().cpu()
        y = data.y[i:i + batch_size]
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(1)
        out.append(true - others)
    return torch.cat(out)


def loss_threshold_attack(model: nn.Module, members: Dataset, nonmembers: Dataset) -> AttackResult:
    """Yeom et al.: a lower loss means "member"; the ROC sweeps every threshold."""
    _check(members, nonmembers)
    scores = -torch.cat([per_sample_loss(model, members), per_sample_loss(model, nonmembers)]).numpy()
    return _result("loss-threshold", scores, len(members), len(nonmembers))


@dataclass(frozen=True)
class Shadows:
    """LiRA's shadow statistics over a candidate pool: each candidate's logit confidence under
    every shadow model (``confidence``, shadows x candidates) and whether the shadow trained on
    it (``inside``, same shape; every candidate is in exactly half of the shadows)."""

    confidence: torch.Tensor
    inside: torch.Tensor

    def __len__(self) -> int:
        return len(self.confidence)


def train_shadows(pool: Dataset, train_shadow: ShadowTrainer, *, num_shadow: int,
                  generator: torch.Generator, progress: Callable[[int], None] | None = None) -> Shadows:
    """``num_shadow`` shadow models (``train_shadow``, the target's recipe) on random halves of ``pool``.

    Each candidate is IN for exactly half of the shadows. ``progress(k)`` is called after shadow k.
    """
    if num_shadow < 2 or num_shadow % 2:
        raise PrivacyError(f"LiRA needs an even number >= 2 of shadow models, got {num_shadow}")
    n = len(pool)
    half = num_shadow // 2
    inside = torch.stack([torch.randperm(num_shadow, generator=generator) < half for _ in range(n)], 1)
    conf = []
    for k in range(num_shadow):
        shadow = train_shadow(pool.subset(torch.nonzero(inside[k]).flatten()), generator)
        conf.append(logit_confidence(shadow, pool))
        if progress is not None:
            progress(k)
    return Shadows(torch.stack(conf), inside)


def lira_scores(target_confidence: torch.Tensor, shadows: Shadows) -> torch.Tensor:
    """Online LiRA's per-candidate score: the log likelihood ratio of the target's confidence
    under the Gaussian fitted to the IN shadows against the one fitted to the OUT shadows.

    Means are per candidate; variances are pooled over candidates (the paper's choice for few
    shadows). Higher = more likely a member.
    """
    conf, mask = shadows.confidence, shadows.inside.double()
    mu_in = (conf * mask).sum(0) / mask.sum(0)
    mu_out = (conf * (1 - mask)).sum(0) / (1 - mask).sum(0)
    var_in = (((conf - mu_in) ** 2) * mask).sum() / mask.sum()
    var_out = (((conf - mu_out) ** 2) * (1 - mask)).sum() / (1 - mask).sum()
    t = target_confidence.double()
    return (-((t - mu_in) ** 2) / (2 * var_in + 1e-12) - 0.5 * torch.log(var_in + 1e-12)
            + ((t - mu_out) ** 2) / (2 * var_out + 1e-12) + 0.5 * torch.log(var_out + 1e-12))


def scored_attack(attack: str, scores: torch.Tensor, is_member: torch.Tensor,
                  shadows: int = 0) -> AttackResult:
    """ROC summary of any per-candidate ``scores`` (higher = member) given the truth ``is_member``."""
    member = is_member.bool()
    ordered = torch.cat([scores[member], scores[~member]]).double().numpy()
    return _result(attack, ordered, int(member.sum()), int((~member).sum()), shadows)


def lira_result(scores: torch.Tensor, is_member: torch.Tensor, shadows: int) -> AttackResult:
    """ROC summary of LiRA ``scores`` over candidates whose membership ``is_member`` gives."""
    return scored_attack("lira", scores, is_member, shadows)


def lira_attack(model: nn.Module, members: Dataset, nonmembers: Dataset, train_shadow: ShadowTrainer, *,
                num_shadow: int = 8, seed: int = 0) -> AttackResult:
    """Online LiRA (Carlini et al. 2022) with ``num_shadow`` shadow models.

    Each shadow model trains (with ``train_shadow``, the target's recipe) on a random half
    of the candidates (members and non-members pooled, each in half of the shadows); per
    candidate, Gaussians are fitted to its logit confidence under the shadows that saw it and
    those that did not, and the score is the likelihood ratio of the target's confidence
    (:func:`train_shadows`, :func:`lira_scores`).
    """
    _check(members, nonmembers)
    pool = Dataset(torch.cat([members.x, nonmembers.x]), torch.cat([members.y, nonmembers.y]),
                   members.num_classes, members.mean, members.std, members.name)
    shadows = train_shadows(pool, train_shadow, num_shadow=num_shadow,
                            generator=torch.Generator().manual_seed(seed))
    score = lira_scores(logit_confidence(model, pool), shadows)
    return _result("lira", score.numpy(), len(members), len(nonmembers), num_shadow)
