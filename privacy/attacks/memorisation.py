"""Memorisation of summaries: is each synthetic image nearer to private data than to unseen data?"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ddcore.data import Dataset
from privacy.attacks.metrics import ssim
from privacy.errors import PrivacyError

QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class MemorisationResult:
    """Nearest-neighbour distances of synthetic images to private and to held-out images.

    ``closer_to_private_*`` is the fraction of synthetic images whose nearest private image is
    nearer than their nearest held-out image; with equal-sized reference sets ~0.5 means no
    sign of memorisation and 1.0 means every image sits on a private one. SSIM distance is
    ``1 - SSIM``. Distributions are quantiles (min, 25%, median, 75%, max).
    """

    closer_to_private_l2: float
    closer_to_private_ssim: float
    l2_private: list[float]
    l2_heldout: list[float]
    ssim_distance_private: list[float]
    ssim_distance_heldout: list[float]
    num_synthetic: int
    num_reference: int  # images drawn from each of the private and held-out sets

    def to_dict(self) -> dict:
        return asdict(self)


def nearest(queries: torch.Tensor, refs: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the smallest L2 distance and the smallest (1 - SSIM) to any reference image."""
    q = queries.flatten(1)
    l2 = torch.cdist(q, refs.flatten(1)).min(1).values
    best = []
    for image in queries:
        s = torch.cat([ssim(image[None], refs[i:i + chunk]) for i in range(0, len(refs), chunk)])
        best.append(1 - s.max())
    return l2, torch.stack(best)


def memorisation(synthetic: torch.Tensor, private: Dataset, heldout: Dataset, *, seed: int = 0,
                 max_reference: int = 1000) -> MemorisationResult:
    """Compare ``synthetic`` (normalised like ``private``) with private and held-out images.

    Both reference sets are subsampled to the same size (at most ``max_reference``), so a
    larger private set cannot look closer by numbers alone. Distances are in pixel space [0, 1].
    """
    if len(synthetic) == 0 or len(private) == 0 or len(heldout) == 0:
        raise PrivacyError("memorisation needs synthetic, private and held-out images")
    g = torch.Generator().manual_seed(seed)
    m = min(len(private), len(heldout), max_reference)

    def pixels(x: torch.Tensor) -> torch.Tensor:
        return private.denormalise(x).clamp(0, 1)

    priv = pixels(private.x[torch.randperm(len(private), generator=g)[:m]])
    held = pixels(heldout.x[torch.randperm(len(heldout), generator=g)[:m]])
    syn = pixels(synthetic.detach().float())
    l2_p, ss_p = nearest(syn, priv)
    l2_h, ss_h = nearest(syn, held)

    def quantiles(t: torch.Tensor) -> list[float]:
        return [float(v) for v in np.quantile(t.numpy(), QUANTILES)]

    return MemorisationResult(float((l2_p < l2_h).float().mean()), float((ss_p < ss_h).float().mean()),
                              quantiles(l2_p), quantiles(l2_h), quantiles(ss_p), quantiles(ss_h), len(syn), m)
