"""Options of the matching methods (FADRM ideas): data residual, multi-resolution, mixed precision.

A method wraps its :class:`~ddcore.methods.base.Synthetic` set in :class:`ImageOptions` before it
builds its optimiser, reads the images through ``images()``, computes its loss inside
``autocast()`` and lets ``step(loss, opt)`` update the images. That step also mixes real patches
into the images every ``residual_every`` updates (``residual_alpha < 1``) and, after the first
``multires * iterations`` updates made at half resolution, continues at full resolution.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import replace

import torch
import torch.nn.functional as F

from ddcore.config import DistillConfig
from ddcore.data import Dataset
from ddcore.errors import ConfigError
from ddcore.methods.base import ClassIndex, Synthetic

IMAGE_OPTION_METHODS = frozenset({"dm", "gm", "dd", "mtt", "iadd"})  # methods that use ImageOptions
LEARNED_LABEL_METHODS = frozenset({"dd", "mtt", "iadd"})  # unroll training on the set: labels can learn
PATCH_SCALE = (0.5, 1.0)  # side of a real patch, as a fraction of the image side
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: str) -> bool:
    """Whether ``device`` runs bf16 matrix products in hardware (CPU: avx512_bf16 or AMX)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def real_dtype(cfg: DistillConfig) -> torch.dtype | None:
    """Autocast dtype of the no-grad passes over real data (``cfg.real_precision``); None = fp32.

    ``auto`` picks bf16 only where the hardware runs it natively: emulated bf16 is slower than fp32.
    """
    if cfg.real_precision == "auto":
        return torch.bfloat16 if native_bf16(cfg.device) else None
    return AUTOCAST_DTYPES.get(cfg.real_precision)


def check_options(method: str, cfg: DistillConfig) -> None:
    """Raise :class:`ConfigError` if ``method`` cannot honour an option ``cfg`` switches on."""
    image_options = [name for name, on in (("residual-alpha", cfg.residual_alpha < 1),
                                           ("multires", cfg.multires > 0),
                                           ("precision", cfg.precision != "fp32")) if on]
    if image_options and method not in IMAGE_OPTION_METHODS:
        raise ConfigError(f"method {method!r} does not support {', '.join(image_options)}; use one of "
                          f"{', '.join(sorted(IMAGE_OPTION_METHODS))} or drop the option(s)")
    if cfg.time_budget > 0 and method not in IMAGE_OPTION_METHODS:
        raise ConfigError(f"method {method!r} does not run by time; time-budget works with "
                          f"{', '.join(sorted(IMAGE_OPTION_METHODS))} (DP methods account a fixed number "
                          "of releases: set iterations instead)")
    if cfg.soft_labels == "learned" and method not in LEARNED_LABEL_METHODS:
        raise ConfigError(f"soft-labels=learned needs a method that unrolls training on the summary "
                          f"({', '.join(sorted(LEARNED_LABEL_METHODS))}), not {method!r}; "
                          "use soft-labels=teacher instead")
    if cfg.soft_labels != "none" and cfg.factorised:
        raise ConfigError("a factorised summary sends one label per base, so it cannot carry soft labels "
                          "per image; use soft-labels=none or drop factorised")


def options_meta(cfg: DistillConfig) -> dict[str, str | float | int]:
    """The options a summary records in its meta."""
    return {"residual-alpha": cfg.residual_alpha, "residual-every": cfg.residual_every,
            "multires": cfg.multires, "precision": cfg.precision, "soft-labels": cfg.soft_labels}


def without_options(cfg: DistillConfig) -> DistillConfig:
    """``cfg`` with every option off (for baselines such as random_real)."""
    return replace(cfg, residual_alpha=1.0, multires=0.0, precision="fp32", soft_labels="none",
                   time_budget=0.0)


def real_patches(data: Dataset, index: ClassIndex, labels: torch.Tensor, size: tuple[int, int],
                 generator: torch.Generator) -> torch.Tensor:
    """One resampled real patch per label: a random crop of a random real image of that class.

    The crop's side is ``PATCH_SCALE`` of the image side; it is resized to ``size`` (bilinear).
    Returns (n, C, *size) on the device of ``labels``.
    """
    _, height, width = data.image_shape
    patches = []
    for c in labels.tolist():
        pos = index.positions[c]
        image = data.x[pos[int(torch.randint(pos.numel(), (1,), generator=generator))]]  # (C, H, W)
        lo, hi = PATCH_SCALE
        scale = lo + (hi - lo) * float(torch.rand((), generator=generator))
        h, w = max(1, round(scale * height)), max(1, round(scale * width))
        top = int(torch.randint(height - h + 1, (1,), generator=generator))
        left = int(torch.randint(width - w + 1, (1,), generator=generator))
        crop = image[None, :, top : top + h, left : left + w]
        patches.append(F.interpolate(crop, size=size, mode="bilinear", align_corners=False))
    return torch.cat(patches).to(labels.device)


class ImageOptions:
    """The residual, multi-resolution and precision options around one method's image updates.

    Parameters
    ----------
    synthetic : Synthetic
        The set being optimised; during the low-resolution phase its leaves are (b, C, H/2, W/2).
        Must be wrapped before the method's optimiser is built from its parameter groups.
    data : Dataset
        The real data the residual patches come from.
    cfg : DistillConfig
        ``residual_alpha``, ``residual_every``, ``multires``, ``precision``, ``iterations``, ``device``.
    generator : torch.Generator
        Draws the residual patches (not used when ``residual_alpha == 1``).
    """

    def __init__(self, synthetic: Synthetic, data: Dataset, cfg: DistillConfig,
                 generator: torch.Generator) -> None:
        self.synthetic = synthetic
        self.data = data
        self.index = ClassIndex(data.y, data.num_classes)
        self.cfg = cfg
        self.generator = generator
        self.size = tuple(data.image_shape[1:])  # (H, W) of the images the method sees
        self.low_steps = int(cfg.multires * cfg.iterations)  # < iterations: the last updates are full size
        self.updates = 0
        if self.low_steps > 0:
            half = tuple(max(1, s // 2) for s in self.size)
            low = F.interpolate(synthetic.leaves.detach(), size=half, mode="area")
            synthetic.leaves = low.requires_grad_(True)
        self.device_type = torch.device(cfg.device).type  # "cpu" or "cuda"
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=cfg.precision == "fp16")

    def images(self) -> torch.Tensor:
        """The synthetic images (n, C, H, W) at full size, differentiable in the leaves."""
        images = self.synthetic.images()
        if tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False)
        return images

    def autocast(self) -> AbstractContextManager:
        """Context for the forward passes and the loss: autocast in bf16 / fp16, or nothing."""
        dtype = AUTOCAST_DTYPES.get(self.cfg.precision)
        return torch.autocast(self.device_type, dtype=dtype, enabled=dtype is not None)

    def step(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """Backpropagate ``loss``, step ``opt``, then mix in real patches or switch resolution when due.

        ``opt`` must hold the leaves (it may hold other parameters too); with fp16 the loss is
        scaled. No mix follows the last update, so the summary ends on an optimisation step.
        """
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)
        self.scaler.update()
        self.updates += 1
        every, last = self.cfg.residual_every, self.updates == self.cfg.iterations
        if self.cfg.residual_alpha < 1 and self.updates % every == 0 and not last:
            self.mix()
        if self.updates == self.low_steps:
            self._to_full_resolution(opt)

    @torch.no_grad()
    def mix(self) -> None:
        """The data residual, in place on the leaves: ``x = alpha x + (1 - alpha) real_patch``."""
        leaves, labels = self.synthetic.leaves, self.synthetic.labels
        labels = labels[:: labels.shape[0] // leaves.shape[0]]  # one per leaf (factorised: per base)
        patches = real_patches(self.data, self.index, labels, tuple(leaves.shape[-2:]), self.generator)
        alpha = self.cfg.residual_alpha
        leaves.mul_(alpha).add_(patches.to(leaves.dtype), alpha=1 - alpha)

    def _to_full_resolution(self, opt: torch.optim.Optimizer) -> None:
        """Replace the half-size leaves by their upsampling, in the set and in ``opt`` (state reset)."""
        low = self.synthetic.leaves
        full = F.interpolate(low.detach(), size=self.size, mode="bilinear", align_corners=False)
        self.synthetic.leaves = full.requires_grad_(True)
        for group in opt.param_groups:
            group["params"] = [self.synthetic.leaves if p is low else p for p in group["params"]]
        opt.state.pop(low, None)
