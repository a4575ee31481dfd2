"""The client's work without Flower: find its data, distill it, or train a FedAvg step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from ddcore.data import Dataset
from ddcore.devicedata import DataSpec, load_device_data
from ddcore.errors import ConfigError
from ddcore.frozen import FeatureCache, trained_part
from ddcore.methods import distill
from ddcore.methods.collab import ClassSoftLabels, ClassTargets, class_soft_labels, distill_toward
from ddcore.models import ModelFactory, build_model, model_factory
from ddcore.partition import partition_indices
from ddcore.profile import Measurement, measure
from ddcore.runconfig import RunConfig, run_splits
from ddcore.summary import Summary
from ddcore.train import train_model

if TYPE_CHECKING:  # privacy (and Opacus, ~2 s to import) loads only for DP runs
    from privacy.accounting import Accountant, DPPlan
    from privacy.class_release import ClassStatistics

NodeConfig = Mapping[str, str | int | float | bool]


def client_id(node_config: NodeConfig) -> int:
    """The node's partition id (simulation and demos) or ``client-id`` (deployments)."""
    for key in ("partition-id", "client-id"):
        if key in node_config:
            return int(node_config[key])
    return 0


def client_seed(cfg: RunConfig, cid: int, server_round: int) -> int:
    """The seed of client ``cid``'s work in ``server_round``: distinct per client and round."""
    return cfg.distill.seed * 100_003 + cid * 101 + server_round


def run_spec(cfg: RunConfig) -> DataSpec:
    """What the run's images look like, from the run's dataset loaded here (server side, tests)."""
    splits = run_splits(cfg)
    return DataSpec.of(splits.train)


def local_data(cfg: RunConfig, node_config: NodeConfig, spec: DataSpec | None = None) -> Dataset:
    """This node's private training data.

    A deployed node names its own file with ``data-path`` (an ``.npz`` or ImageFolder): all of
    it is training data, checked against ``spec`` (the run's image shape, classes, mean and std,
    sent by the server; loaded here from the run's dataset when not given) and normalised with
    the run's mean and std. A simulated or demo node takes partition ``partition-id`` of
    ``num-partitions`` of the run's dataset, partitioned exactly as for every other method,
    plus its share of the run's audit canaries when ``cfg.canaries`` > 0
    (:func:`privacy.audit.run_canaries`; a deployed node's own data gets none).
    """
    if "data-path" in node_config:
        return load_device_data(str(node_config["data-path"]), spec or run_spec(cfg))
    if "partition-id" not in node_config:
        raise ConfigError("node config needs data-path=<file> or partition-id=<i> num-partitions=<n>")
    pid = int(node_config["partition-id"])
    num = int(node_config.get("num-partitions", cfg.partition.num_partitions))
    if not 0 <= pid < num:
        raise ConfigError(f"partition-id {pid} is outside 0..{num - 1}")
    splits = run_splits(cfg)
    parts = partition_indices(splits.train.y.numpy(), replace(cfg.partition, num_partitions=num))
    data = splits.train.subset(parts[pid])
    if cfg.canaries:
        from privacy.attacks.canary import insert_canaries
        from privacy.audit import run_canaries

        data = insert_canaries(data, run_canaries(cfg, splits), pid, num)
    return data


def perturbed_factory(base: ModelFactory, state: dict[str, torch.Tensor], radius: float) -> ModelFactory:
    """Models sampled around a global model: ``w + radius * |w|-scaled Gaussian noise`` (FedDM)."""

    def make(generator: torch.Generator) -> torch.nn.Module:
        model = base(generator)
        with torch.no_grad():
            for name, param in model.named_parameters():
                w = state[name].to(param.device, param.dtype)
                noise = torch.randn(w.shape, generator=generator).to(w.device)
                param.copy_(w + radius * w.abs().mean() * noise)
        return model

    return make


def distill_local(
    data: Dataset,
    cfg: RunConfig,
    num_classes: int,
    seed: int,
    global_state: dict[str, torch.Tensor] | None = None,
    previous: Summary | None = None,
) -> tuple[Summary, Measurement]:
    """Distill ``data`` as ``cfg`` says; with a global model, match models sampled around it.

    Settings that would send private records are refused (:meth:`RunConfig.check_sends_no_record`)
    and, unless ``allow-near-copies``, images within the client's near-copy threshold of one of its
    records are dropped before anything is sent (:func:`drop_near_copies`).
    """
    cfg.check_sends_no_record()
    if cfg.distill.dp.enabled:
        import privacy.methods  # noqa: F401  (registers dp-gm and dp-dm)
    data = Dataset(data.x, data.y, num_classes, data.mean, data.std, data.name)
    factory = model_factory(cfg.distill.model, data.image_shape, num_classes, cfg.distill.device)
    if global_state is not None:
        factory = perturbed_factory(factory, global_state, cfg.perturb)
    with measure(cfg.distill.device) as m:
        summary = distill(data, factory, replace(cfg.distill, seed=seed), init=previous)
        if not cfg.allow_near_copies:
            summary = drop_near_copies(summary, data)
    return summary, m


def drop_near_copies(summary: Summary, data: Dataset) -> Summary:
    """``summary`` without the images within ``data``'s near-copy threshold of one of its records.

    The client's last guard before anything is sent (``allow-near-copies = false``): the threshold
    is the 1st percentile of its own records' distances to their nearest other record
    (:func:`privacy.attacks.memorisation.near_copy_threshold`; a client's few records sit farther
    apart than a whole dataset's, so it is stricter than the server-side audit's). The meta says
    how many were dropped (``near-copies-dropped``). A factorised summary cannot lose single
    images: one within the threshold raises instead.
    """
    from privacy.attacks.memorisation import near_copy_threshold, pixels_of
    from privacy.attacks.nearest import nearest_l2

    copies = torch.zeros(len(summary), dtype=torch.bool)
    if len(data) >= 2 and len(summary):
        d, _ = nearest_l2(summary.images, data.x, transform=pixels_of(data))
        copies = d <= near_copy_threshold(data)
    dropped = {"near-copies-dropped": int(copies.sum())}
    if not bool(copies.any()):
        return summary.with_meta(**dropped)
    if summary.factors is not None:
        raise ConfigError(f"{dropped['near-copies-dropped']} decoded images of the factorised summary are "
                          "near-copies of private records; distill from noise or set allow-near-copies=true")
    keep = (~copies).nonzero().flatten()
    return Summary(summary.images[keep], summary.labels[keep], summary.lrs, summary.meta).with_meta(**dropped)


def collaborate_local(
    data: Dataset,
    cfg: RunConfig,
    num_classes: int,
    seed: int,
    global_state: dict[str, torch.Tensor],
    targets: ClassTargets,
    previous: Summary | None = None,
) -> tuple[Summary, ClassSoftLabels, Measurement]:
    """A collaborative round (``collaborative = true``, round >= 2): refine, then label the real data.

    The summary (``previous``, or a fresh start) is refined with DM under fresh random networks
    (not sampled around the global model, as iterative rounds do) plus ``collab-weight`` times the
    match of its class means under the frozen global model to ``targets``
    (:func:`ddcore.methods.collab.distill_toward`); the same global model gives the per-class
    soft labels of the real data at ``collab-temperature``.
    """
    data = Dataset(data.x, data.y, num_classes, data.mean, data.std, data.name)
    factory = model_factory(cfg.distill.model, data.image_shape, num_classes, cfg.distill.device)
    anchor = factory(torch.Generator().manual_seed(seed))
    anchor.load_state_dict(global_state)
    with measure(cfg.distill.device) as m:
        summary = distill_toward(data, factory, replace(cfg.distill, seed=seed), anchor=anchor,
                                 targets=targets, weight=cfg.collab_weight, init=previous)
        soft = class_soft_labels(anchor, data, cfg.collab_temperature)
    return summary, soft, m


def release_statistics(
    data: Dataset,
    cfg: RunConfig,
    num_classes: int,
    seed: int,
    exact: ClassStatistics | None = None,
) -> tuple[dict[str, np.ndarray], dict, Measurement, ClassStatistics]:
    """This client's one statistics release (``summary-kind = "statistics"``), as arrays and meta.

    The bank is the run's (``bank-size``, ``bank-seed``, ``bank-augment`` and the distillation
    model), so the server rebuilds it; under DP (``dp = true``) the noise is calibrated for the
    run's per-client budget (:func:`privacy.statistics.release`). ``exact``: the noise-free
    sums and counts (and second moments) returned by an earlier call with the same data and bank
    (they are returned last, for the caller to keep on the device; never sent). With
    ``statistics-head = "ridge"`` the release carries the features' second moments too.
    """
    from privacy.mechanisms import noise_generator
    from privacy.statistics import bank_of, public_sums, release, to_arrays

    data = Dataset(data.x, data.y, num_classes, data.mean, data.std, data.name)
    factory = model_factory(cfg.distill.model, data.image_shape, num_classes, cfg.distill.device)
    with measure(cfg.distill.device) as m:
        bank = bank_of(factory, cfg.distill, data.image_shape)
        moments = cfg.statistics_head == "ridge"
        if exact is None or (moments and exact.moments is None):
            exact = public_sums(data, bank, moments)
        noise = noise_generator(cfg.distill.dp, seed)  # secret unless secret-noise = false
        stats, meta = release(data, bank, cfg.distill, noise, exact, moments)
    return to_arrays(stats), meta, m, exact


def fedavg_local(
    data: Dataset,
    cfg: RunConfig,
    num_classes: int,
    state: dict[str, torch.Tensor],
    seed: int,
    features: FeatureCache | None = None,
) -> tuple[dict[str, torch.Tensor], float, Measurement]:
    """One FedAvg client update: the local recipe (``RunConfig.local_training``) from the global weights.

    With ``proximal-mu`` > 0 (FedProx) every step's loss adds ``mu / 2 ||w - w_global||^2``.
    A model that trains only its head (model ``scatter``, no local augmentation) trains the head
    on the records' features, embedded once per call or kept in ``features`` (a cache the caller
    keeps across rounds; :mod:`ddcore.frozen`): the same weights as training the whole model.
    """
    generator = torch.Generator().manual_seed(seed)
    model = build_model(cfg.distill.model, data.image_shape, num_classes, generator, cfg.distill.device)
    model.load_state_dict(state)
    recipe = cfg.local_training()
    losses: list[float] = []
    with measure(cfg.distill.device) as m:
        part, x = trained_part(model, data.x, recipe.dsa_strategy, features)
        train_model(part, x, data.y, recipe, generator,
                    progress=lambda step, total, metrics: losses.append(metrics["loss"]),
                    proximal_mu=cfg.proximal_mu)
    mean_loss = sum(losses) / max(len(losses), 1)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, mean_loss, m


def dp_fedavg_local(
    data: Dataset,
    cfg: RunConfig,
    num_classes: int,
    state: dict[str, torch.Tensor],
    seed: int,
    accountant: Accountant,
    features: FeatureCache | None = None,
) -> tuple[dict[str, torch.Tensor], float, Measurement, DPPlan]:
    """One DP-FedAvg client update: local DP-SGD (Opacus per-sample gradients) from the global weights.

    The local recipe is plain FedAvg's (learning rate, momentum, weight decay, augmentation);
    only the batches (Poisson), the per-example clipping and the noise differ.

    sigma is calibrated for ``cfg.fedavg_rounds`` rounds of this client's local steps, and
    ``accountant`` (kept by the caller across rounds) records every step; the epsilon it
    reports covers the whole run so far. A model that trains only its head runs DP-SGD on the
    head over the records' features (:func:`privacy.dpsgd.local_dpsgd`; ``features`` as in
    :func:`fedavg_local`).
    """
    from privacy.dpsgd import fedavg_dpsgd_plan, local_dpsgd, steps_per_round

    plan = fedavg_dpsgd_plan(cfg, len(data))
    generator = torch.Generator().manual_seed(seed)
    model = build_model(cfg.distill.model, data.image_shape, num_classes, generator, cfg.distill.device)
    model.load_state_dict(state)
    with measure(cfg.distill.device) as m:
        loss = local_dpsgd(model, data, cfg, plan, accountant, steps=steps_per_round(cfg, len(data)),
                           generator=generator, features=features)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, loss, m, plan
