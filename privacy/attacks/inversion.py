"""Gradient inversion of a FedAvg client update (Inverting Gradients, Geiping et al. 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from ddcore.data import Dataset
from privacy.attacks.metrics import psnr, ssim
from privacy.errors import PrivacyError


@dataclass(frozen=True)
class InversionResult:
    """Reconstructions (normalised like the data) and their quality against the truth."""

    images: torch.Tensor  # (b, C, H, W), reordered to match the true images
    psnr: float  # mean dB over the batch, pixel space [0, 1]
    ssim: float
    loss: float  # final attack objective of the best restart


def client_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of the mean cross-entropy a client computes on its batch (what it leaks)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(x), y), params)]


def update_to_gradient(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], lr: float,
                       names: list[str]) -> list[torch.Tensor]:
    """The gradient behind a FedAvg update of one plain SGD step: ``(before - after) / lr``.

    With several local steps (or momentum) this is the average gradient along the way, which
    the attack then treats as one batch's gradient (the usual approximation).
    """
    if lr <= 0:
        raise PrivacyError(f"the client's learning rate must be > 0, got {lr}")
    return [(before[n] - after[n]).float() / lr for n in names]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (the image prior)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _cosine_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    dot = sum((x * y).sum() for x, y in zip(a, b, strict=True))
    na = torch.sqrt(sum((x * x).sum() for x in a))
    nb = torch.sqrt(sum((y * y).sum() for y in b))
    return 1 - dot / (na * nb + 1e-12)


def invert_gradient(model: nn.Module, target: list[torch.Tensor], labels: torch.Tensor,
                    image_shape: tuple[int, int, int], *, steps: int = 300, restarts: int = 2,
                    lr: float = 0.1, tv_weight: float = 1e-2, generator: torch.Generator) -> torch.Tensor:
    """Images whose gradient on ``model`` points the way ``target`` does (labels known).

    Minimises ``1 - cos(grad(x), target) + tv_weight * TV(x)`` with Adam from ``restarts``
    Gaussian starts (learning rate decayed at 3/8, 5/8, 7/8 of the steps, as in the paper) and
    keeps the start with the lowest final objective. Returns (b, C, H, W) normalised images.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    best, best_loss = None, float("inf")
    for _ in range(restarts):
        x = torch.randn((len(labels), *image_shape), generator=generator).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[steps * 3 // 8, steps * 5 // 8, steps * 7 // 8], gamma=0.1)
        for _ in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(model(x), labels), params, create_graph=True)
            loss = _cosine_distance(list(grads), target) + tv_weight * total_variation(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        final = float(loss.detach())
        if final < best_loss:
            best, best_loss = x.detach().clone(), final
    return best


def score_reconstruction(recon: torch.Tensor, truth: torch.Tensor, data: Dataset,
                         loss: float = float("nan")) -> InversionResult:
    """PSNR/SSIM in pixel space after matching each reconstruction to a true image (Hungarian)."""
    r = data.denormalise(recon).clamp(0, 1)
    t = data.denormalise(truth).clamp(0, 1)
    cost = ((r[:, None] - t[None]) ** 2).flatten(2).mean(2)  # (b, b) MSE
    rows, cols = linear_sum_assignment(cost.numpy())
    order = torch.as_tensor(rows[cols.argsort()])
    r, recon = r[order], recon[order]
    return InversionResult(recon, float(psnr(r, t).mean()), float(ssim(r, t).mean()), loss)


def save_comparison(truth: torch.Tensor, recon: torch.Tensor, data: Dataset, path: str | Path,
                    title: str = "") -> None:
    """A PNG with the true images on top and their reconstructions below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = data.denormalise(truth).clamp(0, 1)
    r = data.denormalise(recon).clamp(0, 1)
    b = len(t)
    fig, axes = plt.subplots(2, b, figsize=(1.2 * b + 0.6, 2.8), squeeze=False)
    for row, imgs, name in ((0, t, "truth"), (1, r, "reconstruction")):
        for i in range(b):
            img = imgs[i].permute(1, 2, 0).squeeze(-1).numpy()
            axes[row][i].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            axes[row][i].axis("off")
        axes[row][0].set_title(name, fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
