"""What travels between the ServerApp and the ClientApp, and how its bytes are counted.

Both sides import this module, so the record keys and message types live in one place.
Bytes are counted with Flower's ``count_bytes()`` on every record of a message's content
(arrays as serialised ``.npy`` buffers, header included, plus config and metric entries);
``array_bytes`` gives the raw array payload (the sum of ``nbytes``) for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ddcore.devicedata import DataSpec
from ddcore.methods.collab import ClassSoftLabels, ClassTargets
from ddcore.summary import Summary

CONFIG = "config"  # ConfigRecord: the flat run-config plus per-round values
ARRAYS = "arrays"  # ArrayRecord: model weights (FedAvg both ways; global model when iterative)
SUMMARY = "summary"  # ArrayRecord: the encoded summary a client sends
META = "meta"  # ConfigRecord: the summary's metadata
METRICS = "metrics"  # MetricRecord: num-examples, seconds, peak memory, ...
# collaborative rounds (ddcore.methods.collab), from round 2 on
GLOBAL_STATS = "global-stats"  # ArrayRecord down: class-means (K, D) float32, class-present (K,) uint8
SOFT_LABELS = "soft-labels"  # ArrayRecord up: probs (K, K) float32, counts (K,) int64

DISTILL = "train.distill"  # message type of a distillation request (FedAvg's is Flower's plain "train")

# sent in the CONFIG record beside the flat run-config
NUM_CLASSES = "num-classes"  # the label space (a client may hold only some classes)
SERVER_ROUND = "server-round"  # the round a distillation request belongs to
SPEC_KEYS = ("data-name", "data-shape", "data-mean", "data-std")  # what the run's images look like


def spec_config(spec: DataSpec) -> dict[str, int | str | list[int] | list[float]]:
    """The round-config entries telling a node the run's class count, image shape, mean and std."""
    return {NUM_CLASSES: spec.num_classes, "data-name": spec.name, "data-shape": list(spec.image_shape),
            "data-mean": list(spec.mean), "data-std": list(spec.std)}


def read_spec(config: Mapping) -> DataSpec | None:
    """The :class:`DataSpec` a round config carries, or None if the server sent none."""
    if not all(key in config for key in SPEC_KEYS):
        return None
    c, h, w = (int(v) for v in config["data-shape"])
    return DataSpec(str(config["data-name"]), (c, h, w), int(config[NUM_CLASSES]),
                    tuple(float(v) for v in config["data-mean"]), tuple(float(v) for v in config["data-std"]))


def summary_content(summary: Summary, dtype: str, resolution: int | None, metrics: dict) -> RecordDict:
    """The reply content carrying ``summary`` encoded as ``dtype`` at ``resolution``."""
    arrays = summary.to_arrays(dtype, resolution)
    return RecordDict(
        {
            SUMMARY: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            META: ConfigRecord(summary.wire_meta(dtype, resolution)),
            METRICS: MetricRecord(metrics),
        }
    )


def targets_record(targets: ClassTargets) -> ArrayRecord:
    """The :data:`GLOBAL_STATS` record: the global summary's class means and which classes it holds."""
    return ArrayRecord({"class-means": Array(targets.means.float().numpy()),
                        "class-present": Array(targets.present.numpy().astype(np.uint8))})


def read_targets(record: ArrayRecord) -> ClassTargets:
    """The :class:`ClassTargets` a :data:`GLOBAL_STATS` record carries."""
    arrays = content_arrays(record)
    return ClassTargets(torch.from_numpy(arrays["class-means"]).float(),
                        torch.from_numpy(arrays["class-present"]).bool())


def soft_labels_record(soft: ClassSoftLabels) -> ArrayRecord:
    """The :data:`SOFT_LABELS` record of a reply: per-class soft labels and counts."""
    return ArrayRecord({"probs": Array(soft.probs.float().numpy()),
                        "counts": Array(soft.counts.long().numpy())})


def content_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Decode every array of ``record`` to NumPy (never unpickles)."""
    return {key: array.numpy() for key, array in record.items()}


def _scalar_bytes(value: object) -> int:
    if isinstance(value, bool):
        return 1
    if isinstance(value, int | float):
        return 8  # 64-bit on the wire
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, list):
        return sum(_scalar_bytes(v) for v in value)
    raise TypeError(f"unexpected config value type {type(value).__name__}")


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower counts them (all records).

    Array and metric records use their own ``count_bytes()``. Config records use the same
    rule (key length + 8 per number, 1 per bool, length of strings), computed here because
    Flower's ``ConfigRecord.count_bytes()`` raises on an empty string value.
    """
    total = 0
    for record in content.values():
        if isinstance(record, ConfigRecord):
            total += sum(len(k) + _scalar_bytes(v) for k, v in record.items())
        else:
            total += record.count_bytes()
    return total


def array_bytes(content: RecordDict) -> int:
    """Raw payload bytes of every array in ``content`` (shape x itemsize, no headers)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            for array in record.values():
                total += math.prod(array.shape) * np.dtype(array.dtype).itemsize
    return total
