"""Run one system (federated distillation or FedAvg) on a Grid and collect its results."""

from __future__ import annotations

import time
from dataclasses import dataclass
from logging import WARNING
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import log
from flwr.serverapp import Grid

from client import protocol
from ddcore.data import Dataset
from ddcore.devicedata import DataSpec
from ddcore.errors import SummaryError
from ddcore.models import build_model
from ddcore.runconfig import RunConfig, to_flat
from ddcore.summary import Summary
from privacy.received import Received
from server.ledger import Ledger
from server.strategy import (
    CollaborativeStrategy,
    DistillStrategy,
    StatisticsStrategy,
    evaluate_fn,
    global_seed,
    read_metrics,
    sample_clients,
    weight_strategy,
)
from server.validation import SummaryLimits

if TYPE_CHECKING:  # the secure sum (and privacy, Opacus) loads only for secure-aggregation runs
    from privacy.class_release import ClassStatistics
    from server.secure import SecureSum


def received_summaries(received: list[tuple[int, int, object]]) -> Received:
    """The server's view of a distillation system: every accepted image or release, by client id."""
    out = Received()
    for _, cid, payload in received:
        if hasattr(payload, "sums"):  # a statistics release (privacy.class_release.ClassStatistics)
            out.releases[cid] = payload  # one release per client (statistics are one-shot)
            continue
        summary = getattr(payload, "summary", payload)  # a collaborative reply carries its summary
        out.images.setdefault(cid, []).append(summary.images)
    return out


@dataclass
class SystemResult:
    """What one system achieved: accuracy per round, bytes, clients, wall time."""

    name: str
    ledger: Ledger
    wall_seconds: float
    rounds: int
    pooled: Summary | None = None  # the distillation systems' final pool
    final_state: dict[str, torch.Tensor] | None = None  # the global model after the last good round
    received: Received | None = None  # what the server received from the clients (server-view attacks)

    def to_dict(self) -> dict:
        accuracies = [h["accuracy"] for h in self.ledger.history]
        return {
            "final_accuracy": accuracies[-1] if accuracies else None,
            "best_accuracy": max(accuracies) if accuracies else None,
            "rounds": self.rounds,
            "bytes_up": self.ledger.bytes_up(),
            "bytes_down": self.ledger.bytes_down(),
            "wall_seconds": self.wall_seconds,
            "pooled_images": len(self.pooled) if self.pooled is not None else None,
            "history": self.ledger.history,
            "clients": self.ledger.clients(),
            "round_notes": {str(k): v for k, v in self.ledger.round_notes.items()},
            "privacy": self.privacy(),
        }

    def privacy(self) -> dict | None:
        """The DP budget spent: per client its last report, and the worst (largest) epsilon."""
        last: dict[int, dict] = {}
        for e in self.ledger.entries:
            if e.privacy:
                last[e.client_id] = e.privacy
        if not last:
            return None
        return {"epsilon_spent_max": max(p["epsilon"] for p in last.values()),
                "per_client": {str(cid): p for cid, p in sorted(last.items())}}


def round_config(cfg: RunConfig, data: DataSpec) -> ConfigRecord:
    """The ConfigRecord every client request carries: the flat run-config plus the run's data spec.

    The spec (class count, image shape, mean and std) lets a deployed node check its own data
    against the run and normalise it like the server's test set.
    """
    return ConfigRecord({**to_flat(cfg), **protocol.spec_config(data)})


def run_distillation(grid: Grid, cfg: RunConfig, test: Dataset, name: str = "distill") -> SystemResult:
    """Federated distillation for ``cfg.rounds`` rounds.

    ``summary-kind = "images"``: clients distill with ``cfg.distill.method`` and the server pools
    their summaries (with ``collaborative = true``, class means down and soft labels up from round
    2 on: :class:`CollaborativeStrategy`); ``"statistics"``: clients release per-class statistics
    once and the server adds them and distills the global summary (:class:`StatisticsStrategy`), or
    with ``secure-aggregation = true`` sees only their sum (:func:`run_secure_statistics`).
    """
    if cfg.summary_kind == "statistics" and cfg.secure_aggregation:
        return run_secure_statistics(grid, cfg, test, name)
    ledger = Ledger()
    limits = SummaryLimits.for_data(test.image_shape, test.num_classes, cfg.max_images, test.pixel_bounds())
    strategy: DistillStrategy
    if cfg.summary_kind == "statistics":
        strategy = StatisticsStrategy(cfg, limits, ledger, DataSpec.of(test))
    elif cfg.collaborative:
        strategy = CollaborativeStrategy(cfg, limits, ledger)
    else:
        strategy = DistillStrategy(cfg, limits, ledger)
    start = time.perf_counter()
    result = strategy.start(grid, ArrayRecord(), num_rounds=cfg.rounds, timeout=cfg.round_timeout,
                            train_config=round_config(cfg, DataSpec.of(test)),
                            evaluate_fn=evaluate_fn(cfg, test, ledger))
    pooled = strategy.pooled() if strategy.pool else None
    return SystemResult(name, ledger, time.perf_counter() - start, cfg.rounds, pooled, _state(result.arrays),
                        received_summaries(strategy.received))


# --- secure aggregation (secure-aggregation = true): the statistics' sum through SecAgg+ ---

def run_secure_statistics(grid: Grid, cfg: RunConfig, test: Dataset, name: str = "distill") -> SystemResult:
    """``summary-kind = "statistics"`` through SecAgg+: the server sees only the sum of the releases.

    The sampled clients' releases are summed by :func:`server.secure.secure_total` (under DP each
    carries its share of one aggregate noise: ``client.app._secure_statistics``); the sum is checked
    like a release (:func:`privacy.statistics.read_statistics`) and distilled into the global
    summary as :meth:`StatisticsStrategy.pooled` does. No single release reaches the server, so
    ``received`` is empty. One-shot; a sum of fewer than ``min-clients`` fails the round.
    """
    from privacy.secure_sum import Quantisation, SecureSumError, protocol_threshold
    from privacy.statistics import global_summary
    from server.secure import secure_total

    ledger, spec = Ledger(), DataSpec.of(test)
    limits = SummaryLimits.for_data(test.image_shape, test.num_classes, cfg.max_images, test.pixel_bounds())
    strategy = StatisticsStrategy(cfg, limits, ledger, spec)  # the bank, its feature size, the training
    start = time.perf_counter()
    nodes = sample_clients(grid, cfg, 1)
    try:
        result = secure_total(grid, nodes, round_config(cfg, spec),
                              threshold=protocol_threshold(len(nodes), cfg.secagg_threshold),
                              quantisation=Quantisation(cfg.secagg_clipping_range), timeout=cfg.round_timeout,
                              ledger=ledger)
    except SecureSumError as exc:  # e.g. fewer than 3 nodes connected: no secure sum to be had
        return _refused(name, ledger, start, exc)
    for node in nodes:
        entry = ledger.find(1, node)
        if node in result.metrics:
            read_metrics(entry, result.metrics[node], "distill-seconds")
            entry.status = "accepted"
        else:
            entry.status, entry.reason = "failed", result.failures.get(node, "not in the sum")
    try:
        total = _secure_statistics_total(result, cfg, strategy)
    except ValueError as exc:  # SummaryError, or a sum that does not even decode
        return _refused(name, ledger, start, exc)
    if strategy.ridge:  # the head solved from the sum: no images
        from privacy.statistics import ridge_model

        pooled = None
        model = ridge_model(total, strategy.factory, cfg.distill, cfg.ridge_lambda)
    else:
        pooled = global_summary(total, strategy.bank, cfg.distill, spec,
                                seed=cfg.distill.seed * 7_919 + len(result.finished))
        pooled = pooled.with_meta(clients=len(result.finished))
        model = strategy.train_global(pooled, seed=global_seed(cfg, 1))
    evaluate_fn(cfg, test, ledger)(1, ArrayRecord(model.state_dict()))
    return SystemResult(name, ledger, time.perf_counter() - start, 1, pooled, model.state_dict(),
                        Received(total=total))  # the sum alone: no single release


def _refused(name: str, ledger: Ledger, start: float, exc: Exception) -> SystemResult:
    """The result of a secure statistics round that gave no usable sum (the reason in the ledger)."""
    ledger.round_notes[1] = f"round 1 failed: {exc}"
    for entry in ledger.entries:
        if entry.status == "accepted":
            entry.reason = "in the sum, but the sum was refused"
    log(WARNING, "secure statistics refused: %s", exc)
    return SystemResult(name, ledger, time.perf_counter() - start, 1, received=Received())


def _secure_statistics_total(result: SecureSum, cfg: RunConfig,
                             strategy: StatisticsStrategy) -> ClassStatistics:
    """The checked :class:`~privacy.class_release.ClassStatistics` of a secure sum, or SummaryError.

    The clear metas of the clients in the sum must agree on the kind and the bank (one odd client
    spoils the sum, and it cannot be taken out); under DP each share must be calibrated for the
    protocol's threshold. The sum's meta carries the noise multiplier the sum really has
    (``sqrt(m)`` shares), then :func:`privacy.statistics.read_statistics` checks it against the run.
    """
    from privacy.statistics import BANK_KEYS, read_statistics

    if result.total is None:
        raise SummaryError(result.note)
    if len(result.finished) < cfg.min_clients:
        raise SummaryError(f"{len(result.finished)} clients in the sum, fewer than "
                           f"min-clients={cfg.min_clients}")
    metas = [result.metrics[node] for node in result.finished]
    kinds = {tuple(m.get(k) for k in ("kind", *BANK_KEYS)) for m in metas}
    if len(kinds) != 1:
        raise SummaryError(f"the clients in the sum used different kinds or banks: {sorted(map(str, kinds))}")
    meta = dict(metas[0])
    if cfg.distill.dp.enabled:
        if any(not m.get("dp") or m.get("secagg-threshold") != result.threshold for m in metas):
            raise SummaryError(f"a share in the sum was not calibrated for the threshold {result.threshold}")
        share = float(meta.get("share-noise-multiplier", 0.0))  # 0 at target-epsilon = inf
        meta["noise-multiplier"] = share * len(result.finished) ** 0.5
    return read_statistics(result.total, meta, cfg.distill, num_classes=strategy.spec.num_classes,
                           dim=strategy.dim, moments=strategy.ridge)


def initial_model(cfg: RunConfig, test: Dataset) -> torch.nn.Module:
    """FedAvg's initial global model, seeded with the run's partition seed (on the CPU)."""
    return build_model(cfg.distill.model, test.image_shape, test.num_classes,
                       torch.Generator().manual_seed(cfg.partition.seed), "cpu")


def run_fedavg(grid: Grid, cfg: RunConfig, test: Dataset, name: str = "fedavg") -> SystemResult:
    """Flower's FedAvg (FedProx with ``proximal-mu`` > 0, FedAvgM with ``server-momentum`` > 0)
    with the same model, partitions and evaluation."""
    ledger = Ledger()
    model = initial_model(cfg, test)
    strategy = weight_strategy(cfg, ledger)
    start = time.perf_counter()
    result = strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=cfg.fedavg_rounds,
                            timeout=cfg.round_timeout, train_config=round_config(cfg, DataSpec.of(test)),
                            evaluate_fn=evaluate_fn(cfg, test, ledger))
    return SystemResult(name, ledger, time.perf_counter() - start, cfg.fedavg_rounds,
                        final_state=_state(result.arrays), received=Received(updates=strategy.kept_updates))


def _state(arrays: ArrayRecord) -> dict[str, torch.Tensor] | None:
    return arrays.to_torch_state_dict() if len(arrays) else None
