"""Distillation methods behind one registry and one call shape.

Every method is ``distill(data, model_factory, cfg, init=None, progress=None) -> Summary``;
``register_method`` adds one (``privacy`` registers the DP variants this way, as
``dp-<name>``). With ``cfg.dp.enabled`` the DP variant of ``cfg.method`` runs, and a missing
one is an error: nothing trains without the privacy that was asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ddcore.config import DistillConfig
from ddcore.data import Dataset
from ddcore.errors import ConfigError
from ddcore.methods.options import check_options, options_meta
from ddcore.methods.soft_labels import teacher_labels
from ddcore.models import ModelFactory
from ddcore.registry import Registry
from ddcore.summary import Summary
from ddcore.train import Progress

Method = Callable[[Dataset, ModelFactory, DistillConfig, Summary | None, Progress | None], Summary]
METHODS: Registry[Method] = Registry("method")
FACTORISED: set[str] = set()  # methods that can optimise a factorised summary (cfg.factorised)


def register_method(name: str, factorised: bool = False) -> Callable[[Method], Method]:
    """Register a method under ``name``; ``factorised=True`` if it honours ``cfg.factorised``."""
    if factorised:
        FACTORISED.add(name)
    return METHODS.register(name)


for _module in ("random_real", "herding", "dm", "gm", "dd", "mtt", "iadd"):
    importlib.import_module(f"ddcore.methods.{_module}")


def method_name(cfg: DistillConfig) -> str:
    """The registered method that runs for ``cfg``: ``dp-<method>`` when DP is enabled."""
    if cfg.dp.enabled and not cfg.method.startswith("dp-"):
        name = f"dp-{cfg.method}"
        if name not in METHODS:
            dp_names = [m for m in METHODS.names() if m.startswith("dp-")]
            raise ConfigError(
                f"dp=true but method {cfg.method!r} has no DP variant {name!r} registered; "
                + (f"use one of {', '.join(dp_names)}" if dp_names
                   else "import privacy.methods first (it registers dp-gm and dp-dm)")
            )
        return name
    return cfg.method


def check_method(cfg: DistillConfig) -> str:
    """The method ``cfg`` runs; raises :class:`ConfigError` if it cannot honour ``cfg``'s options."""
    name = method_name(cfg)
    METHODS.get(name)  # raises, listing the known ones
    if cfg.factorised and name not in FACTORISED:
        raise ConfigError(f"method {name!r} cannot make a factorised summary; use one of "
                          f"{', '.join(sorted(FACTORISED))} or drop factorised (--factorised)")
    check_options(name, cfg)
    return name


def distill(
    data: Dataset,
    model_factory: ModelFactory,
    cfg: DistillConfig,
    init: Summary | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Distill ``data`` with the method ``cfg`` names (its DP variant if DP is on).

    The method applies the options it supports (:mod:`ddcore.methods.options`; any other raises);
    teacher soft labels relabel the finished summary, whatever the method.
    """
    name = check_method(cfg)
    summary = METHODS.get(name)(data, model_factory, cfg, init, progress)
    if cfg.soft_labels == "teacher":
        summary = teacher_labels(summary, data, model_factory, cfg)
    return summary.with_meta(**options_meta(cfg))


__all__ = ["FACTORISED", "METHODS", "Method", "check_method", "distill", "method_name", "register_method"]
