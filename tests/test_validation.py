"""The server rejects every kind of bad summary, with a reason, and accepts a good one."""

from __future__ import annotations

import numpy as np
import pytest

from ddcore.errors import SummaryError
from server.validation import SummaryLimits, validate

LIMITS = SummaryLimits.for_data((1, 8, 8), num_classes=3, max_images=10, pixel_bounds=(-0.5, 2.5))
META = {"height": 8, "width": 8}


def good() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"images": rng.normal(size=(4, 1, 8, 8)).astype(np.float32),
            "labels": np.array([0, 1, 2, 1], dtype=np.int64)}


def test_good_summary_is_accepted() -> None:
    summary = validate(good(), META, LIMITS)
    assert len(summary) == 4


def test_soft_labels_and_compact_images_are_accepted() -> None:
    arrays = good()
    arrays["labels"] = np.full((4, 3), 1 / 3, dtype=np.float32)
    arrays["images"] = np.zeros((4, 1, 4, 4), dtype=np.uint8)
    arrays["image-range"] = np.array([-0.5, 2.5], dtype=np.float32)
    assert validate(arrays, META, LIMITS).images.shape == (4, 1, 8, 8)


def _with(**changes):
    arrays = good()
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    return arrays


BAD = {
    "nan": (_with(images=np.full((4, 1, 8, 8), np.nan, np.float32)), "NaN or Inf"),
    "inf": (_with(images=np.full((4, 1, 8, 8), np.inf, np.float32)), "NaN or Inf"),
    "wrong shape": (_with(images=np.zeros((4, 8, 8), np.float32)), "4-D"),
    "wrong size": (_with(images=np.zeros((4, 1, 9, 9), np.float32)), "expected 8x8"),
    "wrong channels": (_with(images=np.zeros((4, 3, 8, 8), np.float32)), "3 channels"),
    "wrong dtype": (_with(images=np.zeros((4, 1, 8, 8), np.float64)), "dtype float64"),
    "label too big": (_with(labels=np.array([0, 1, 3, 1], np.int64)), "labels outside"),
    "negative label": (_with(labels=np.array([0, -1, 2, 1], np.int64)), "labels outside"),
    "label dtype": (_with(labels=np.array([0, 1, 2, 1], np.int32)), "int64"),
    "soft not distribution": (_with(labels=np.full((4, 3), 0.5, np.float32)), "distributions"),
    "soft wrong classes": (_with(labels=np.full((4, 5), 0.2, np.float32)), "5 classes"),
    "soft nan": (_with(labels=np.full((4, 3), np.nan, np.float32)), "NaN"),
    "too many images": (_with(images=np.zeros((11, 1, 8, 8), np.float32),
                              labels=np.zeros(11, np.int64)), "exceed the cap"),
    "count mismatch": (_with(labels=np.array([0, 1, 2], np.int64)), "4 images but 3 labels"),
    "far outside range": (_with(images=np.full((4, 1, 8, 8), 1e4, np.float32)), "far outside"),
    "empty": (_with(images=np.zeros((0, 1, 8, 8), np.float32), labels=np.zeros(0, np.int64)), "empty"),
    "missing labels": (_with(labels=None), "missing the 'labels'"),
    "unexpected array": (_with(extra=np.zeros(3, np.float32)), "unexpected arrays"),
    "uint8 without range": (_with(images=np.zeros((4, 1, 8, 8), np.uint8)), "image-range"),
    "bad lrs": (_with(lrs=np.array([0.1, -1.0], np.float32)), "lrs"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_summary_is_rejected_with_its_reason(kind: str) -> None:
    arrays, reason = BAD[kind]
    with pytest.raises(SummaryError, match=reason):
        validate(arrays, META, LIMITS)


def test_meta_size_mismatch_is_rejected() -> None:
    with pytest.raises(SummaryError, match="height/width"):
        validate(good(), {"height": 16, "width": 16}, LIMITS)
