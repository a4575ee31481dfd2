"""Distillation methods behind one registry and one call shape.

Every method is ``distill(data, model_factory, cfg, init=None, progress=None) -> Summary``;
``register_method`` adds one (``privacy`` registers the DP variants this way).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ddcore.config import DistillConfig
from ddcore.data import Dataset
from ddcore.models import ModelFactory
from ddcore.registry import Registry
from ddcore.summary import Summary
from ddcore.train import Progress

Method = Callable[[Dataset, ModelFactory, DistillConfig, Summary | None, Progress | None], Summary]
METHODS: Registry[Method] = Registry("method")
register_method = METHODS.register

for _module in ("random_real", "herding", "dm", "gm"):
    importlib.import_module(f"ddcore.methods.{_module}")


def distill(
    data: Dataset,
    model_factory: ModelFactory,
    cfg: DistillConfig,
    init: Summary | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Distill ``data`` with the method ``cfg.method`` names and return the summary."""
    return METHODS.get(cfg.method)(data, model_factory, cfg, init, progress)


__all__ = ["METHODS", "Method", "distill", "register_method"]
