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
    # unrolled methods (DD, MTT, IADD): inner steps on the synthetic set and their learned step size
    syn_steps: int = 5  # SGD steps unrolled on the synthetic set per image update
    lr_lr: float = 0.01  # Adam step on the log of the learned step sizes
    # meta-model matching (DD)
    dd_fixed_init: bool = False  # unroll from one fixed network instead of a fresh one each update
    dd_batch_real: int = 32  # real images per class in the outer loss (batch_real is per class too)
    # trajectory matching (MTT, IADD): experts trained on the client's own data once per call
    mtt_experts: int = 2  # expert trajectories
    mtt_expert_epochs: int = 6  # epochs per expert, one checkpoint after each (plus the start)
    mtt_expert_span: int = 2  # M: the student matches the expert this many epochs ahead
    mtt_max_start: int = 3  # the student starts from an expert checkpoint in [0, mtt_max_start]
    # importance-aware parameter matching (IADD)
    iadd_lr_importance: float = 0.01  # Adam step on the importance logits (larger ones collapse fast)
    iadd_prune: float = 0.1  # importances (mean 1) below this are dropped for the rest of the run

    def __post_init__(self) -> None:
        self._check_unrolled()
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

    def _check_unrolled(self) -> None:
        """Validate the DD / MTT / IADD fields."""
        counts = {"syn-steps": self.syn_steps, "dd-batch-real": self.dd_batch_real,
                  "mtt-experts": self.mtt_experts, "mtt-expert-span": self.mtt_expert_span}
        small = [f"{k}={v}" for k, v in counts.items() if v < 1]
        if small or self.mtt_max_start < 0:
            raise ConfigError(f"{', '.join(small) or f'mtt-max-start={self.mtt_max_start}'}: "
                              "syn-steps, dd-batch-real, mtt-experts, mtt-expert-span must be >= 1 "
                              "and mtt-max-start >= 0")
        if self.mtt_max_start + self.mtt_expert_span > self.mtt_expert_epochs:
            raise ConfigError(f"mtt-max-start + mtt-expert-span ({self.mtt_max_start} + "
                              f"{self.mtt_expert_span}) must be <= mtt-expert-epochs "
                              f"({self.mtt_expert_epochs}); raise mtt-expert-epochs or lower the other two")
        if not (self.lr_lr > 0 and self.iadd_lr_importance >= 0):
            raise ConfigError(f"lr-lr must be > 0 and iadd-lr-importance >= 0, got {self.lr_lr}, "
                              f"{self.iadd_lr_importance}")
        if not 0 <= self.iadd_prune < 1:
            raise ConfigError(f"iadd-prune must be in [0, 1) (0 = never prune), got {self.iadd_prune}")

    def lr_or(self, default: float) -> float:
        """The image step size, or the method's ``default`` when none was set."""
        return default if self.lr_images is None else self.lr_images
