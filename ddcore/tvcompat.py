"""Import torchvision beside a CPU-only torch build.

The registry's torchvision 0.28.0 wheel is a CUDA build whose ``_C`` extension registers
kernels for ``torchvision::nms``/``qnms`` without their schemas when CUDA torch is absent,
so ``import torchvision`` fails with "operator torchvision::nms does not exist". Defining
the two schemas first makes the pure-Python parts (datasets, transforms, utils) usable.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_fragment: list[torch.library.Library] = []  # keeps the schema fragment alive


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, defining missing op schemas if needed."""
    if not _fragment and not hasattr(torch.ops.torchvision, "nms"):
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            lib.define(schema)
        _fragment.append(lib)
    return importlib.import_module("torchvision")
