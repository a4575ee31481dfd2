"""Frozen settings of distillation and of training on a summary (presets: ddcore.runconfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ddcore.augment import DEFAULT_MODE, DEFAULT_STRATEGY, MODES, parse_strategy
from ddcore.errors import ConfigError
from ddcore.models import ModelSpec

INITS = ("real", "noise")
PRECISIONS = ("fp32", "bf16", "fp16")
REAL_PRECISIONS = ("auto", "fp32", "bf16")
SOFT_LABELS = ("none", "learned", "teacher")


@dataclass(frozen=True)
class TrainConfig:
    """How a fresh model is trained on a summary (or on real data)."""

    epochs: int = 100  # passes over the training set
    lr: float = 0.01  # SGD learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa_strategy: str = DEFAULT_STRATEGY  # per-image augmentation while training; "none" disables
    # "one": one op of the strategy per batch, picked at random (DSA's 'S' mode, as the reference
    # evaluate_synset); "all": every op on every image, far stronger (docs/calibration.md)
    dsa_mode: str = DEFAULT_MODE
    min_steps: int = 400  # train at least this many SGD steps (small summaries would get too few)
    lr_decay: bool = True  # divide the learning rate by 10 for the second half of the steps

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.min_steps < 0:
            raise ConfigError(
                f"training needs epochs >= 0, batch_size >= 1, lr > 0, min_steps >= 0; got "
                f"{self.epochs}, {self.batch_size}, {self.lr}, {self.min_steps}"
            )
        parse_strategy(self.dsa_strategy)
        if self.dsa_mode not in MODES:
            raise ConfigError(f"unknown train-dsa-mode {self.dsa_mode!r}; known: {', '.join(MODES)}")


ACCOUNTANTS = ("rdp", "prv")


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
    # how repeated subsampled releases (DP-SGD, DP-GM) are accounted and sigma calibrated: Opacus's
    # "rdp" (Renyi DP) or "prv" (privacy random variables: numerically tight, less noise for the same
    # epsilon). One-release mechanisms (dp-dm, statistics) are always accounted exactly.
    accountant: str = "rdp"
    # draw the noise (and DP-SGD's Poisson sampling) from the operating system's entropy, so that
    # nobody who knows the run's seeds - the server does - can redraw the noise and subtract it.
    # false: from the run's seed (bit-for-bit repeatable experiments and tests) - then the noise
    # protects against no one who knows the seed (privacy.mechanisms.noise_generator)
    secret_noise: bool = True

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0:
            raise ConfigError(f"target-epsilon must be > 0 (inf = no noise), got {self.target_epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), e.g. 1e-5; got {self.delta}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ConfigError(f"max-grad-norm must be a finite number > 0, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"unknown accountant {self.accountant!r}; known: {', '.join(ACCOUNTANTS)}")


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
    dsa_mode: str = DEFAULT_MODE  # one op of the strategy per draw, picked at random (DSA's 'S'), or all
    model: ModelSpec = field(default_factory=ModelSpec)
    # gradient matching (DC/DSA)
    outer_loop: int = 10  # image updates per network initialisation
    inner_loop: int = 1  # network updates on the synthetic set between matching steps
    lr_net: float = 0.01
    dp: DPConfig = field(default_factory=DPConfig)  # privacy (needs the ``privacy`` package)
    # DP-DM's one release (privacy.methods.dp_dm): a bank of random networks rebuilt from a seed
    bank_size: int = 20  # K random networks; each record's feature concatenates their embeddings
    bank_seed: int = 0  # network k is built from seed bank_seed + k (public: a server can rebuild it)
    bank_augment: int = 0  # fixed dsa_strategy views averaged with the plain image (0 = plain only)
    seed: int = 0
    device: str = "cpu"
    time_budget: float = 0.0  # seconds of optimisation: stop at the first iteration past it (0 = no limit)
    # no-grad passes over real data (DM's real embeddings): chunk size and precision, measured in
    # simulations.speed; auto = bf16 autocast where the CPU (avx512_bf16/AMX) or GPU runs it natively
    embed_chunk: int = 64
    real_precision: str = "auto"  # auto | fp32 | bf16
    # unrolled methods (DD, MTT, IADD): Adam step on the log of their learned step sizes
    lr_lr: float = 0.01
    # meta-model matching (DD)
    syn_steps: int = 5  # SGD steps DD unrolls on the synthetic set per image update (one learned lr each)
    dd_fixed_init: bool = False  # unroll from one fixed network instead of a fresh one each update
    dd_augment: bool = False  # apply dsa_strategy inside DD's unroll (Wang et al. train on the plain images)
    dd_batch_real: int = 32  # real images per class in the outer loss (batch_real is per class too)
    # trajectory matching (MTT, IADD): experts trained on the client's own data once per call
    mtt_syn_steps: int = 20  # N: SGD steps of the student on the synthetic set per image update
    mtt_experts: int = 2  # expert trajectories
    mtt_expert_epochs: int = 6  # epochs per expert, one checkpoint after each (plus the start)
    mtt_expert_span: int = 2  # M: the student matches the expert this many epochs ahead
    mtt_max_start: int = 3  # the student starts from an expert checkpoint in [0, mtt_max_start]
    # importance-aware parameter matching (IADD)
    iadd_lr_importance: float = 0.01  # Adam step on the importance logits (larger ones collapse fast)
    iadd_prune: float = 0.1  # importances (mean 1) below this are dropped for the rest of the run
    # options of the matching methods (ddcore.methods.options) and soft labels (ddcore.methods.soft_labels)
    residual_alpha: float = 1.0  # every residual_every updates x = a x + (1 - a) real patch; 1 = off
    residual_every: int = 50  # image updates between two residual mixes
    multires: float = 0.0  # fraction of the iterations optimised at half resolution first (0 = off)
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast and loss scaling; CUDA only)
    soft_labels: str = "none"  # none | learned (with the images: dd, mtt, iadd) | teacher (any method)
    lr_labels: float = 0.05  # Adam step on the learned label logits
    teacher_epochs: int = 20  # epochs of the teacher network on the real data (soft_labels="teacher")
    teacher_temperature: float = 1.0  # softmax temperature applied to the teacher's logits
    # factorised summary (ddcore.factorised): ipc bases per class (the bytes of ipc images), decoded
    # by factor_hallucinators shared hallucinators into ipc * factor_hallucinators images per class
    factorised: bool = False
    factor_hallucinators: int = 4
    factor_lr: float = 0.01  # hallucinator step size as a fraction of the image step size

    def __post_init__(self) -> None:
        self._check_unrolled()
        self._check_options()
        if self.factor_hallucinators < 1 or not self.factor_lr > 0:
            raise ConfigError(f"factor-hallucinators must be >= 1 and factor-lr > 0, got "
                              f"{self.factor_hallucinators}, {self.factor_lr}")
        if self.ipc < 1:
            raise ConfigError(f"ipc must be >= 1, got {self.ipc}")
        if self.bank_size < 1 or self.bank_augment < 0:
            raise ConfigError(f"bank-size must be >= 1 and bank-augment >= 0, got {self.bank_size}, "
                              f"{self.bank_augment}")
        if self.iterations < 0 or self.batch_real < 1 or self.outer_loop < 1 or self.inner_loop < 0:
            raise ConfigError(
                "iterations >= 0, batch_real >= 1, outer_loop >= 1 and inner_loop >= 0 are required"
            )
        if self.lr_images is not None and self.lr_images <= 0:
            raise ConfigError(f"lr_images must be > 0, got {self.lr_images}")
        if self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}; known: {', '.join(INITS)}")
        parse_strategy(self.dsa_strategy)
        if self.dsa_mode not in MODES:
            raise ConfigError(f"unknown dsa-mode {self.dsa_mode!r}; known: {', '.join(MODES)}")

    def _check_unrolled(self) -> None:
        """Validate the DD / MTT / IADD fields."""
        counts = {"syn-steps": self.syn_steps, "dd-batch-real": self.dd_batch_real,
                  "mtt-syn-steps": self.mtt_syn_steps, "mtt-experts": self.mtt_experts,
                  "mtt-expert-span": self.mtt_expert_span}
        small = [f"{k}={v}" for k, v in counts.items() if v < 1]
        if small or self.mtt_max_start < 0:
            raise ConfigError(f"{', '.join(small) or f'mtt-max-start={self.mtt_max_start}'}: "
                              "syn-steps, dd-batch-real, mtt-syn-steps, mtt-experts, mtt-expert-span must be "
                              ">= 1 "
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

    def _check_options(self) -> None:
        """Validate the residual, multi-resolution, precision and soft-label fields."""
        if not (0 < self.residual_alpha <= 1 and self.residual_every >= 1):
            raise ConfigError(f"residual-alpha must be in (0, 1] (1 = off) and residual-every >= 1; got "
                              f"{self.residual_alpha}, {self.residual_every}")
        if not 0 <= self.multires < 1:
            raise ConfigError(f"multires is the fraction of the iterations run at half resolution, "
                              f"in [0, 1) (0 = off); got {self.multires}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; known: {', '.join(PRECISIONS)}")
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            raise ConfigError("precision fp16 needs a CUDA device (device=cuda); on CPU use precision=bf16")
        if self.real_precision not in REAL_PRECISIONS:
            raise ConfigError(f"unknown real-precision {self.real_precision!r}; known: "
                              f"{', '.join(REAL_PRECISIONS)}")
        if self.embed_chunk < 1 or not (self.time_budget >= 0 and math.isfinite(self.time_budget)):
            raise ConfigError(f"embed-chunk must be >= 1 and time-budget a finite number of seconds >= 0 "
                              f"(0 = no limit); got {self.embed_chunk}, {self.time_budget}")
        if self.time_budget > 0 and self.multires > 0:
            raise ConfigError("multires switches resolution after a fixed number of iterations, which "
                              "a time budget may never reach; use multires=0 with time-budget, or drop "
                              "the budget")
        if self.soft_labels not in SOFT_LABELS:
            raise ConfigError(f"unknown soft-labels {self.soft_labels!r}; known: {', '.join(SOFT_LABELS)}")
        if not (self.lr_labels > 0 and self.teacher_epochs >= 1 and self.teacher_temperature > 0):
            raise ConfigError(f"lr-labels > 0, teacher-epochs >= 1 and teacher-temperature > 0 are required; "
                              f"got {self.lr_labels}, {self.teacher_epochs}, {self.teacher_temperature}")
        if self.dp.enabled and self.residual_alpha < 1:
            raise ConfigError("residual mixing copies real patches into the summary, which DP forbids; "
                              "use residual-alpha=1 with dp=true")
        if self.dp.enabled and self.soft_labels == "teacher":
            raise ConfigError("teacher soft labels come from a network trained on the real data without "
                              "privacy, which DP forbids; use soft-labels=none with dp=true")

    def lr_or(self, default: float) -> float:
        """The image step size, or the method's ``default`` when none was set."""
        return default if self.lr_images is None else self.lr_images
