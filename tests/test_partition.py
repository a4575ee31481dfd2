"""Partitions are seeded, disjoint and cover the data; bad parameters are refused."""

from __future__ import annotations

import numpy as np
import pytest

from ddcore.errors import ConfigError
from ddcore.partition import PartitionSpec, partition_indices

LABELS = np.repeat(np.arange(10), 50)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_cover_and_are_seeded(scheme: str) -> None:
    # 10 clients: with at least as many clients as classes, every class is some client's first
    spec = PartitionSpec(num_partitions=10, scheme=scheme, alpha=0.5, classes_per_client=2, seed=3)
    parts = partition_indices(LABELS, spec)
    joined = np.concatenate(parts)
    assert len(parts) == 10
    assert len(joined) == len(np.unique(joined)) == len(LABELS)  # disjoint and covering
    again = partition_indices(LABELS, spec)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(LABELS, PartitionSpec(10, scheme, 0.5, 2, seed=4))
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_pathological_clients_hold_k_classes() -> None:
    parts = partition_indices(LABELS, PartitionSpec(num_partitions=5, scheme="pathological",
                                                    classes_per_client=2))
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    def skew(alpha: float) -> float:
        parts = partition_indices(LABELS, PartitionSpec(num_partitions=5, scheme="dirichlet", alpha=alpha))
        return float(np.mean([np.bincount(LABELS[p], minlength=10).max() / max(len(p), 1) for p in parts]))

    assert skew(0.1) > skew(100.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"scheme": "zipf"}, "unknown partition"),
    ({"scheme": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
    ({"num_partitions": 0}, "clients must be >= 1"),
    ({"scheme": "pathological", "classes_per_client": 0}, "classes per client"),
])
def test_bad_partition_parameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PartitionSpec(**kwargs)


def test_more_classes_per_client_than_classes() -> None:
    with pytest.raises(ConfigError, match="exceeds the 10 classes"):
        partition_indices(LABELS, PartitionSpec(scheme="pathological", classes_per_client=11))
