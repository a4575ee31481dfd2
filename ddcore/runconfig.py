"""Settings of a federated run as one frozen dataclass, and its flat kebab-case form.

The flat form is what Flower's run-config (``[tool.flwr.app.config]``), the server's
per-round ``ConfigRecord`` and the command lines use; :class:`RunConfig` is what code reads.
Its defaults (with ddcore's :mod:`ddcore.config` defaults inside) are the single source.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ddcore.config import DistillConfig, TrainConfig
from ddcore.errors import ConfigError
from ddcore.models import ModelSpec
from ddcore.partition import PartitionSpec
from ddcore.summary import STORED_DTYPES

Scalar = str | int | float | bool


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated distillation / FedAvg run needs."""

    dataset: str = "mnist5k"  # registered name, or a path to an .npz / ImageFolder
    data_dir: str = ""  # folder of torchvision dataset files ("" = none)
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)  # server training on the pooled summaries
    rounds: int = 1  # distillation rounds: 1 = one-shot, > 1 = iterative (FedDM-style)
    perturb: float = 0.01  # iterative rounds: relative radius of the models sampled around the global one
    fedavg_rounds: int = 30
    local_epochs: int = 1  # FedAvg local epochs per round
    local_lr: float = 0.01  # FedAvg local SGD learning rate (constant; momentum as train)
    local_batch_size: int = 32  # FedAvg local mini-batch
    fraction: float = 1.0  # fraction of clients sampled per round
    min_clients: int = 2  # a round with fewer usable replies fails
    summary_dtype: str = "float32"  # float32 | float16 | uint8 on the wire
    summary_resolution: int = 0  # side in pixels on the wire (0 = full)
    max_images: int = 2000  # per-client summary size cap (the server rejects larger)
    round_timeout: float = 3600.0  # seconds to wait for replies
    out_dir: str = "runs/flwr"  # where the ServerApp writes its report (flwr run)

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.fedavg_rounds < 0 or self.local_epochs < 1:
            raise ConfigError("rounds >= 1, fedavg-rounds >= 0 and local-epochs >= 1 are required")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if min(self.min_clients, self.max_images, self.local_batch_size) < 1:
            raise ConfigError("min-clients, max-images and local-batch-size must be >= 1")
        if self.local_lr <= 0 or self.perturb < 0:
            raise ConfigError(f"local-lr must be > 0 and perturb >= 0, got {self.local_lr}, {self.perturb}")
        if self.summary_dtype not in STORED_DTYPES:
            raise ConfigError(
                f"unknown summary-dtype {self.summary_dtype!r}; known: {', '.join(STORED_DTYPES)}"
            )
        if self.distill.dp.enabled and self.rounds > 1:
            raise ConfigError("DP distillation is one-shot: with dp=true use rounds=1 "
                              "(iterative rounds would need one accountant across rounds)")
        if self.summary_resolution < 0:
            raise ConfigError(f"summary-resolution must be >= 0, got {self.summary_resolution}")


# flat key -> (section, field); section "" is RunConfig itself
_KEYS: dict[str, tuple[str, str]] = {
    "dataset": ("", "dataset"),
    "data-dir": ("", "data_dir"),
    "num-clients": ("partition", "num_partitions"),
    "partition": ("partition", "scheme"),
    "alpha": ("partition", "alpha"),
    "classes-per-client": ("partition", "classes_per_client"),
    "seed": ("partition", "seed"),
    "method": ("distill", "method"),
    "ipc": ("distill", "ipc"),
    "iterations": ("distill", "iterations"),
    "lr-images": ("distill", "lr_images"),
    "batch-real": ("distill", "batch_real"),
    "init": ("distill", "init"),
    "dsa-strategy": ("distill", "dsa_strategy"),
    "model": ("model", "name"),
    "model-width": ("model", "width"),
    "model-depth": ("model", "depth"),
    "model-norm": ("model", "norm"),
    "outer-loop": ("distill", "outer_loop"),
    "inner-loop": ("distill", "inner_loop"),
    "lr-net": ("distill", "lr_net"),
    "device": ("distill", "device"),
    "syn-steps": ("distill", "syn_steps"),
    "lr-lr": ("distill", "lr_lr"),
    "dd-fixed-init": ("distill", "dd_fixed_init"),
    "dd-batch-real": ("distill", "dd_batch_real"),
    "dd-augment": ("distill", "dd_augment"),
    "mtt-syn-steps": ("distill", "mtt_syn_steps"),
    "mtt-experts": ("distill", "mtt_experts"),
    "mtt-expert-epochs": ("distill", "mtt_expert_epochs"),
    "mtt-expert-span": ("distill", "mtt_expert_span"),
    "mtt-max-start": ("distill", "mtt_max_start"),
    "iadd-lr-importance": ("distill", "iadd_lr_importance"),
    "iadd-prune": ("distill", "iadd_prune"),
    "residual-alpha": ("distill", "residual_alpha"),
    "residual-every": ("distill", "residual_every"),
    "multires": ("distill", "multires"),
    "precision": ("distill", "precision"),
    "soft-labels": ("distill", "soft_labels"),
    "lr-labels": ("distill", "lr_labels"),
    "teacher-epochs": ("distill", "teacher_epochs"),
    "teacher-temperature": ("distill", "teacher_temperature"),
    "factorised": ("distill", "factorised"),
    "factor-hallucinators": ("distill", "factor_hallucinators"),
    "factor-lr": ("distill", "factor_lr"),
    "dp": ("dp", "enabled"),
    "target-epsilon": ("dp", "target_epsilon"),
    "delta": ("dp", "delta"),
    "max-grad-norm": ("dp", "max_grad_norm"),
    "train-epochs": ("train", "epochs"),
    "train-min-steps": ("train", "min_steps"),
    "train-lr": ("train", "lr"),
    "train-batch-size": ("train", "batch_size"),
    "train-dsa-strategy": ("train", "dsa_strategy"),
    "rounds": ("", "rounds"),
    "perturb": ("", "perturb"),
    "fedavg-rounds": ("", "fedavg_rounds"),
    "local-epochs": ("", "local_epochs"),
    "local-lr": ("", "local_lr"),
    "local-batch-size": ("", "local_batch_size"),
    "fraction": ("", "fraction"),
    "min-clients": ("", "min_clients"),
    "summary-dtype": ("", "summary_dtype"),
    "summary-resolution": ("", "summary_resolution"),
    "max-images": ("", "max_images"),
    "round-timeout": ("", "round_timeout"),
    "out-dir": ("", "out_dir"),
}


def _section(cfg: RunConfig, section: str) -> object:
    if section == "":
        return cfg
    if section == "model":
        return cfg.distill.model
    if section == "dp":
        return cfg.distill.dp
    return getattr(cfg, section)


def to_flat(cfg: RunConfig) -> dict[str, Scalar]:
    """The flat kebab-case mapping of ``cfg`` (``lr-images`` 0 means the method's default)."""
    flat: dict[str, Scalar] = {}
    for key, (section, name) in _KEYS.items():
        value = getattr(_section(cfg, section), name)
        flat[key] = 0.0 if value is None else value
    return flat


def from_flat(values: Mapping[str, Scalar], base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig from flat kebab-case ``values`` over ``base`` (default: the defaults).

    Unknown keys raise :class:`ConfigError` naming the known ones; values are converted to
    the type of the field they set.
    """
    base = base or RunConfig()
    unknown = sorted(set(values) - set(_KEYS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
    changes: dict[str, dict[str, object]] = {"": {}, "partition": {}, "distill": {}, "train": {}, "model": {},
                                           "dp": {}}
    for key, value in values.items():
        section, name = _KEYS[key]
        current = getattr(_section(base, section), name)
        changes[section][name] = _convert(key, value, current)
    if "seed" in values:  # one run seed: partitions and distillation both follow it
        changes["distill"]["seed"] = changes["partition"]["seed"]
    if changes["distill"].get("lr_images") == 0.0:
        changes["distill"]["lr_images"] = None
    model = replace(base.distill.model, **changes["model"])
    dp = replace(base.distill.dp, **changes["dp"])
    distill = replace(base.distill, model=model, dp=dp, **changes["distill"])
    return replace(
        base,
        partition=replace(base.partition, **changes["partition"]),
        distill=distill,
        train=replace(base.train, **changes["train"]),
        **changes[""],
    )


def distill_changes(values: Mapping[str, Scalar], base: DistillConfig) -> dict[str, object]:
    """The :class:`DistillConfig` fields that the flat distillation keys ``values`` set over ``base``.

    Keys of the other sections (partition, model, DP, server training, rounds) raise
    :class:`ConfigError` naming the accepted ones; values are converted as in :func:`from_flat`.
    """
    accepted = [key for key, (section, _) in _KEYS.items() if section == "distill"]
    other = sorted(set(values) - set(accepted))
    if other:
        raise ConfigError(f"{', '.join(other)}: not distillation setting(s); accepted: {', '.join(accepted)}")
    distill = from_flat(values, base=RunConfig(distill=base)).distill
    return {_KEYS[key][1]: getattr(distill, _KEYS[key][1]) for key in values}


def _convert(key: str, value: Scalar, current: object) -> object:
    """Convert ``value`` to the type of ``current`` (the field's present value)."""
    kind = type(current) if current is not None else float
    try:
        if kind is bool:
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value} is not a whole number")
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad value {value!r} for {key}: {exc}") from None


def check_device(cfg: RunConfig) -> RunConfig:
    """Return ``cfg``, or raise if it asks for CUDA on a machine where torch sees none."""
    import torch

    if cfg.distill.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return cfg


RUN_PRESETS: dict[str, RunConfig] = {
    # seconds: tests and smoke runs (tiny model, few steps)
    "quick": RunConfig(
        distill=DistillConfig(iterations=10, batch_real=64, outer_loop=2, model=ModelSpec(width=16)),
        train=TrainConfig(epochs=10, min_steps=20),
        fedavg_rounds=3,
    ),
    # minutes on 2 CPU cores: the README run (equal to the run-config defaults in pyproject.toml)
    "default": RunConfig(),
    # the privacy-utility sweep (simulations.privacy_utility): 18 systems plus their audits must fit
    # in an hour on 2 cores (GM took ~4.5 min per system at 100 updates), so 60 image updates and
    # 10 FedAvg rounds; 16 real images per class per step keeps the DP sampling rate q well below 1
    # on clients of a few hundred examples
    "privacy": RunConfig(
        distill=DistillConfig(iterations=60, batch_real=16),
        fedavg_rounds=10,
    ),
    # GPU-scale: ConvNet-128 and long optimisation, as in the papers
    "paper": RunConfig(
        distill=DistillConfig(iterations=20000, model=ModelSpec(width=128)),
        train=TrainConfig(epochs=1000, min_steps=0),
        fedavg_rounds=200,
    ),
}


def run_preset(name: str) -> RunConfig:
    """The run preset called ``name`` (quick, default, paper)."""
    if name not in RUN_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(RUN_PRESETS)}")
    return RUN_PRESETS[name]
