"""The server never trusts a summary: every received one is checked before it is pooled."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddcore.errors import SummaryError
from ddcore.summary import Summary

ALLOWED_ARRAYS = {"images", "labels", "image-range", "lrs"}
IMAGE_DTYPES = (np.float32, np.float16, np.uint8)
MAX_LRS = 100_000


@dataclass(frozen=True)
class SummaryLimits:
    """What an acceptable summary looks like for this run."""

    image_shape: tuple[int, int, int]  # (C, H, W) of the dataset
    num_classes: int
    max_images: int
    value_range: tuple[float, float]  # normalised pixel values outside this are rejected

    @staticmethod
    def for_data(image_shape: tuple[int, int, int], num_classes: int, max_images: int,
                 pixel_bounds: tuple[float, float], slack: float = 2.0) -> SummaryLimits:
        """Limits whose value range is the data's pixel range widened by ``slack`` widths."""
        lo, hi = pixel_bounds
        width = hi - lo
        return SummaryLimits(image_shape, num_classes, max_images, (lo - slack * width, hi + slack * width))


def validate(arrays: dict[str, np.ndarray], meta: dict, limits: SummaryLimits) -> Summary:
    """Return the decoded summary, or raise :class:`SummaryError` saying what is wrong."""
    unknown = set(arrays) - ALLOWED_ARRAYS
    if unknown:
        raise SummaryError(f"unexpected arrays {sorted(unknown)}")
    for key in ("images", "labels"):
        if key not in arrays:
            raise SummaryError(f"missing the {key!r} array")
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype not in IMAGE_DTYPES:
        raise SummaryError(f"images dtype {images.dtype} is not float32, float16 or uint8")
    if images.ndim != 4:
        raise SummaryError(f"images must be 4-D (n, C, H, W), got shape {images.shape}")
    n, c, h, w = images.shape
    channels, height, width = limits.image_shape
    if n == 0:
        raise SummaryError("empty summary (0 images)")
    if n > limits.max_images:
        raise SummaryError(f"{n} images exceed the cap of {limits.max_images}")
    if c != channels:
        raise SummaryError(f"images have {c} channels, the data has {channels}")
    full, smaller_square = (h, w) == (height, width), h == w and 1 <= h < min(height, width)
    if not (full or smaller_square):
        raise SummaryError(f"images are {h}x{w}, expected {height}x{width} or a smaller square")
    if int(meta.get("height", height)) != height or int(meta.get("width", width)) != width:
        raise SummaryError("meta height/width do not match the data")
    if labels.shape[0] != n:
        raise SummaryError(f"{n} images but {labels.shape[0]} labels")
    if labels.ndim == 1:
        if labels.dtype != np.int64:
            raise SummaryError(f"hard labels must be int64, got {labels.dtype}")
        if labels.min() < 0 or labels.max() >= limits.num_classes:
            raise SummaryError(f"labels outside 0..{limits.num_classes - 1}")
    elif labels.ndim == 2:
        if labels.dtype not in (np.float32, np.float16):
            raise SummaryError(f"soft labels must be float, got {labels.dtype}")
        if labels.shape[1] != limits.num_classes:
            raise SummaryError(f"soft labels have {labels.shape[1]} classes, expected {limits.num_classes}")
        if not np.isfinite(labels).all():
            raise SummaryError("soft labels contain NaN or Inf")
        if (labels < -1e-6).any() or not np.allclose(labels.sum(1), 1.0, atol=1e-3):
            raise SummaryError("soft labels are not probability distributions (non-negative, summing to 1)")
    else:
        raise SummaryError(f"labels must be (n,) or (n, K), got shape {labels.shape}")
    if images.dtype != np.uint8 and not np.isfinite(images).all():
        raise SummaryError("images contain NaN or Inf")
    if "lrs" in arrays:
        lrs = arrays["lrs"]
        if lrs.ndim != 1 or not 1 <= lrs.size <= MAX_LRS or not np.isfinite(lrs).all() or (lrs <= 0).any():
            raise SummaryError("lrs must be a 1-D array of finite positive step sizes")
    summary = Summary.from_arrays(arrays, meta)  # also checks uint8's image-range
    lo, hi = limits.value_range
    vmin, vmax = float(summary.images.min()), float(summary.images.max())
    if vmin < lo or vmax > hi:
        raise SummaryError(
            f"pixel values [{vmin:.3g}, {vmax:.3g}] are far outside the data range [{lo:.3g}, {hi:.3g}]"
        )
    return summary
