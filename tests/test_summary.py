"""Summary encoding: exact float32 round trips through ArrayRecord and files; compact forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client import protocol
from ddcore.errors import SummaryError
from ddcore.summary import Summary, concat


def make_summary(soft: bool = False, lrs: bool = False) -> Summary:
    g = torch.Generator().manual_seed(1)
    images = torch.randn((6, 1, 8, 8), generator=g)
    labels = torch.softmax(torch.randn((6, 3), generator=g), 1) if soft else torch.tensor([0, 0, 1, 1, 2, 2])
    return Summary(images, labels, torch.rand(4, generator=g) + 0.1 if lrs else None,
                   {"method": "dm", "ipc": 2})


@pytest.mark.parametrize("soft", [False, True])
def test_arrayrecord_round_trip_is_exact(soft: bool) -> None:
    s = make_summary(soft=soft, lrs=True)
    content = protocol.summary_content(s, "float32", None, {"num-examples": 10})
    back = Summary.from_arrays(protocol.content_arrays(content[protocol.SUMMARY]),
                               dict(content[protocol.META]))
    assert torch.equal(back.images, s.images)
    assert torch.equal(back.labels, s.labels)
    assert torch.equal(back.lrs, s.lrs)
    assert back.meta["method"] == "dm" and back.meta["ipc"] == 2


def test_array_bytes_are_the_summary_payload() -> None:
    s = make_summary()
    content = protocol.summary_content(s, "float32", None, {"num-examples": 10})
    assert protocol.array_bytes(content) == s.images.numel() * 4 + s.labels.numel() * 8
    # count_bytes adds the .npy headers and the config/metric entries on top
    assert protocol.content_bytes(content) > protocol.array_bytes(content)


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_file_round_trip(tmp_path, suffix: str) -> None:
    s = make_summary(soft=True)
    s.save(tmp_path / f"s{suffix}")
    back = Summary.load(tmp_path / f"s{suffix}")
    assert torch.equal(back.images, s.images) and torch.equal(back.labels, s.labels)
    assert back.meta["method"] == "dm"


def test_compact_forms_are_smaller_and_close() -> None:
    s = make_summary()
    spread = float(s.images.max() - s.images.min())
    sizes = {}
    for dtype, tol in (("float16", 1e-2), ("uint8", spread / 255)):
        arrays = s.to_arrays(dtype)
        sizes[dtype] = arrays["images"].nbytes
        back = Summary.from_arrays(arrays, s.wire_meta(dtype))
        assert (back.images - s.images).abs().max() <= tol * 1.01
    assert sizes["uint8"] * 4 == sizes["float16"] * 2 == s.images.numel() * 4
    low = s.to_arrays("float32", resolution=4)
    assert low["images"].shape[-1] == 4
    assert Summary.from_arrays(low, s.wire_meta("float32", 4)).images.shape == s.images.shape


def test_bad_dtype_and_resolution_are_refused() -> None:
    with pytest.raises(SummaryError, match="unknown summary dtype"):
        make_summary().to_arrays("int16")
    with pytest.raises(SummaryError, match="resolution"):
        make_summary().to_arrays("float32", resolution=99)


def test_concat_promotes_hard_labels_when_mixed() -> None:
    pooled = concat([make_summary(), make_summary(soft=True)], num_classes=3)
    assert pooled.labels.shape == (12, 3)
    np.testing.assert_allclose(pooled.labels.sum(1).numpy(), 1.0, atol=1e-6)
