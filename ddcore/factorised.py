"""A factorised summary (HaBa-style): a few bases per class and a few shared hallucinators.

Every hallucinator is a tiny 3x3 convolution (weight ``(C, C, 3, 3)`` plus bias ``(C,)``)
applied to every base, so ``b`` bases and ``h`` hallucinators decode into ``b * h`` images;
image ``i * h + j`` is hallucinator ``j`` applied to base ``i`` (base-major order) and has
the label of base ``i``.

Byte budget: a factorised summary with ``ipc`` keeps ``ipc`` bases per class - the bytes of
``ipc`` plain images - plus ``h * (9 C^2 + C)`` float32 hallucinator numbers shared by all
classes (10 per hallucinator for grey images, 84 for RGB), and decodes ``ipc * h`` images per
class. So it sends about the bytes of ``ipc`` images and trains the server on ``h`` times more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KERNEL = 3  # hallucinators are KERNEL x KERNEL convolutions with "same" padding


@dataclass(frozen=True)
class Factors:
    """Bases and hallucinators; :meth:`decode` turns them into images (differentiably).

    Attributes
    ----------
    bases : torch.Tensor
        float32 (b, C, H, W), normalised like the dataset.
    weight : torch.Tensor
        float32 (h, C, C, KERNEL, KERNEL), one convolution per hallucinator.
    bias : torch.Tensor
        float32 (h, C).
    """

    bases: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    @property
    def hallucinators(self) -> int:
        return int(self.weight.shape[0])

    def decode(self) -> torch.Tensor:
        """Every hallucinator applied to every base: (b * h, C, H, W), base-major."""
        return decode(self.bases, self.weight, self.bias)

    def detached(self) -> Factors:
        """float32 CPU copies with no graph (what a summary keeps)."""
        return Factors(*(t.detach().cpu().float().clone() for t in (self.bases, self.weight, self.bias)))


def decode(bases: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Images (b * h, C, H, W) from bases (b, C, H, W), weight (h, C, C, k, k) and bias (h, C)."""
    b, c, height, width = bases.shape
    h = weight.shape[0]
    out = F.conv2d(bases, weight.reshape(h * c, c, *weight.shape[-2:]), bias.reshape(h * c),
                   padding=weight.shape[-1] // 2)  # (b, h * C, H, W)
    return out.reshape(b * h, c, height, width)


def init_hallucinators(
    count: int, channels: int, generator: torch.Generator, spread: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (count, C, C, k, k) and bias (count, C): the identity plus N(0, spread^2) noise.

    The noise makes the hallucinators differ from the start; identical ones would get
    identical gradients and never separate. It is data-independent, so it costs no privacy.
    """
    weight = spread * torch.randn((count, channels, channels, KERNEL, KERNEL), generator=generator)
    weight[:, range(channels), range(channels), KERNEL // 2, KERNEL // 2] += 1.0
    bias = spread * torch.randn((count, channels), generator=generator)
    return weight, bias


def hallucinator_numbers(count: int, channels: int) -> int:
    """float32 numbers the ``count`` hallucinators take on the wire."""
    return count * (channels * channels * KERNEL * KERNEL + channels)
