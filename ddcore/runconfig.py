"""Settings of a federated run as one frozen dataclass, and its flat kebab-case form.

The flat form is what Flower's run-config (``[tool.flwr.app.config]``), the server's
per-round ``ConfigRecord`` and the command lines use; :class:`RunConfig` is what code reads.
Its defaults (with ddcore's :mod:`ddcore.config` defaults inside) are the single source.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import TYPE_CHECKING

from ddcore.augment import parse_strategy
from ddcore.config import DistillConfig, TrainConfig
from ddcore.errors import ConfigError
from ddcore.models import ModelSpec
from ddcore.partition import PartitionSpec
from ddcore.summary import STORED_DTYPES

if TYPE_CHECKING:
    from ddcore.data import DataSplits

Scalar = str | int | float | bool
SUMMARY_KINDS = ("images", "statistics")
STATISTICS_HEADS = ("synthesis", "ridge")
REAL_RECORD_METHODS = ("random_real", "herding")  # coresets: their summaries are private records
NORMALISATIONS = ("data", "public")


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated distillation / FedAvg run needs."""

    dataset: str = "mnist5k"  # registered name, or a path to an .npz / ImageFolder
    data_dir: str = ""  # folder of torchvision dataset files ("" = none)
    # how every image of the run is normalised: "data" (the training split's own per-channel mean and
    # std) or "public" (0.5 / 0.5: no statistic of the private data is used - what DP runs need)
    normalisation: str = "data"
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    # federated runs start their images from noise: an image started from a private record and moved a
    # little is that record (issue 34; docs/main_job.md). Central runs (the `central` preset) may start
    # from real images: nothing leaves the machine
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(init="noise"))
    train: TrainConfig = field(default_factory=TrainConfig)  # server training on the pooled summaries
    rounds: int = 1  # distillation rounds: 1 = one-shot, > 1 = iterative (FedDM-style) or collaborative
    perturb: float = 0.01  # iterative rounds: relative radius of the models sampled around the global one
    # collaborative rounds (FedAF-style, Wang et al. 2024; round 1 is one-shot DM, rounds >= 2 collaborate):
    # the server sends the global model and its summary's per-class mean embeddings down; clients refine
    # their summary with DM plus collab-weight x the squared distance of their synthetic class means under
    # the global model to those, and send per-class soft labels of their real data up; the server trains
    # with collab-kd x T^2 KL(soft label || softmax(model(x) / T)) beside the cross-entropy
    collaborative: bool = False
    # 0.05: both terms are squared distances of D-dim class means (D = 288 for ConvNet-32 on 28x28), but
    # under a trained network they are far larger: at round 2's start on mnist5k (3 clients of the default
    # Dirichlet split, 30 DM updates in round 1) the anchor term was ~12-19 per class against DM's 0.2-0.6,
    # and its gradient on the images 14-35x DM's at weight 1; 0.05 brings that gradient to about DM's
    # size (0.7-1.7x), so neither term drowns the other (not tuned for accuracy)
    collab_weight: float = 0.05
    # 1.0: the T^2 factor keeps the KD gradient on the cross-entropy's scale (Hinton et al. 2015), so
    # weight 1 gives the clients' soft labels and the summary's hard labels an equal say (not tuned)
    collab_kd: float = 1.0
    # 2.0: softens the global model's outputs so the rows carry class similarities beyond the argmax
    # (Hinton's range 2-4; the low end, as the rows are already averages over a class's images)
    collab_temperature: float = 2.0
    fedavg_rounds: int = 30
    local_epochs: int = 1  # FedAvg local epochs per round
    local_lr: float = 0.01  # FedAvg local SGD learning rate (constant; momentum as train)
    local_batch_size: int = 32  # FedAvg local mini-batch
    # FedAvg's local augmentation (train-dsa-mode applies): "none", chosen on a validation split
    # (docs/results/tune_fedavg_fmnist: 85.9% without against 83.9% with one-op DSA after 5 rounds)
    local_dsa_strategy: str = "none"
    # the weight-averaging systems beside FedAvg (Flower's own strategies, same local recipe): FedProx's
    # proximal term mu / 2 ||w - w_global||^2 in every local step (0 = FedAvg's plain loss), and
    # FedAvgM's server momentum on the averaged update (0 = FedAvg's plain mean; server step 1)
    proximal_mu: float = 0.0
    server_momentum: float = 0.0
    fraction: float = 1.0  # fraction of clients sampled per round
    min_clients: int = 2  # a round with fewer usable replies fails
    # what a distillation client sends: "images" (its own distilled summary, pooled by the server) or
    # "statistics" (per-class sums and counts of bank features, released once, added up by the server,
    # which distills the global summary itself; privacy.statistics)
    summary_kind: str = "images"
    # how the server turns the summed statistics into a global model: "synthesis" (images started from
    # noise, matched to the class means, then the global model trained on them) or "ridge" (clients also
    # release the second moments of their features; the server solves a ridge classifier on the bank's
    # feature map in closed form - with model "scatter", bank-size 1: ScatterNet + linear; no images)
    statistics_head: str = "synthesis"
    # the ridge penalty per record and feature, lambda * n / D (n the summed count); the server adds
    # the spectral size of the moments' noise on top (privacy.statistics.ridge_head)
    ridge_lambda: float = 1e-3
    summary_dtype: str = "float32"  # float32 | float16 | uint8 on the wire
    summary_resolution: int = 0  # side in pixels on the wire (0 = full)
    max_images: int = 2000  # per-client summary size cap (the server rejects larger)
    round_timeout: float = 3600.0  # seconds to wait for replies
    out_dir: str = "runs/flwr"  # where the ServerApp writes its report (flwr run)
    # audit canaries (privacy.audit.run_canaries): m held-out images, inverted and mislabelled, each
    # put into one simulated client's data with probability 1/2; 0 = none (the drivers set it)
    canaries: int = 0
    # send images that are (or start from, or paste in) private records: random_real and herding
    # summaries, init="real", residual mixing. False refuses such settings up front in every federated
    # front end (RunConfig.check_sends_no_record), and every client
    # drops any image of its summary within its near-copy threshold of one of its records before
    # sending (client.task.drop_near_copies); the random_real baseline sets it, to show what it leaks
    allow_near_copies: bool = False
    # secure aggregation (summary-kind = "statistics" only): the server receives only the sum of the
    # clients' releases, through Flower's SecAgg+ (privacy.secure_sum), and under DP each client adds
    # its share of one aggregate noise (distributed DP: sigma / sqrt(threshold))
    secure_aggregation: bool = False
    # c: every released entry must lie in [-c, c] (a client refuses a release beyond it); 2^14 holds
    # class sums and counts of up to 16,384 records, at a quantisation step of 2c / 2^22 = 0.0078
    secagg_clipping_range: float = 16384.0
    # the reconstruction threshold as a fraction of the sampled clients, in (0.5, 1): the fewest clients
    # a sum can finish with (the rest may drop out), and the count the DP noise is split over
    secagg_threshold: float = 0.6

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.fedavg_rounds < 0 or self.local_epochs < 1:
            raise ConfigError("rounds >= 1, fedavg-rounds >= 0 and local-epochs >= 1 are required")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if min(self.min_clients, self.max_images, self.local_batch_size) < 1:
            raise ConfigError("min-clients, max-images and local-batch-size must be >= 1")
        if self.proximal_mu < 0 or not 0 <= self.server_momentum < 1:
            raise ConfigError(f"proximal-mu must be >= 0 and server-momentum in [0, 1), got "
                              f"{self.proximal_mu}, {self.server_momentum}")
        if self.distill.dp.enabled and (self.proximal_mu or self.server_momentum):
            raise ConfigError("DP-FedAvg runs plain FedAvg; use proximal-mu=0 and server-momentum=0 "
                              "with dp=true")
        if self.local_lr <= 0 or self.perturb < 0:
            raise ConfigError(f"local-lr must be > 0 and perturb >= 0, got {self.local_lr}, {self.perturb}")
        if self.summary_dtype not in STORED_DTYPES:
            raise ConfigError(
                f"unknown summary-dtype {self.summary_dtype!r}; known: {', '.join(STORED_DTYPES)}"
            )
        if self.distill.dp.enabled and self.rounds > 1:
            raise ConfigError("DP distillation is one-shot: with dp=true use rounds=1 "
                              "(iterative rounds would need one accountant across rounds)")
        if self.normalisation not in NORMALISATIONS:
            raise ConfigError(f"unknown normalisation {self.normalisation!r}; "
                              f"known: {', '.join(NORMALISATIONS)}")
        if self.summary_kind not in SUMMARY_KINDS:
            raise ConfigError(f"unknown summary-kind {self.summary_kind!r}; "
                              f"known: {', '.join(SUMMARY_KINDS)}")
        if self.summary_kind == "statistics" and (self.rounds > 1 or self.summary_dtype != "float32"
                                                  or self.summary_resolution):
            raise ConfigError("summary-kind 'statistics' is one release of float32 sums: use rounds=1, "
                              "summary-dtype='float32' and summary-resolution=0 with it")
        if self.statistics_head not in STATISTICS_HEADS:
            raise ConfigError(f"unknown statistics-head {self.statistics_head!r}; "
                              f"known: {', '.join(STATISTICS_HEADS)}")
        if not (self.ridge_lambda > 0 and math.isfinite(self.ridge_lambda)):
            raise ConfigError(f"ridge-lambda must be a finite number > 0, got {self.ridge_lambda}")
        self._check_collaborative()
        self._check_secure_aggregation()
        if self.canaries < 0:
            raise ConfigError(f"canaries must be >= 0 (0 = no canary audit), got {self.canaries}")
        parse_strategy(self.local_dsa_strategy)
        if self.summary_resolution < 0:
            raise ConfigError(f"summary-resolution must be >= 0, got {self.summary_resolution}")

    def check_sends_no_record(self) -> None:
        """Raise :class:`ConfigError` when this run's clients would send (near-copies of) private records.

        Image summaries that are, start from or paste in private records need
        ``allow-near-copies = true``. Every federated front end calls this before anything runs
        (and a client before it distills); central runs (``python -m ddcore``, the methods benchmark)
        send nothing and do not.
        """
        if self.summary_kind != "images" or self.allow_near_copies:
            return
        d = self.distill
        why = None
        if d.method in REAL_RECORD_METHODS:
            why = f"method {d.method!r} sends real records"
        elif d.init == "real":
            why = "init='real' starts every image from a private record"
        elif d.residual_alpha < 1:
            why = "residual mixing (residual-alpha < 1) pastes real patches into the images"
        if why:
            raise ConfigError(f"{why}, so the server would receive near-copies of private data; use "
                              "init='noise' and a matching method, or set allow-near-copies=true to send "
                              "them knowingly")

    def _check_collaborative(self) -> None:
        """The collaborative settings' ranges, and what collaborative rounds cannot be combined with."""
        if self.collab_weight < 0 or self.collab_kd < 0 or not self.collab_temperature > 0:
            raise ConfigError(f"collab-weight and collab-kd must be >= 0 and collab-temperature > 0, got "
                              f"{self.collab_weight}, {self.collab_kd}, {self.collab_temperature}")
        if not self.collaborative:
            return
        if self.summary_kind != "images":
            raise ConfigError("collaborative=true pools image summaries: use summary-kind='images' with it "
                              "(statistics are one release) or collaborative=false")
        if self.distill.dp.enabled:
            raise ConfigError("collaborative=true sends class means and soft labels of private data without "
                              "noise: use dp=false with it, or collaborative=false for a DP run")
        if self.distill.method != "dm":
            raise ConfigError(f"collaborative=true refines summaries with DM's matching; use method='dm' "
                              f"with it, not {self.distill.method!r}")
        if self.distill.soft_labels != "none":
            raise ConfigError("collaborative=true brings its own soft labels (the clients', collab-kd): use "
                              "soft-labels='none' with it")

    def _check_secure_aggregation(self) -> None:
        """The SecAgg+ settings' ranges, and what secure aggregation needs (privacy.secure_sum)."""
        c = self.secagg_clipping_range
        if not (c > 0 and math.isfinite(c)):
            raise ConfigError(f"secagg-clipping-range must be a finite number > 0, got {c}")
        if not 0.5 < self.secagg_threshold < 1:
            raise ConfigError(f"secagg-threshold must be in (0.5, 1) (a fraction of the sampled clients, "
                              f"a strict majority), got {self.secagg_threshold}")
        needs = {  # what a secure sum needs -> whether this run has it
            "summary-kind='statistics' (images cannot be added up)": self.summary_kind == "statistics",
            f"num-clients >= 3 (with 2, each client learns the other's release from the sum), got "
            f"{self.partition.num_partitions}": self.partition.num_partitions >= 3,
        }
        missing = [need for need, met in needs.items() if not met]
        if self.secure_aggregation and missing:
            raise ConfigError(f"secure-aggregation=true needs {'; and '.join(missing)}")

    def local_training(self, epochs: int | None = None) -> TrainConfig:
        """FedAvg's local recipe: ``local_epochs`` (or ``epochs``) of SGD at ``local_lr``.

        Mini-batches of ``local_batch_size``, a constant step, no minimum step count, augmentation
        ``local_dsa_strategy``; momentum, weight decay and the DSA mode as the server's training.
        FedAvg clients, DP-FedAvg's DP-SGD and LiRA's shadow models all train by this recipe.
        """
        return replace(self.train, epochs=epochs or self.local_epochs, lr=self.local_lr,
                       batch_size=self.local_batch_size, min_steps=0, lr_decay=False,
                       dsa_strategy=self.local_dsa_strategy)


# How the flat kebab-case keys are derived from the dataclasses: every scalar field of every
# section is a key, named after the field (``_`` -> ``-``) with the section's prefix, except the
# names in ALIASES and the fields in FIXED. A new option needs only its field (and its line in
# pyproject.toml, which Flower reads and a test keeps equal to the defaults).
SECTIONS: dict[str, tuple[tuple[str, ...], str]] = {  # section -> (attribute path, key prefix)
    "run": ((), ""),
    "partition": (("partition",), ""),
    "distill": (("distill",), ""),
    "model": (("distill", "model"), "model-"),
    "dp": (("distill", "dp"), ""),
    "train": (("train",), "train-"),
}
ALIASES: dict[tuple[str, str], str] = {  # (section, field) -> key, where the derived name would mislead
    ("partition", "num_partitions"): "num-clients",
    ("partition", "scheme"): "partition",
    ("model", "name"): "model",
    ("dp", "enabled"): "dp",
}
# Fields that are not run-config keys: the distillation seed follows the run's ``seed``; the
# server's SGD momentum, weight decay and step decay are the recipe's constants.
FIXED: frozenset[tuple[str, str]] = frozenset({
    ("distill", "seed"), ("train", "momentum"), ("train", "weight_decay"), ("train", "lr_decay"),
})


def _key_table() -> dict[str, tuple[str, str]]:
    """flat key -> (section, field name), derived from the dataclasses' fields."""
    defaults = RunConfig()
    table: dict[str, tuple[str, str]] = {}
    for section, (path, prefix) in SECTIONS.items():
        obj = _at(defaults, path)
        for f in fields(obj):
            if (section, f.name) in FIXED or is_dataclass(getattr(obj, f.name)):
                continue
            key = ALIASES.get((section, f.name), prefix + f.name.replace("_", "-"))
            if key in table:
                raise ConfigError(f"run-config key {key!r} is derived twice; add an alias")
            table[key] = (section, f.name)
    return table


def _at(obj: object, path: tuple[str, ...]) -> object:
    for name in path:
        obj = getattr(obj, name)
    return obj


KEYS: dict[str, tuple[str, str]] = _key_table()  # flat key -> (section, field)


def keys(*sections: str) -> list[str]:
    """The flat keys of ``sections`` (all keys when none are named), in declaration order."""
    return [k for k, (s, _) in KEYS.items() if not sections or s in sections]


def to_flat(cfg: RunConfig) -> dict[str, Scalar]:
    """The flat kebab-case mapping of ``cfg`` (``lr-images`` 0 means the method's default)."""
    flat: dict[str, Scalar] = {}
    for key, (section, name) in KEYS.items():
        value = getattr(_at(cfg, SECTIONS[section][0]), name)
        flat[key] = 0.0 if value is None else value
    return flat


def from_flat(values: Mapping[str, Scalar], base: RunConfig | None = None) -> RunConfig:
    """Build a RunConfig from flat kebab-case ``values`` over ``base`` (default: the defaults).

    Unknown keys raise :class:`ConfigError` naming the known ones; values are converted to
    the type of the field they set, and every dataclass checks its own fields.
    """
    base = base or RunConfig()
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    changes: dict[tuple[str, ...], dict[str, object]] = {}
    for key, value in values.items():
        section, name = KEYS[key]
        path = SECTIONS[section][0]
        current = getattr(_at(base, path), name)
        changes.setdefault(path, {})[name] = _convert(key, value, current)
    if "seed" in values:  # one run seed: partitions and distillation both follow it
        changes.setdefault(("distill",), {})["seed"] = changes[("partition",)]["seed"]
    if changes.get(("distill",), {}).get("lr_images") == 0.0:
        changes[("distill",)]["lr_images"] = None
    return _rebuilt(base, changes, ())


def _rebuilt(obj, changes: Mapping[tuple[str, ...], Mapping[str, object]], path: tuple[str, ...]):
    """``obj`` with ``changes`` applied at every path, inner dataclasses first (so checks see them)."""
    own = dict(changes.get(path, {}))
    for f in fields(obj):
        inner = (*path, f.name)
        if any(p[: len(inner)] == inner for p in changes):
            own[f.name] = _rebuilt(getattr(obj, f.name), changes, inner)
    return replace(obj, **own) if own else obj


def distill_changes(values: Mapping[str, Scalar], base: DistillConfig) -> dict[str, object]:
    """The :class:`DistillConfig` fields that the flat distillation keys ``values`` set over ``base``.

    Keys of the other sections (partition, model, DP, server training, rounds) raise
    :class:`ConfigError` naming the accepted ones; values are converted as in :func:`from_flat`.
    """
    accepted = keys("distill")
    other = sorted(set(values) - set(accepted))
    if other:
        raise ConfigError(f"{', '.join(other)}: not distillation setting(s); accepted: {', '.join(accepted)}")
    distill = from_flat(values, base=RunConfig(distill=base)).distill
    return {KEYS[key][1]: getattr(distill, KEYS[key][1]) for key in values}


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _convert(key: str, value: Scalar, current: object) -> object:
    """Convert ``value`` to the type of ``current`` (the field's present value)."""
    kind = type(current) if current is not None else float
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in _BOOLS:
                    raise ValueError("expected true or false")
                return _BOOLS[value.lower()]
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{value} is not a whole number")
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad value {value!r} for {key}: {exc}") from None


def check_device(cfg: RunConfig) -> RunConfig:
    """Return ``cfg``, or raise if its device is no torch device or CUDA that torch does not see."""
    import torch

    try:
        torch.device(cfg.distill.device)
    except RuntimeError:
        raise ConfigError(f"device {cfg.distill.device!r} is not a torch device; use cpu or cuda") from None
    if cfg.distill.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return cfg


RUN_PRESETS: dict[str, RunConfig] = {
    # seconds: tests and smoke runs (tiny model, few steps)
    "quick": RunConfig(
        distill=DistillConfig(iterations=10, batch_real=64, outer_loop=2, model=ModelSpec(width=16),
                              syn_steps=2, dd_batch_real=8, mtt_syn_steps=2, mtt_experts=1,
                              mtt_expert_epochs=2, mtt_expert_span=1, mtt_max_start=1, init="noise"),
        train=TrainConfig(epochs=10, min_steps=20),
        fedavg_rounds=3,
    ),
    # minutes on 2 CPU cores: the README run (equal to the run-config defaults in pyproject.toml)
    "default": RunConfig(),
    # `python -m ddcore distill`'s own default: one distillation of the whole training set, so DM gets
    # the image updates a federated client's 200 would not give it - on full Fashion-MNIST at IPC 10,
    # 200 / 1,000 / 3,000 updates gave 78.1 / 79.5 / 81.2% (random real 75.7%; 3,000 took 6 min 25 s
    # on 2 cores; docs/bench.md). Slower methods (gm, dd, mtt, iadd) take longer per update: pass
    # --iterations for them
    # (real starts: a central distillation sends nothing, so near-copies leave no machine)
    "central": RunConfig(distill=DistillConfig(iterations=3000), allow_near_copies=True),
    # the privacy-utility sweep (simulations.privacy_utility): 18 systems plus their audits must fit
    # in an hour on 2 cores (GM took ~4.5 min per system at 100 updates), so 60 image updates and
    # 10 FedAvg rounds; 16 real images per class per step keeps the DP sampling rate q well below 1
    # on clients of a few hundred examples
    "privacy": RunConfig(
        normalisation="public",  # no statistic of the private data enters a DP run
        distill=DistillConfig(iterations=60, batch_real=16, init="noise"),
        fedavg_rounds=10,
    ),
    # the methods benchmark (simulations.benchmark_methods, which adds its per-method tuning): shorter
    # expert trajectories; every evaluated model is trained with the default recipe (400 steps at
    # least; until the instrument fix this preset cut it to 200)
    "benchmark": RunConfig(distill=DistillConfig(mtt_expert_epochs=4, mtt_max_start=2),
                           allow_near_copies=True),
    # the research bench: full Fashion-MNIST (Debian's dataset-fashion-mnist), otherwise the default
    # settings (10 clients, Dirichlet 0.5, seed 0) but 15 FedAvg rounds: a round of 60,000 records
    # takes ~31 s on 2 cores, and with 30 `simulations.compare --preset fmnist` took 26 min (FedAvg
    # 15.5 of them) against the 20 it should fit in; the sweep and the frontier set their own rounds
    "fmnist": RunConfig(dataset="fashion-mnist", normalisation="public", fedavg_rounds=15),
    # GPU-scale: ConvNet-128 and long optimisation, as in the papers
    "paper": RunConfig(
        distill=DistillConfig(iterations=20000, model=ModelSpec(width=128), init="noise"),
        train=TrainConfig(epochs=1000, min_steps=0),
        fedavg_rounds=200,
    ),
}


def run_splits(cfg: RunConfig) -> DataSplits:
    """The run's train/test splits: ``cfg.dataset`` from ``cfg.data_dir``, split with the run's seed
    and normalised as ``cfg.normalisation`` says (server, clients and drivers all load this way)."""
    from ddcore.data import load_dataset

    return load_dataset(cfg.dataset, data_dir=cfg.data_dir or None, seed=cfg.partition.seed,
                        public_normalisation=cfg.normalisation == "public")


def run_preset(name: str) -> RunConfig:
    """The run preset called ``name`` (one of :data:`RUN_PRESETS`)."""
    if name not in RUN_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(RUN_PRESETS)}")
    return RUN_PRESETS[name]
