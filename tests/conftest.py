"""Shared fixtures: small synthetic datasets that need no download; the suite's split over workers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ddcore.data import Dataset, DataSplits, load_dataset


def _workers() -> int:
    """How many pytest-xdist workers share this machine (1 without xdist)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, each worker gets its share of the cores: torch threads here, OMP in subprocesses.

    Two workers of two torch threads each on 2 cores oversubscribe them, and small-model tests
    then slow down several times over (OpenMP threads spin waiting for each other).
    """
    if _workers() > 1 and os.environ.get("PYTEST_XDIST_WORKER"):
        threads = max(1, (os.cpu_count() or 1) // _workers())
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # Flower, Ray and CLI processes the tests start


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, start each half of the suite with half of the long tests (``slow``, ``integration``).

    The work-stealing scheduler (``--dist worksteal``, pyproject.toml) first gives each of the two
    workers one half of the list and then moves queued tests from the busier worker to the idle
    one - but never a running test. Putting the long tests (each a minute or more: Flower
    processes, Ray) first in both halves keeps one worker from ending with a long test alone.
    Only the order changes, never which tests run.
    """
    if _workers() != 2:
        return
    def long(it: pytest.Item) -> bool:
        return bool(it.get_closest_marker("integration") or it.get_closest_marker("slow"))

    heavy, light = [it for it in items if long(it)], [it for it in items if not long(it)]
    halves: list[list[pytest.Item]] = [[], []]
    for it in sorted(heavy, key=lambda it: it.get_closest_marker("integration") is None):
        halves[len(halves[0]) > len(halves[1])].append(it)  # integration tests first, then alternate
    cut = max(0, len(items) // 2 - len(halves[0]))
    items[:] = halves[0] + light[:cut] + halves[1] + light[cut:]


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
