"""Frozen settings of distillation and of training on a summary (presets: ddcore.runconfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ddcore.augment import DEFAULT_STRATEGY, parse_strategy
from ddcore.errors import ConfigError
from ddcore.models import ModelSpec

INITS = ("real", "noise")


@dataclass(frozen=True)
class TrainConfig:
    """How a fresh model is trained on a summary (or on real data)."""

    epochs: int = 100  # passes over the training set
    lr: float = 0.01  # SGD learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa_strategy: str = DEFAULT_STRATEGY  # per-image augmentation while training; "none" disables
    min_steps: int = 400  # train at least this many SGD steps (small summaries would get too few)
    lr_decay: bool = True  # divide the learning rate by 10 for the second half of the steps

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.min_steps < 0:
            raise ConfigError(
                f"training needs epochs >= 0, batch_size >= 1, lr > 0, min_steps >= 0; got "
                f"{self.epochs}, {self.batch_size}, {self.lr}, {self.min_steps}"
            )
        parse_strategy(self.dsa_strategy)


@dataclass(frozen=True)
class DPConfig:
    """Differential-privacy settings (plain values; the mechanisms live in ``privacy``).

    ``enabled`` switches the DP code path on (the DP variant of the method, DP-SGD in FedAvg);
    ``target_epsilon = inf`` then runs that path with clipping but no noise (no privacy).
    """

    enabled: bool = False
    target_epsilon: float = math.inf  # epsilon spent over the whole run, per client
    delta: float = 1e-5  # must be < 1/n for a client of n examples
    max_grad_norm: float = 1.0  # per-sample clipping norm C (gradients, or embeddings for DP-DM)

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0:
            raise ConfigError(f"target-epsilon must be > 0 (inf = no noise), got {self.target_epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), e.g. 1e-5; got {self.delta}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ConfigError(f"max-grad-norm must be a finite number > 0, got {self.max_grad_norm}")


@dataclass(frozen=True)
class DistillConfig:
    """Settings shared by every distillation method (each reads the fields it needs)."""

    method: str = "dm"
    ipc: int = 10  # synthetic images per class
    iterations: int = 200  # updates of the synthetic images
    lr_images: float | None = None  # step size on the images; None = the method's own default
    batch_real: int = 128  # real images per class per iteration
    init: str = "real"  # start from random real images or from Gaussian noise
    dsa_strategy: str = DEFAULT_STRATEGY  # siamese augmentation while matching
    model: ModelSpec = field(default_factory=ModelSpec)
    # gradient matching (DC/DSA)
    outer_loop: int = 10  # image updates per network initialisation
    inner_loop: int = 1  # network updates on the synthetic set between matching steps
    lr_net: float = 0.01
    dp: DPConfig = field(default_factory=DPConfig)  # privacy (needs the ``privacy`` package)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.ipc < 1:
            raise ConfigError(f"ipc must be >= 1, got {self.ipc}")
        if self.iterations < 0 or self.batch_real < 1 or self.outer_loop < 1 or self.inner_loop < 0:
            raise ConfigError(
                "iterations >= 0, batch_real >= 1, outer_loop >= 1 and inner_loop >= 0 are required"
            )
        if self.lr_images is not None and self.lr_images <= 0:
            raise ConfigError(f"lr_images must be > 0, got {self.lr_images}")
        if self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}; known: {', '.join(INITS)}")
        parse_strategy(self.dsa_strategy)

    def lr_or(self, default: float) -> float:
        """The image step size, or the method's ``default`` when none was set."""
        return default if self.lr_images is None else self.lr_images
