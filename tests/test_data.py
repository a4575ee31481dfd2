"""Datasets: embedded, user files and torchvision layouts; seeded splits; clear errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from ddcore.data import load_dataset
from ddcore.errors import DataError, UnknownNameError


def test_mnist5k_is_embedded_split_and_normalised() -> None:
    splits = load_dataset("mnist5k", seed=0)
    assert splits.train.x.shape == (4000, 1, 28, 28) and splits.test.x.shape == (1000, 1, 28, 28)
    assert splits.train.num_classes == 10
    assert torch.bincount(splits.test.y).tolist() == [100] * 10  # stratified
    assert abs(float(splits.train.x.mean())) < 1e-3 and abs(float(splits.train.x.std()) - 1) < 1e-2
    again = load_dataset("mnist5k", seed=0)
    assert torch.equal(splits.test.x, again.test.x)
    assert not torch.equal(splits.test.y, load_dataset("mnist5k", seed=1).test.y)


def test_npz_user_data(npz_file) -> None:
    splits = load_dataset(str(npz_file))
    assert splits.train.x.shape[1:] == (1, 12, 12) and splits.train.num_classes == 3
    assert len(splits.train) + len(splits.test) == 60
    assert splits.train.name == "mine"


def test_image_folder_user_data(tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    splits = load_dataset(str(tmp_path))
    assert splits.train.x.shape[1:] == (3, 10, 10) and splits.train.num_classes == 2


def _write_idx(path, array: np.ndarray) -> None:
    code = 0x08
    header = struct.pack(">I", (code << 8) | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_local_files(tmp_path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 3)
    splits = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert splits.train.x.shape == (30, 1, 28, 28) and splits.test.x.shape == (10, 1, 28, 28)


@pytest.mark.parametrize("name, kwargs, error, message", [
    ("imagenet", {}, UnknownNameError, "unknown dataset 'imagenet'; known: .*mnist5k"),
    ("missing.npz", {}, DataError, "no such file"),
    ("mnist", {"download": False}, DataError, "not found|not a directory"),
])
def test_bad_dataset_requests(tmp_path, name, kwargs, error, message) -> None:
    if name == "mnist" and "download" in kwargs:
        kwargs["data_dir"] = tmp_path
    with pytest.raises(error, match=message):
        load_dataset(name, **kwargs)


def test_npz_without_labels(tmp_path) -> None:
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(DataError, match="needs 'x' and 'y'"):
        load_dataset(str(tmp_path / "bad.npz"))
