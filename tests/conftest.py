"""Shared fixtures: small synthetic datasets that need no download."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddcore.data import Dataset, DataSplits, load_dataset


def blobs(n_per_class: int = 20, num_classes: int = 3, size: int = 8, seed: int = 0) -> Dataset:
    """Images whose classes differ by a bright quadrant, plus noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(num_classes):
        x = 0.3 * torch.randn((n_per_class, 1, size, size), generator=g)
        half = size // 2
        r, q = divmod(c % 4, 2)
        x[:, :, r * half:(r + 1) * half, q * half:(q + 1) * half] += 2.0
        xs.append(x)
        ys.append(torch.full((n_per_class,), c, dtype=torch.long))
    # mean 0.5, std 0.1: pixels in [0, 1] map to [-5, 5], which holds every blob value
    return Dataset(torch.cat(xs), torch.cat(ys), num_classes, (0.5,), (0.1,), "blobs")


@pytest.fixture
def one_thread():
    """One torch thread for the test: oversubscribed threads on 2 shared cores are far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny() -> Dataset:
    return blobs()


@pytest.fixture(scope="session")
def digits() -> DataSplits:
    return load_dataset("digits", seed=0)


@pytest.fixture
def npz_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x=rng.integers(0, 256, (60, 12, 12), dtype=np.uint8), y=np.repeat(np.arange(3), 20))
    return path
