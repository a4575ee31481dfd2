"""Memorisation of summaries: near-copies of private images, and nearer to private than to unseen data?"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ddcore.data import Dataset
from privacy.attacks.nearest import Transform, nearest_l2, nearest_ssim
from privacy.errors import PrivacyError

QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
NEAR_COPY_QUANTILE = 0.01  # near-copy: nearer than 99% of private images are to their nearest other one


@dataclass(frozen=True)
class MemorisationResult:
    """Nearest-neighbour distances of synthetic images to private and to held-out images.

    ``near_copy_fraction``: synthetic images within ``near_copy_threshold`` (L2, pixels in
    [0, 1]) of some image of the *whole* private set (:func:`near_copy_threshold`);
    ``near_copy_fraction_heldout`` is the same test against the whole held-out set, a control
    (high there too = the threshold catches generic images, not copies). ``l2_nearest_*``:
    distance to the nearest image of the whole private / held-out set.

    ``closer_to_private_*``: fraction of synthetic images whose nearest private image is nearer
    than their nearest held-out image, both sets subsampled to ``num_reference`` images so a
    larger private set cannot look closer by numbers alone; ~0.5 means no sign of
    memorisation, 1.0 every image sits on a private one. SSIM distance is ``1 - SSIM``.
    Distributions are quantiles (min, 25%, median, 75%, max).
    """

    closer_to_private_l2: float
    closer_to_private_ssim: float
    l2_private: list[float]
    l2_heldout: list[float]
    ssim_distance_private: list[float]
    ssim_distance_heldout: list[float]
    num_synthetic: int
    num_reference: int  # images drawn from each of the private and held-out sets
    near_copy_fraction: float
    near_copy_fraction_heldout: float
    near_copy_threshold: float
    l2_nearest_private: list[float]
    l2_nearest_heldout: list[float]
    num_private: int
    num_heldout: int

    def to_dict(self) -> dict:
        return asdict(self)


def pixels_of(data: Dataset) -> Transform:
    """Normalised images of ``data`` -> pixels clamped to [0, 1] (applied chunk by chunk)."""
    return lambda x: data.denormalise(x).clamp(0, 1)


def nearest(queries: torch.Tensor, refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the smallest L2 distance and the smallest (1 - SSIM) to any reference image."""
    l2, _ = nearest_l2(queries, refs)
    similarity, _ = nearest_ssim(queries, refs)
    return l2, 1 - similarity


def near_copy_threshold(private: Dataset, *, quantile: float = NEAR_COPY_QUANTILE, queries: int = 1000,
                        seed: int = 0) -> float:
    """The ``quantile`` of private images' L2 distances (pixels) to their nearest *other* private image.

    Each of ``queries`` private images (a seeded sample; all when fewer) is compared with the
    whole private set but itself. The default 1st percentile calls an image a near-copy when
    it sits closer to a private image than 99% of the private images sit to their nearest
    neighbour: nearer than the data's own natural near-duplicates, so a copy (perhaps
    slightly perturbed), not a typical image of its class. Measured on the data, it adapts
    to resolution and contrast, where a fixed SSIM cut-off (e.g. >= 0.95) means different
    things for 8x8 digits and 32x32 photos; and L2 over the whole set is a matrix product,
    SSIM a windowed pass per pair.
    """
    if len(private) < 2:
        raise PrivacyError("a near-copy threshold needs at least 2 private images; pass a larger private set")
    if not 0.0 <= quantile < 1.0:
        raise PrivacyError(f"quantile must be in [0, 1), got {quantile}; e.g. 0.01 for the 1st percentile")
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(private), generator=g)[:max(queries, 1)]
    d, _ = nearest_l2(private.x[picked], private.x, transform=pixels_of(private), exclude=picked)
    return float(np.quantile(d.numpy(), quantile))


def memorisation(synthetic: torch.Tensor, private: Dataset, heldout: Dataset, *, seed: int = 0,
                 max_reference: int = 1000, threshold: float | None = None,
                 threshold_queries: int = 1000) -> MemorisationResult:
    """Compare ``synthetic`` (normalised like ``private``) with private and held-out images.

    Near-copies and nearest distances use every private and held-out image (searched in
    chunks); the nearer-to-private fractions use equal-sized subsamples (at most
    ``max_reference`` each). ``threshold`` (L2 in pixels) defaults to
    :func:`near_copy_threshold` of ``private``; pass it to reuse one across summaries.
    Distances are in pixel space [0, 1].
    """
    if len(synthetic) == 0 or len(private) == 0 or len(heldout) == 0:
        raise PrivacyError("memorisation needs synthetic, private and held-out images")
    if threshold is None:
        threshold = near_copy_threshold(private, queries=threshold_queries, seed=seed)
    pixels = pixels_of(private)
    l2_all_p, _ = nearest_l2(synthetic, private.x, transform=pixels)  # the transform maps both sides
    l2_all_h, _ = nearest_l2(synthetic, heldout.x, transform=pixels)
    syn = pixels(synthetic.detach().float())

    g = torch.Generator().manual_seed(seed)
    m = min(len(private), len(heldout), max_reference)
    priv = pixels(private.x[torch.randperm(len(private), generator=g)[:m]])
    held = pixels(heldout.x[torch.randperm(len(heldout), generator=g)[:m]])
    l2_p, ss_p = nearest(syn, priv)
    l2_h, ss_h = nearest(syn, held)

    def quantiles(t: torch.Tensor) -> list[float]:
        return [float(v) for v in np.quantile(t.numpy(), QUANTILES)]

    def share(t: torch.Tensor) -> float:
        return float(t.float().mean())

    return MemorisationResult(
        share(l2_p < l2_h), share(ss_p < ss_h), quantiles(l2_p), quantiles(l2_h), quantiles(ss_p),
        quantiles(ss_h), len(syn), m, share(l2_all_p <= threshold), share(l2_all_h <= threshold),
        float(threshold), quantiles(l2_all_p), quantiles(l2_all_h), len(private), len(heldout))


def closest_pairs(synthetic: torch.Tensor, private: Dataset, k: int = 8) -> list[dict[str, float | int]]:
    """The ``k`` synthetic images nearest to a private image (whole set), closest first.

    Each pair: ``synthetic`` and ``private`` indices and their ``l2`` distance (pixels [0, 1]).
    """
    if len(synthetic) == 0 or len(private) == 0:
        raise PrivacyError("closest pairs need synthetic and private images")
    d, idx = nearest_l2(synthetic, private.x, transform=pixels_of(private))
    order = torch.argsort(d)[:k].tolist()
    return [{"synthetic": i, "private": int(idx[i]), "l2": float(d[i])} for i in order]


def save_closest_pairs(synthetic: torch.Tensor, private: Dataset, path: str | Path, *, k: int = 8,
                       threshold: float | None = None, title: str = "") -> list[dict[str, float | int]]:
    """A PNG of the ``k`` closest (synthetic, private) pairs: synthetic on top, private below.

    Each column is titled with the pair's L2 distance, marked "copy" when at most ``threshold``.
    Returns the pairs (:func:`closest_pairs`) so a report can list them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = closest_pairs(synthetic, private, k)
    pixels = pixels_of(private)
    syn = pixels(synthetic.detach().float()[[p["synthetic"] for p in pairs]])
    real = pixels(private.x[[p["private"] for p in pairs]])
    fig, axes = plt.subplots(2, len(pairs), figsize=(1.2 * len(pairs) + 0.6, 2.9), squeeze=False)
    for c, pair in enumerate(pairs):
        for row, img in ((0, syn[c]), (1, real[c])):
            pic = img.permute(1, 2, 0).squeeze(-1).numpy()
            axes[row][c].imshow(pic, cmap="gray" if pic.ndim == 2 else None, vmin=0, vmax=1)
            axes[row][c].axis("off")
        copy = threshold is not None and pair["l2"] <= threshold
        axes[0][c].set_title(f"{pair['l2']:.2f}{' copy' if copy else ''}", fontsize=7)
    axes[0][0].text(-0.1, 0.5, "synthetic", transform=axes[0][0].transAxes, rotation=90, va="center",
                    ha="right", fontsize=7)
    axes[1][0].text(-0.1, 0.5, "private", transform=axes[1][0].transAxes, rotation=90, va="center",
                    ha="right", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return pairs
