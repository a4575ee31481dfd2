"""The Gaussian mechanism's pieces: Poisson sampling, per-sample clipping, noise, model checks."""

from __future__ import annotations

import logging
import secrets
import warnings
from typing import TYPE_CHECKING

import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from privacy.errors import UnsupportedModelError

if TYPE_CHECKING:
    from ddcore.config import DPConfig

logger = logging.getLogger(__name__)


def poisson_mask(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Bool (n,): each example is in the batch independently with probability ``sample_rate``."""
    return torch.rand(n, generator=generator) < sample_rate


def clip_rows(rows: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each row of (k, D) ``rows`` to L2 norm at most ``max_norm`` (differentiable)."""
    norms = rows.norm(dim=1, keepdim=True)
    return rows * (max_norm / (norms + 1e-6)).clamp(max=1.0)


def clipped_sum(per_sample: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Sum over examples of per-sample tensors, each example's joint L2 norm clipped to ``max_norm``.

    ``per_sample`` holds one (k, *shape) tensor per parameter; the norm of an example is taken
    over all of them together (flat clipping, as Opacus does).
    """
    k = per_sample[0].shape[0]
    if k == 0:
        return [torch.zeros(g.shape[1:], dtype=g.dtype, device=g.device) for g in per_sample]
    norms = torch.stack([g.reshape(k, -1).norm(dim=1) for g in per_sample], dim=1).norm(dim=1)  # (k,)
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("k,k...->...", factor, g) for g in per_sample]


def noise_generator(dp: DPConfig, seed: int) -> torch.Generator:
    """The generator a DP mechanism draws its noise (and Poisson sampling) from.

    With ``dp.secret_noise`` (the default) it is seeded from the operating system's entropy
    (:mod:`secrets`): the run's seeds are public - the server sends them - and noise that the
    server can redraw is noise it can subtract. Otherwise it is seeded with ``seed``, for
    experiments repeated bit for bit; a warning says that this protects against no one who
    knows the seed.
    """
    if dp.secret_noise:
        return torch.Generator().manual_seed(secrets.randbits(63))
    logger.warning("secret-noise = false: the DP noise is drawn from the run's seed %d; whoever knows "
                   "it (the server) can redraw and remove it", seed)
    return torch.Generator().manual_seed(seed)


def add_noise(tensors: list[torch.Tensor], std: float, generator: torch.Generator) -> list[torch.Tensor]:
    """``t + N(0, std^2)`` for each tensor, drawn from ``generator`` (no-op when ``std`` is 0)."""
    if std == 0:
        return tensors
    return [t + std * torch.randn(t.shape, generator=generator).to(t.device, t.dtype) for t in tensors]


def check_model(model: nn.Module) -> nn.Module:
    """Make ``model`` ready for per-sample gradients, or raise naming the fix.

    Opacus's validator rejects modules that mix examples (BatchNorm); in-place ReLUs are
    switched off in place because they break the backward hooks that compute per-sample
    gradients.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        names = sorted({type(e).__name__ for e in errors})
        batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        fix = ("BatchNorm mixes the examples of a batch and cannot be made private; build the model "
               "with GroupNorm or InstanceNorm instead (model-norm=instance or group, "
               "ModelSpec(norm='instance'))" if batchnorm else f"Opacus reports: {errors[0]}")
        raise UnsupportedModelError(f"the model cannot be trained with DP ({', '.join(names)}): {fix}")
    for module in model.modules():
        if isinstance(module, nn.ReLU | nn.LeakyReLU | nn.ELU) and getattr(module, "inplace", False):
            module.inplace = False
    return model


def grad_sample_module(model: nn.Module) -> GradSampleModule:
    """``model`` checked and wrapped to record per-sample gradients of a *summed* loss."""
    return GradSampleModule(check_model(model), loss_reduction="sum")


def per_sample_gradients(gsm: GradSampleModule, loss: torch.Tensor) -> list[torch.Tensor]:
    """Back-propagate a summed ``loss`` through ``gsm`` and take the (k, *shape) gradients out.

    The parameters' ``grad`` and ``grad_sample`` are cleared afterwards. (PyTorch warns that
    the full backward hooks fire although no input requires a gradient; that is the intended
    case here - only the parameters' per-sample gradients are wanted - so it is silenced.)
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()
    grads = []
    for p in gsm.parameters():
        if p.requires_grad:
            grads.append(p.grad_sample.detach())
            p.grad_sample = None
            p.grad = None
    return grads
