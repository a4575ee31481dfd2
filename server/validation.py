"""The server never trusts a summary: every received one is checked before it is pooled.

A factorised summary (``bases`` + ``hallucinators`` + ``hallucinator-bias``, see
:mod:`ddcore.factorised`) is checked as sent, then decoded: what is pooled is always plain
images and labels, and the image cap counts the decoded images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ddcore.errors import SummaryError
from ddcore.summary import Summary

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
    """Return the decoded summary, or raise :class:`SummaryError` saying what is wrong.

    The caps are checked on the arrays' shapes before anything is decoded; then
    :meth:`Summary.from_arrays` (the one strict decoder) checks the structure, and this
    server's policy checks the summary against the run: image shape, label range,
    finiteness and value range. What is pooled is always plain images and labels.
    """
    check_caps(arrays, limits)
    summary = Summary.from_arrays(arrays, meta)
    key = "bases" if summary.factors is not None else "images"
    check_shape(key, arrays[key].shape, meta, limits)
    check_labels(summary.labels, limits.num_classes)
    check_values(key, arrays[key], summary, limits.value_range)
    return Summary(summary.images, summary.labels, summary.lrs, summary.meta)


def check_caps(arrays: dict[str, np.ndarray], limits: SummaryLimits) -> None:
    """Images (bases x hallucinators when factorised), step sizes and hallucinators within the caps."""
    factorised = "bases" in arrays
    images = arrays.get("bases" if factorised else "images")
    if images is None or images.ndim == 0:
        return  # the decoder names what is missing or malformed
    n, copies = images.shape[0], 1
    weight = arrays.get("hallucinators")
    if factorised and weight is not None and weight.ndim == 5:
        copies, kernel = weight.shape[0], weight.shape[3]
        if copies > MAX_HALLUCINATORS or kernel > MAX_KERNEL:
            raise SummaryError(f"{copies} hallucinators of kernel {kernel}: at most {MAX_HALLUCINATORS} "
                               f"hallucinators and an odd kernel <= {MAX_KERNEL}")
    what = "bases" if factorised else "images"
    if n == 0:
        raise SummaryError(f"empty summary (0 {what})")
    if n * copies > limits.max_images:
        raise SummaryError(f"{n * copies} images exceed the cap of {limits.max_images}"
                           + (f" ({n} bases x {copies} hallucinators)" if factorised else ""))
    if "lrs" in arrays and arrays["lrs"].size > MAX_LRS:
        raise SummaryError(f"{arrays['lrs'].size} step sizes exceed the cap of {MAX_LRS}")


def check_shape(key: str, shape: tuple[int, ...], meta: dict, limits: SummaryLimits) -> None:
    """Channels as the data's; the data's size, or a smaller square the receiver expands."""
    _, c, h, w = shape
    channels, height, width = limits.image_shape
    if c != channels:
        raise SummaryError(f"{key} have {c} channels, the data has {channels}")
    full, smaller_square = (h, w) == (height, width), h == w and 1 <= h < min(height, width)
    if not (full or smaller_square):
        raise SummaryError(f"{key} are {h}x{w}, expected {height}x{width} or a smaller square")
    if int(meta.get("height", height)) != height or int(meta.get("width", width)) != width:
        raise SummaryError("meta height/width do not match the data")


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Hard labels in ``0..num_classes-1``; soft labels over ``num_classes`` classes."""
    if labels.dim() == 1:
        if labels.min() < 0 or labels.max() >= num_classes:
            raise SummaryError(f"labels outside 0..{num_classes - 1}")
    elif labels.shape[1] != num_classes:
        raise SummaryError(f"soft labels have {labels.shape[1]} classes, expected {num_classes}")


def check_values(key: str, raw: np.ndarray, summary: Summary, value_range: tuple[float, float]) -> None:
    """Finite sent values, and decoded bases and images within ``value_range`` (normalised)."""
    if raw.dtype != np.uint8 and not np.isfinite(raw).all():
        raise SummaryError(f"{key} contain NaN or Inf")
    lo, hi = value_range
    for what, values in (("bases", summary.factors.bases if summary.factors else None),
                         ("pixel", summary.images)):
        if values is None:
            continue
        vmin, vmax = float(values.min()), float(values.max())
        if not (lo <= vmin and vmax <= hi):  # also catches NaN decoded from finite but huge factors
            raise SummaryError(f"{what} values [{vmin:.3g}, {vmax:.3g}] are far outside the data range "
                               f"[{lo:.3g}, {hi:.3g}]")
