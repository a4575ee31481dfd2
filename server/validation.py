"""The server never trusts a summary: every received one is checked before it is pooled.

The per-class soft labels of a collaborative reply (:func:`check_soft_labels`) are checked as
strictly: one bad array rejects the whole reply.

A factorised summary (``bases`` + ``hallucinators`` + ``hallucinator-bias``, see
:mod:`ddcore.factorised`) is checked as sent, then decoded: what is pooled is always plain
images and labels, and the image cap counts the decoded images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ddcore.errors import SummaryError
from ddcore.methods.collab import ClassSoftLabels
from ddcore.summary import Summary

MAX_LRS = 100_000
MAX_HALLUCINATORS = 64
MAX_KERNEL = 7
SOFT_LABEL_TOLERANCE = 1e-3  # |row sum - 1| allowed for a present class (float32 means of softmaxes)
SOFT_LABEL_ARRAYS = frozenset({"probs", "counts"})


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


def check_soft_labels(arrays: dict[str, np.ndarray], num_classes: int, examples: int) -> ClassSoftLabels:
    """Return a reply's per-class soft labels, or raise :class:`SummaryError` saying what is wrong.

    ``probs`` must be a finite, non-negative float (K, K) array and ``counts`` a finite,
    non-negative whole (K,) array adding up to ``examples`` (the reply's ``num-examples``: the
    counts weight the server's combination, so they are held to what the client reports); a
    class with a positive count (a *present* class) has a row summing to 1, the other rows are
    zero.
    """
    if set(arrays) != SOFT_LABEL_ARRAYS:
        raise SummaryError(f"soft labels need exactly the arrays {sorted(SOFT_LABEL_ARRAYS)}, "
                           f"got {sorted(arrays)}")
    probs, counts = arrays["probs"], arrays["counts"]
    k = num_classes
    if probs.shape != (k, k) or counts.shape != (k,):
        raise SummaryError(f"soft labels have shape {probs.shape} and counts {counts.shape}, "
                           f"expected ({k}, {k}) and ({k},)")
    if probs.dtype.kind != "f" or counts.dtype.kind not in "iuf":
        raise SummaryError(f"soft labels need float probs and numeric counts, got {probs.dtype} "
                           f"and {counts.dtype}")
    if not (np.isfinite(probs).all() and np.isfinite(counts).all()):
        raise SummaryError("soft labels or counts contain NaN or Inf")
    if (probs < 0).any() or (counts < 0).any():
        raise SummaryError("soft labels or counts are negative")
    if (counts != np.round(counts)).any():
        raise SummaryError("soft-label counts are not whole numbers")
    if counts.astype(np.float64).sum() != examples or examples < 1:
        raise SummaryError(f"soft-label counts add up to {counts.astype(np.float64).sum():g}, but the reply "
                           f"reports {examples} examples")
    present = counts > 0
    sums = probs.astype(np.float64).sum(1)
    off = np.flatnonzero(present & (np.abs(sums - 1) > SOFT_LABEL_TOLERANCE))
    if off.size:
        raise SummaryError(f"soft-label rows of classes {off.tolist()} sum to {sums[off].round(4).tolist()}, "
                           f"not 1 (+-{SOFT_LABEL_TOLERANCE:g})")
    stray = np.flatnonzero(~present & (probs != 0).any(1))
    if stray.size:
        raise SummaryError(f"soft-label rows of classes {stray.tolist()} are non-zero but their count is 0")
    return ClassSoftLabels(torch.from_numpy(probs.astype(np.float32)),
                           torch.from_numpy(counts.astype(np.int64)))
