"""Strategies: federated distillation (collect, validate, pool, train), its collaborative rounds;
counting FedAvg, FedProx, FedAvgM."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedProx, Strategy

from client import protocol
from ddcore.data import Dataset
from ddcore.devicedata import DataSpec
from ddcore.errors import ConfigError, SummaryError
from ddcore.methods.collab import ClassSoftLabels, ClassTargets, class_means, combine
from ddcore.models import build_model, model_factory
from ddcore.runconfig import RunConfig
from ddcore.summary import Summary, concat
from ddcore.train import SoftTargets, evaluate, train_model
from privacy.record import PRIVACY_KEYS
from server.ledger import ClientRound, Ledger
from server.validation import SummaryLimits, check_soft_labels, validate

if TYPE_CHECKING:  # privacy (Opacus) loads only for statistics runs
    from privacy.class_release import ClassStatistics


def sample_clients(grid: Grid, cfg: RunConfig, server_round: int) -> list[int]:
    """A seeded sample of ``cfg.fraction`` of the federation's ``num-clients`` nodes.

    Waits (up to ``round-timeout``) until ``num-clients`` nodes are connected; after that,
    it proceeds with the nodes present if there are at least ``min-clients``.
    """
    expected = cfg.partition.num_partitions
    deadline = time.monotonic() + cfg.round_timeout
    while len(nodes := sorted(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        log(INFO, "waiting for nodes: %d of %d connected", len(nodes), expected)
        time.sleep(1.0)
    size = min(len(nodes), max(math.ceil(len(nodes) * cfg.fraction), cfg.min_clients))
    return sorted(random.Random(cfg.partition.seed * 7919 + server_round).sample(nodes, size))


def reply_entry(ledger: Ledger, server_round: int, reply: Message) -> ClientRound | None:
    """The ledger entry of ``reply`` with its bytes counted, or None (marked failed) on a client error."""
    entry = ledger.find(server_round, reply.metadata.src_node_id)
    if reply.has_error():
        entry.status, entry.reason = "failed", f"client error: {reply.error.reason}"
        log(WARNING, "client node %d failed: %s", entry.node_id, reply.error.reason)
        return None
    entry.bytes_up = protocol.content_bytes(reply.content)
    entry.array_bytes_up = protocol.array_bytes(reply.content)
    return entry


def reply_order(reply: Message) -> tuple[int, int, int]:
    """Sort key of replies: by the client id they report (node ids are random per run), errors last.

    Replies arrive in completion order; aggregating them in a fixed order makes FedAvg's
    weighted mean, and so its accuracy, reproducible for a given seed.
    """
    if reply.has_error() or protocol.METRICS not in reply.content:
        return (1, 0, reply.metadata.src_node_id)
    return (0, int(reply.content[protocol.METRICS].get("client-id", -1)), reply.metadata.src_node_id)


def read_metrics(entry: ClientRound, metrics: Mapping, seconds_key: str) -> None:
    """Copy the client's self-reported id, examples, work time and peak memory into ``entry``."""
    entry.client_id = int(metrics.get("client-id", -1))
    entry.examples = int(metrics.get("num-examples", 0))
    entry.seconds = float(metrics.get(seconds_key, 0.0))
    entry.peak_mb = float(metrics.get("peak-rss-mb", 0.0))
    entry.privacy = {k: float(metrics[k]) for k in PRIVACY_KEYS if k in metrics}


class DistillStrategy(Strategy):
    """Clients send summaries; the server validates and pools them and trains the global model.

    Round 1 sends only the configuration (one-shot distillation from scratch). Later rounds
    (``cfg.rounds > 1``) also send the global weights: clients refine their previous summary
    against models sampled around them (FedDM-style), and each client's newest accepted
    summary replaces its previous one in the pool.
    """

    def __init__(self, cfg: RunConfig, limits: SummaryLimits, ledger: Ledger) -> None:
        self.cfg = cfg
        self.limits = limits
        self.ledger = ledger
        self.pool: dict[int, Summary] = {}  # node id -> newest accepted summary
        # everything the server accepted, every round: (round, client id, summary or release); the
        # server-view attacks (privacy.attacks.server_view) read what the server saw from it
        self.received: list[tuple[int, int, object]] = []

    def summary(self) -> None:
        log(INFO, "\t├── method %s, ipc %d, rounds %d", self.cfg.distill.method,
            self.cfg.distill.ipc, self.cfg.rounds)
        log(INFO, "\t└── summaries on the wire as %s", self.cfg.summary_dtype)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Ask the sampled clients for a summary (with the global weights after round 1)."""
        nodes = sample_clients(grid, self.cfg, server_round)
        records = self.down_records(server_round, arrays, config)
        messages = []
        for node in nodes:
            content = RecordDict(records)
            self.ledger.sent(server_round, node, protocol.content_bytes(content))
            messages.append(Message(content=content, message_type=protocol.DISTILL, dst_node_id=node))
        log(INFO, "configure_train: asked %d clients for summaries", len(nodes))
        return messages

    def down_records(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> dict:
        """The records every request of ``server_round`` carries: the config, and the global weights
        after round 1 (computed once per round, then copied into each message)."""
        records: dict = {protocol.CONFIG: ConfigRecord({**config, protocol.SERVER_ROUND: server_round})}
        if server_round > 1 and len(arrays) > 0:
            records[protocol.ARRAYS] = arrays
        return records

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, pool the accepted summaries and train the global model on them."""
        fresh: dict[int, Summary] = {}  # pooled only if the round succeeds
        for reply in replies:
            entry = reply_entry(self.ledger, server_round, reply)
            if entry is None:
                continue
            try:
                summary = self._check(reply.content)
                read_metrics(entry, reply.content[protocol.METRICS], "distill-seconds")
            except (ValueError, TypeError) as exc:  # SummaryError, or values that do not even decode
                entry.status, entry.reason = "rejected", str(exc)
                log(WARNING, "rejected summary of node %d: %s", entry.node_id, exc)
                continue
            entry.images, entry.status = self.images_sent(summary), "accepted"
            fresh[entry.node_id] = summary
            self.received.append((server_round, entry.client_id, summary))
        accepted = len(fresh)
        self.ledger.mark_silent(server_round)
        if accepted < self.cfg.min_clients:
            note = (f"round {server_round} failed: {accepted} usable summaries, "
                    f"fewer than min-clients={self.cfg.min_clients}; previous results kept")
            self.ledger.round_notes[server_round] = note
            for entry in self.ledger.entries:
                if entry.round == server_round and entry.node_id in fresh:
                    entry.reason = "valid, but not pooled: the round failed"
            log(WARNING, note)
            return None, None
        self.pool.update(fresh)
        start = time.perf_counter()
        pooled = self.pooled()
        pool_seconds = time.perf_counter() - start
        model = self.train_global(pooled, seed=global_seed(self.cfg, server_round))
        log(INFO, "aggregate_train: %d summaries accepted, %d pooled images", accepted, len(pooled))
        metrics = MetricRecord({"pooled-images": len(pooled), "accepted": accepted,
                                "pool-seconds": pool_seconds})
        return ArrayRecord(model.state_dict()), metrics

    @staticmethod
    def images_sent(summary: Summary) -> int:
        """Images a client's accepted reply carried (the ledger's ``images``)."""
        return len(summary)

    def _check(self, content: RecordDict):
        for key in (protocol.SUMMARY, protocol.META, protocol.METRICS):
            if key not in content:
                raise SummaryError(f"reply lacks the {key!r} record")
        return self._decode(protocol.content_arrays(content[protocol.SUMMARY]), dict(content[protocol.META]))

    def _decode(self, arrays: dict, meta: dict) -> Summary:
        """The checked summary a reply's arrays and meta carry (:func:`server.validation.validate`)."""
        return validate(arrays, meta, self.limits)

    def summaries(self) -> dict[int, Summary]:
        """node id -> the newest accepted summary of that client."""
        return self.pool

    def pooled(self) -> Summary:
        """All accepted summaries pooled into one training set, in client-id order (:func:`client_order`)."""
        summaries = self.summaries()
        return concat([summaries[node] for node in client_order(summaries)], self.limits.num_classes)

    def train_global(self, pooled: Summary, seed: int) -> torch.nn.Module:
        """Train a fresh global model on the pooled summaries."""
        return train_global(self.cfg, pooled, self.limits.image_shape, self.limits.num_classes, seed)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation is centralised, on the server's test split

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


@dataclass(frozen=True)
class Contribution:
    """An accepted collaborative reply: the client's summary and, from round 2 on, its soft labels."""

    summary: Summary
    soft: ClassSoftLabels | None


class CollaborativeStrategy(DistillStrategy):
    """Collaborative rounds (FedAF-style, ``collaborative = true``): class means down, soft labels up.

    Round 1 is one-shot pooling. From round 2 on every request also carries the global summary's
    per-class mean embeddings under the global model (:func:`ddcore.methods.collab.class_means`; no
    image goes down); clients refine their summary toward them and reply with per-class soft labels
    of their real data, checked like the summary (:func:`server.validation.check_soft_labels`: one
    bad array rejects the whole reply). The fresh global model trains on the pool with the
    count-weighted soft labels of every pooled client's newest reply as a distillation term
    (``collab-kd``, ``collab-temperature``).
    """

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└── collaborative: matching weight %g, KD weight %g at T = %g", self.cfg.collab_weight,
            self.cfg.collab_kd, self.cfg.collab_temperature)

    def down_records(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> dict:
        """The base records, plus the global summary's class means whenever the global weights go down."""
        records = super().down_records(server_round, arrays, config)
        if protocol.ARRAYS in records and self.pool:
            records[protocol.GLOBAL_STATS] = protocol.targets_record(self.targets(arrays))
        return records

    def targets(self, arrays: ArrayRecord) -> ClassTargets:
        """Per-class mean embeddings of the pooled summary under the global model ``arrays``."""
        model = build_model(self.cfg.distill.model, self.limits.image_shape, self.limits.num_classes,
                            torch.Generator().manual_seed(0), self.cfg.distill.device)
        model.load_state_dict(arrays.to_torch_state_dict())
        pooled = self.pooled()
        return class_means(model, pooled.images, pooled.hard_labels(), self.limits.num_classes)

    def _check(self, content: RecordDict) -> Contribution:  # type: ignore[override]
        summary = super()._check(content)
        if protocol.SOFT_LABELS not in content:
            return Contribution(summary, None)
        examples = int(content[protocol.METRICS].get("num-examples", 0))
        arrays = protocol.content_arrays(content[protocol.SOFT_LABELS])
        return Contribution(summary, check_soft_labels(arrays, self.limits.num_classes, examples))

    @staticmethod
    def images_sent(contribution: Contribution) -> int:  # type: ignore[override]
        return len(contribution.summary)

    def summaries(self) -> dict[int, Summary]:
        """node id -> the newest accepted summary of that client (its soft labels set aside)."""
        return {node: c.summary for node, c in self.pool.items()}  # type: ignore[attr-defined]

    def train_global(self, pooled: Summary, seed: int) -> torch.nn.Module:
        """A fresh global model trained on the pool, with the pooled clients' soft labels as KD targets."""
        order = client_order(self.summaries())
        parts = [soft for node in order if (soft := self.pool[node].soft) is not None]  # type: ignore[attr-defined]
        targets = None
        if parts and self.cfg.collab_kd > 0:
            soft = combine(parts, self.limits.num_classes)
            targets = SoftTargets(soft.per_example(pooled.hard_labels()), self.cfg.collab_kd,
                                  self.cfg.collab_temperature)
            log(INFO, "server KD on %d pooled images from the soft labels of %d clients",
                int((targets.probs.sum(1) > 0).sum()), len(parts))
        return train_global(self.cfg, pooled, self.limits.image_shape, self.limits.num_classes, seed, targets)


class StatisticsStrategy(DistillStrategy):
    """Clients release per-class statistics once; the server adds them and distills the global summary.

    ``summary-kind = "statistics"`` (:mod:`privacy.statistics`). Every reply is checked against
    the run's bank and label space; the accepted releases are summed (in float64, so the order
    replies arrive in does not move the result), and the server optimises ``ipc`` images per
    class against the summed class means in the public normalisation, then maps them into the
    run's (``spec``) and trains the global model on them like any pooled summary. One-shot.
    """

    def __init__(self, cfg: RunConfig, limits: SummaryLimits, ledger: Ledger, spec: DataSpec) -> None:
        super().__init__(cfg, limits, ledger)
        from privacy.statistics import (
            bank_of,  # privacy (Opacus) loads only for statistics runs
            feature_dim,
        )

        self.spec = spec
        self.factory = model_factory(cfg.distill.model, spec.image_shape, spec.num_classes,
                                     cfg.distill.device)
        self.bank = bank_of(self.factory, cfg.distill, spec.image_shape)
        self.dim = feature_dim(self.bank, spec.image_shape)
        self._global: tuple[tuple[int, ...], Summary] | None = None

    def summary(self) -> None:
        log(INFO, "\t├── per-class statistics under a bank of %d networks (D = %d), summed by the server",
            self.cfg.distill.bank_size, self.dim)
        if self.ridge:
            log(INFO, "\t└── with their second moments: the server solves a ridge head (lambda %g)",
                self.cfg.ridge_lambda)
        else:
            log(INFO, "\t└── the server distills %d images per class", self.cfg.distill.ipc)

    @property
    def ridge(self) -> bool:
        """The closed-form ridge head on the bank's features instead of synthesised images."""
        return self.cfg.statistics_head == "ridge"

    @staticmethod
    def images_sent(summary: object) -> int:
        return 0

    def _decode(self, arrays: dict, meta: dict):  # type: ignore[override]
        from privacy.statistics import read_statistics

        return read_statistics(arrays, meta, self.cfg.distill, num_classes=self.spec.num_classes,
                               dim=self.dim, moments=self.ridge)

    def total(self) -> ClassStatistics:
        """The sum of every accepted release, in node order (float64 addition: order-free)."""
        from privacy.class_release import ClassStatistics

        return ClassStatistics.total([self.pool[node] for node in sorted(self.pool)])

    def pooled(self) -> Summary:
        """The global summary distilled from the sum of every accepted release (computed once per pool)."""
        from privacy.statistics import bank_meta, global_summary

        key = tuple(sorted(self.pool))
        if self._global is not None and self._global[0] == key:
            return self._global[1]
        if self.ridge:  # no images: the head is solved from the statistics (train_global)
            spec = self.spec
            empty = Summary(torch.empty((0, *spec.image_shape)), torch.empty(0, dtype=torch.long))
            summary = empty.with_meta(method="statistics-ridge", clients=len(key),
                                      **bank_meta(self.cfg.distill))
            self._global = (key, summary)
            return summary
        total = self.total()
        summary = global_summary(total, self.bank, self.cfg.distill, self.spec,
                                 seed=self.cfg.distill.seed * 7_919 + len(key)).with_meta(clients=len(key))
        self._global = (key, summary)
        return summary

    def train_global(self, pooled: Summary, seed: int) -> torch.nn.Module:
        """The ridge model of the summed statistics (``statistics-head = "ridge"``), or a model
        trained on the synthesised images."""
        if not self.ridge:
            return super().train_global(pooled, seed)
        from privacy.statistics import ridge_model

        return ridge_model(self.total(), self.factory, self.cfg.distill, self.cfg.ridge_lambda)


def client_order(pool: Mapping[int, Summary]) -> list[int]:
    """The nodes of ``pool`` in the order of the client ids their summaries carry.

    Node ids are random per run; pooling in client-id order keeps the server's training (and so
    its accuracy) reproducible for a given seed.
    """
    return sorted(pool, key=lambda node: (str(pool[node].meta.get("client-id", "")), node))


def global_seed(cfg: RunConfig, server_round: int) -> int:
    """The seed of the global model the server trains on the pool in ``server_round``."""
    return cfg.partition.seed * 1009 + server_round


def train_global(cfg: RunConfig, pooled: Summary, image_shape: tuple[int, ...], num_classes: int,
                 seed: int, soft_targets: SoftTargets | None = None) -> torch.nn.Module:
    """A fresh global model (initialised from ``seed``) trained on ``pooled`` with ``cfg.train``
    (and a distillation term toward ``soft_targets``, rows aligned with ``pooled``)."""
    generator = torch.Generator().manual_seed(seed)
    model = build_model(cfg.distill.model, image_shape, num_classes, generator, cfg.distill.device)
    return train_model(model, pooled.images, pooled.labels, cfg.train, generator, soft_targets=soft_targets)


class Counting:
    """Mixin for Flower's weight-averaging strategies: record the bytes of every message and reply.

    Placed before the Flower class (``class CountingFedProx(Counting, FedProx)``), it leaves the
    strategy's own logic untouched; replies are aggregated in client-id order.
    """

    ledger: Ledger
    # what the server kept of the clients' updates for the server-view attacks: (round, the global
    # weights sent, {client id: weights sent back}) of the first and the latest round
    kept_updates: list[tuple[int, dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        for message in messages:
            self.ledger.sent(server_round, message.metadata.dst_node_id,
                             protocol.content_bytes(message.content))
        self.kept_updates = [u for u in self.kept_updates if u[0] == 1]
        self.kept_updates.append((server_round, arrays.to_torch_state_dict(), {}))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = sorted(replies, key=reply_order)  # a weighted mean's float sum depends on the order
        latest = self.kept_updates[-1] if self.kept_updates else None
        kept = latest[2] if latest is not None and latest[0] == server_round else {}
        for reply in replies:
            entry = reply_entry(self.ledger, server_round, reply)
            if entry is not None:
                read_metrics(entry, reply.content.get(protocol.METRICS, {}), "train-seconds")
                entry.status = "accepted"
                if protocol.ARRAYS in reply.content:
                    kept[entry.client_id] = reply.content[protocol.ARRAYS].to_torch_state_dict()
        self.ledger.mark_silent(server_round)
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]


class CountingFedAvg(Counting, FedAvg):
    """Flower's FedAvg, unchanged except that it records the bytes of every message and reply."""


class CountingFedProx(Counting, FedProx):
    """Flower's FedProx (it sends ``proximal-mu``; clients add the proximal term), bytes counted."""


class CountingFedAvgM(Counting, FedAvgM):
    """Flower's FedAvgM (server momentum on the averaged update, server step 1), bytes counted."""


def weight_strategy(cfg: RunConfig, ledger: Ledger) -> Counting:
    """The counting weight-averaging strategy ``cfg`` names: FedProx when ``proximal-mu`` > 0,
    FedAvgM when ``server-momentum`` > 0, else FedAvg; the same sampling and node minimums."""
    common = {"fraction_train": cfg.fraction, "fraction_evaluate": 0.0, "min_train_nodes": cfg.min_clients,
              "min_available_nodes": max(cfg.min_clients, cfg.partition.num_partitions)}
    if cfg.proximal_mu > 0 and cfg.server_momentum > 0:
        raise ConfigError("proximal-mu (FedProx) and server-momentum (FedAvgM) name two different "
                          "strategies; give a weight-averaging run one of them")
    if cfg.proximal_mu > 0:
        strategy: Counting = CountingFedProx(**common, proximal_mu=cfg.proximal_mu)
    elif cfg.server_momentum > 0:
        strategy = CountingFedAvgM(**common, server_learning_rate=1.0, server_momentum=cfg.server_momentum)
    else:
        strategy = CountingFedAvg(**common)
    strategy.ledger, strategy.kept_updates = ledger, []
    return strategy


def evaluate_fn(
    cfg: RunConfig, test: Dataset, ledger: Ledger
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """Centralised evaluation on the server's test split, recorded in ``ledger``."""

    def fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 or len(arrays) == 0:
            return None
        model = build_model(cfg.distill.model, test.image_shape, test.num_classes,
                            torch.Generator().manual_seed(0), cfg.distill.device)
        model.load_state_dict(arrays.to_torch_state_dict())
        result = evaluate(model, test)
        ledger.record_accuracy(server_round, result["accuracy"], result["loss"])
        return MetricRecord(result)

    return fn
