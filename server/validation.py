"""The server never trusts a summary: every received one is checked before it is pooled.

A factorised summary (``bases`` + ``hallucinators`` + ``hallucinator-bias``, see
:mod:`ddcore.factorised`) is checked as sent, then decoded: what is pooled is always plain
images and labels, and the image cap counts the decoded images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddcore.errors import SummaryError
from ddcore.summary import Summary

FACTOR_ARRAYS = {"bases", "hallucinators", "hallucinator-bias"}
ALLOWED_ARRAYS = {"images", "labels", "image-range", "lrs"} | FACTOR_ARRAYS
IMAGE_DTYPES = (np.float32, np.float16, np.uint8)
MAX_LRS = 100_000
MAX_HALLUCINATORS = 64
MAX_KERNEL = 7


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
    factorised = bool(FACTOR_ARRAYS & set(arrays))
    key = "bases" if factorised else "images"
    if factorised and "images" in arrays:
        raise SummaryError("a summary sends either images or factors (bases, hallucinators), not both")
    for needed in (key, "labels"):
        if needed not in arrays:
            raise SummaryError(f"missing the {needed!r} array")
    images, labels = arrays[key], arrays["labels"]
    if images.dtype not in IMAGE_DTYPES:
        raise SummaryError(f"{key} dtype {images.dtype} is not float32, float16 or uint8")
    if images.ndim != 4:
        raise SummaryError(f"{key} must be 4-D (n, C, H, W), got shape {images.shape}")
    n, c, h, w = images.shape
    channels, height, width = limits.image_shape
    copies = _check_hallucinators(arrays, channels) if factorised else 1
    if n == 0:
        raise SummaryError(f"empty summary (0 {key})")
    if n * copies > limits.max_images:
        raise SummaryError(f"{n * copies} images exceed the cap of {limits.max_images}"
                           + (f" ({n} bases x {copies} hallucinators)" if factorised else ""))
    if c != channels:
        raise SummaryError(f"{key} have {c} channels, the data has {channels}")
    full, smaller_square = (h, w) == (height, width), h == w and 1 <= h < min(height, width)
    if not (full or smaller_square):
        raise SummaryError(f"{key} are {h}x{w}, expected {height}x{width} or a smaller square")
    if int(meta.get("height", height)) != height or int(meta.get("width", width)) != width:
        raise SummaryError("meta height/width do not match the data")
    if labels.shape[0] != n:
        raise SummaryError(f"{n} {key} but {labels.shape[0]} labels")
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
        raise SummaryError(f"{key} contain NaN or Inf")
    if "lrs" in arrays:
        lrs = arrays["lrs"]
        if lrs.ndim != 1 or not 1 <= lrs.size <= MAX_LRS or not np.isfinite(lrs).all() or (lrs <= 0).any():
            raise SummaryError("lrs must be a 1-D array of finite positive step sizes")
    summary = Summary.from_arrays(arrays, meta)  # also checks uint8's image-range; decodes factors
    lo, hi = limits.value_range
    for what, values in (("bases", summary.factors.bases if summary.factors else None),
                         ("pixel", summary.images)):
        if values is None:
            continue
        vmin, vmax = float(values.min()), float(values.max())
        if not (lo <= vmin and vmax <= hi):  # also catches NaN decoded from finite but huge factors
            raise SummaryError(f"{what} values [{vmin:.3g}, {vmax:.3g}] are far outside the data range "
                               f"[{lo:.3g}, {hi:.3g}]")
    return Summary(summary.images, summary.labels, summary.lrs, summary.meta)  # pooled as plain images


def _check_hallucinators(arrays: dict[str, np.ndarray], channels: int) -> int:
    """Check the hallucinator arrays of a factorised summary; return their count h."""
    for key in ("hallucinators", "hallucinator-bias"):
        if key not in arrays:
            raise SummaryError(f"a factorised summary needs the {key!r} array")
        if arrays[key].dtype != np.float32:
            raise SummaryError(f"{key} must be float32, got {arrays[key].dtype}")
        if not np.isfinite(arrays[key]).all():
            raise SummaryError(f"{key} contain NaN or Inf")
    weight, bias = arrays["hallucinators"], arrays["hallucinator-bias"]
    if weight.ndim != 5 or weight.shape[1:3] != (channels, channels) or weight.shape[3] != weight.shape[4]:
        raise SummaryError(f"hallucinators must be (h, {channels}, {channels}, k, k), got {weight.shape}")
    h, k = weight.shape[0], weight.shape[3]
    if not (1 <= h <= MAX_HALLUCINATORS and k % 2 == 1 and k <= MAX_KERNEL):
        raise SummaryError(f"{h} hallucinators of kernel {k}: need 1..{MAX_HALLUCINATORS} and an odd "
                           f"kernel <= {MAX_KERNEL}")
    if bias.shape != (h, channels):
        raise SummaryError(f"hallucinator-bias must be ({h}, {channels}), got {bias.shape}")
    return h
