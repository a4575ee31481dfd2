"""Scores of the audits: ROC AUC and TPR at a fixed FPR, PSNR and SSIM of images in [0, 1]."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve


def roc_summary(scores: np.ndarray, is_member: np.ndarray) -> dict[str, float]:
    """AUC and the TPR at 1% and 0.1% FPR of ``scores`` (higher = more likely a member)."""
    fpr, tpr, _ = roc_curve(is_member, scores)
    return {"auc": float(roc_auc_score(is_member, scores)),
            "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
            "tpr_at_0.1pct_fpr": tpr_at_fpr(fpr, tpr, 0.001)}


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Highest TPR whose FPR is at most ``target`` (0 if the curve never gets that low)."""
    ok = fpr <= target
    return float(tpr[ok].max()) if ok.any() else 0.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (n, C, H, W) images in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean SSIM per image pair of (n, C, H, W) images in [0, 1] (uniform window, valid region).

    ``a`` and ``b`` broadcast over the first dimension. The window shrinks to the image side
    for images smaller than ``window`` (8x8 digits).
    """
    a, b = torch.broadcast_tensors(a, b)
    k = min(window, a.shape[-1], a.shape[-2])
    c1, c2 = 0.01**2, 0.03**2

    def pool(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, k, stride=1)

    mu_a, mu_b = pool(a), pool(b)
    var_a = pool(a * a) - mu_a**2
    var_b = pool(b * b) - mu_b**2
    cov = pool(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
