"""Seeded client partitions (IID, Dirichlet, k classes per client) via flwr-datasets partitioners.

``flwr_datasets`` does not import Flower itself; it is imported lazily here so that plain
``ddcore`` use does not pay for Hugging Face ``datasets``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddcore.errors import ConfigError

SCHEMES = ("iid", "dirichlet", "pathological")


@dataclass(frozen=True)
class PartitionSpec:
    """How the training split is divided among clients."""

    num_partitions: int = 10
    scheme: str = "dirichlet"  # iid | dirichlet | pathological
    alpha: float = 0.5  # Dirichlet concentration (smaller = more skewed)
    classes_per_client: int = 2  # pathological: classes each client holds
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown partition {self.scheme!r}; known: {', '.join(SCHEMES)}")
        if self.num_partitions < 1:
            raise ConfigError(f"the number of clients must be >= 1, got {self.num_partitions}")
        if self.scheme == "dirichlet" and not self.alpha > 0:
            raise ConfigError(f"dirichlet alpha must be > 0, got {self.alpha}")
        if self.scheme == "pathological" and self.classes_per_client < 1:
            raise ConfigError(f"classes per client must be >= 1, got {self.classes_per_client}")


def describe(spec: PartitionSpec) -> str:
    """``dirichlet 0.5``, ``pathological 2 classes per client``, ``iid``: a report's words for ``spec``."""
    if spec.scheme == "dirichlet":
        return f"dirichlet {spec.alpha:g}"
    if spec.scheme == "pathological":
        return f"pathological {spec.classes_per_client} classes per client"
    return spec.scheme


def partition_indices(labels: np.ndarray, spec: PartitionSpec) -> list[np.ndarray]:
    """Split example positions ``0..len(labels)-1`` into ``spec.num_partitions`` disjoint sets.

    The result depends only on ``labels`` and ``spec`` (seeded), so every method in a
    comparison sees identical partitions.
    """
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = int(labels.max()) + 1 if labels.size else 0
    if spec.num_partitions > len(labels):
        raise ConfigError(f"{spec.num_partitions} clients but only {len(labels)} training examples")
    if spec.scheme == "pathological" and spec.classes_per_client > num_classes:
        raise ConfigError(
            f"classes per client ({spec.classes_per_client}) exceeds the {num_classes} classes"
        )
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    order = np.random.default_rng(spec.seed).permutation(len(labels))  # IID takes contiguous shards
    table = HFDataset.from_dict({"label": labels[order].tolist(), "position": order.tolist()})
    if spec.scheme == "iid":
        partitioner = IidPartitioner(spec.num_partitions)
    elif spec.scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            spec.num_partitions, "label", alpha=spec.alpha, min_partition_size=1,
            self_balancing=False, shuffle=True, seed=spec.seed,
        )
    else:
        partitioner = PathologicalPartitioner(
            spec.num_partitions, "label", spec.classes_per_client,
            class_assignment_mode="first-deterministic", shuffle=True, seed=spec.seed,
        )
    partitioner.dataset = table
    try:
        parts = [np.asarray(partitioner.load_partition(i)["position"], dtype=np.int64)
                 for i in range(spec.num_partitions)]
    except ValueError as exc:  # e.g. Dirichlet cannot give every client an example
        raise ConfigError(f"cannot partition as asked ({spec}): {exc}") from None
    return [np.sort(p) for p in parts]
