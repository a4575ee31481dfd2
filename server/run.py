"""Run one system (federated distillation or FedAvg) on a Grid and collect its results."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from client import protocol
from ddcore.data import Dataset
from ddcore.devicedata import DataSpec
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
    weight_strategy,
)
from server.validation import SummaryLimits


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
    once and the server adds them and distills the global summary (:class:`StatisticsStrategy`).
    """
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
