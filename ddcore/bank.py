"""A bank of random networks rebuilt from a seed: the fixed feature map of distribution matching."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ddcore.augment import Params, apply, sample_params
from ddcore.models import ModelFactory

AUGMENT_SEED_OFFSET = 1_000_003  # the views' generator: seed + this, apart from the networks' seeds


class EmbeddingBank:
    """``size`` networks ``model_factory(Generator().manual_seed(seed + k))`` and fixed views.

    The feature of an image ``x`` is

        phi(x) = concat_k [ mean_v u(f_k(view_v(x))) ] / sqrt(size),   u(e) = e / |e|

    where ``f_k`` is network k's embedding and the views are the plain image plus ``augment``
    augmentations of ``strategy``, each drawn once (one transform for every image) from a
    generator seeded with ``seed + AUGMENT_SEED_OFFSET``. Every block is a mean of unit vectors,
    so ``|phi(x)| <= 1`` however many networks and views there are: an image that enters the
    bank ``1 + augment`` times still contributes one vector of norm at most 1.

    ``shape`` (C, H, W) resolves ``strategy="auto"``. The bank is a function of
    ``(model_factory, size, seed, augment, strategy, shape)`` alone, so
    whoever knows these public values (a server) rebuilds the same feature map.
    """

    def __init__(self, model_factory: ModelFactory, *, size: int, seed: int, augment: int = 0,
                 strategy: str = "none", shape: tuple[int, int, int] | None = None) -> None:
        if size < 1 or augment < 0:
            raise ValueError(f"a bank needs size >= 1 and augment >= 0, got {size}, {augment}")
        self.nets = [model_factory(torch.Generator().manual_seed(seed + k)).requires_grad_(False)
                     for k in range(size)]
        generator = torch.Generator().manual_seed(seed + AUGMENT_SEED_OFFSET)
        self.views: list[Params] = [[]] + [sample_params(strategy, 1, generator, shape=shape)
                                             for _ in range(augment)]

    @property
    def device(self) -> torch.device:
        """Where the networks live (images are embedded there)."""
        return next(self.nets[0].parameters()).device

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi of every image: (n, C, H, W) -> (n, D), each row of norm <= 1 (differentiable in ``x``)."""
        blocks = []
        for net in self.nets:
            views = torch.stack([F.normalize(net.embed(apply(x, view)).float(), dim=1)
                                 for view in self.views])  # (V, n, d)
            blocks.append(views.mean(0))
        return torch.cat(blocks, dim=1) / math.sqrt(len(self.nets))  # (n, size * d)
