"""The Flower ClientApp: thin glue between messages and :mod:`client.task`."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import protocol
from client.secure import secure_route
from client.task import (
    client_id,
    client_seed,
    collaborate_local,
    distill_local,
    dp_fedavg_local,
    fedavg_local,
    local_data,
    release_statistics,
)
from ddcore.data import Dataset
from ddcore.frozen import FeatureCache
from ddcore.profile import Measurement
from ddcore.runconfig import RunConfig, from_flat
from ddcore.summary import Summary

app = ClientApp()

_PREVIOUS = "previous-summary"  # node state: this client's last summary (iterative rounds)
_DATA, _DATA_META = "local-data", "local-data-meta"  # node state: this node's data, loaded once
_SUMS, _SUMS_META = "exact-sums", "exact-sums-meta"  # node state: this node's noise-free class sums
_ACCOUNTANT = "dp-accountant"  # node state: DP-FedAvg accountant, spanning every round of the run


def _data_key(cfg: RunConfig, context: Context) -> str:
    """The settings that define this node's data (what node-state caches of it are keyed by)."""
    return repr((cfg.dataset, cfg.data_dir, cfg.normalisation, cfg.partition, cfg.canaries,
                 sorted(context.node_config.items())))


def _with_privacy(metrics: dict, record: dict, num_examples: int) -> dict:
    """``metrics`` plus the privacy record of a DP reply, or plus ``num-examples`` without DP.

    A DP reply leaves out the exact number of records: under add/remove adjacency it is private.
    """
    if not record.get("dp"):
        return {**metrics, "num-examples": num_examples}
    from privacy.record import PRIVACY_KEYS

    return {**metrics, **{k: record[k] for k in PRIVACY_KEYS}}


def _local_data(cfg: RunConfig, context: Context, config: Mapping) -> Dataset:
    """This node's data, kept in the node's ``context.state`` after the first message.

    Loading and partitioning take seconds; FedAvg sends a message per round, so the node
    keeps its partition (keyed by the settings that define it) instead of redoing that work.
    """
    key = _data_key(cfg, context)
    if _DATA in context.state and context.state[_DATA_META].get("key") == key:
        arrays, meta = context.state[_DATA], context.state[_DATA_META]
        x, y = (torch.from_numpy(arrays[k].numpy()) for k in ("x", "y"))
        return Dataset(x, y, int(meta["num-classes"]),
                       tuple(meta["mean"]), tuple(meta["std"]), str(meta["name"]))
    data = local_data(cfg, context.node_config, protocol.read_spec(config))
    context.state[_DATA] = ArrayRecord({"x": Array(data.x.numpy()), "y": Array(data.y.numpy())})
    context.state[_DATA_META] = ConfigRecord({"key": key, "num-classes": data.num_classes,
                                              "mean": list(data.mean), "std": list(data.std),
                                              "name": data.name})
    return data


def _read_config(message: Message) -> tuple[RunConfig, int, int]:
    """The run config, number of classes and round the server sent."""
    return _read_flat(message.content[protocol.CONFIG])


def _read_flat(config: Mapping) -> tuple[RunConfig, int, int]:
    """The run config, number of classes and round of a round config (the ``CONFIG`` record)."""
    flat = {k: v for k, v in config.items() if k not in protocol.SPEC_KEYS}
    num_classes = int(flat.pop(protocol.NUM_CLASSES))
    server_round = int(flat.pop(protocol.SERVER_ROUND, 1))
    return from_flat(flat), num_classes, server_round


@app.train("distill")
def distill_summary(message: Message, context: Context) -> Message:
    """Distill this node's data and reply with the (compactly encoded) summary."""
    cfg, num_classes, server_round = _read_config(message)
    cid = client_id(context.node_config)
    data = _local_data(cfg, context, message.content[protocol.CONFIG])
    global_state, previous = None, None
    if protocol.ARRAYS in message.content:  # iterative round: refine around the global model
        global_state = message.content[protocol.ARRAYS].to_torch_state_dict()
        if _PREVIOUS in context.state:
            prev = context.state[_PREVIOUS]
            previous = Summary.from_arrays(protocol.content_arrays(prev), {})
    seed = client_seed(cfg, cid, server_round)
    if cfg.summary_kind == "statistics":
        return _statistics_reply(message, context, data, cfg, num_classes, seed, cid)
    soft = None
    if cfg.collaborative and global_state is not None:  # collaborative round: match the global class means
        targets = protocol.read_targets(message.content[protocol.GLOBAL_STATS])
        summary, soft, m = collaborate_local(data, cfg, num_classes, seed, global_state, targets, previous)
    else:
        summary, m = distill_local(data, cfg, num_classes, seed, global_state, previous)
    summary = summary.with_meta(**{"client-id": cid, "server-round": server_round})
    if cfg.rounds > 1:
        context.state[_PREVIOUS] = protocol.summary_content(summary, "float32", None, {})[protocol.SUMMARY]
    metrics = _with_privacy({"client-id": cid, "distill-seconds": m.seconds, "peak-rss-mb": m.peak_rss_mb,
                             "images": len(summary),
                             "near-copies-dropped": int(summary.meta.get("near-copies-dropped", 0))},
                            summary.meta, len(data))
    resolution = cfg.summary_resolution or None
    content = protocol.summary_content(summary, cfg.summary_dtype, resolution, metrics)
    if soft is not None:
        content[protocol.SOFT_LABELS] = protocol.soft_labels_record(soft)
    return Message(content=content, reply_to=message)


def _statistics_reply(message: Message, context: Context, data: Dataset, cfg: RunConfig, num_classes: int,
                      seed: int, cid: int) -> Message:
    """The reply of ``summary-kind = "statistics"``: per-class sums and counts, released once.

    Under DP the exact number of records is not sent (add/remove adjacency makes it private;
    the release's noisy counts stand in for it). The node keeps its exact (noise-free) sums in
    its own state, keyed by its data and the bank, so a later request of the same run (another
    system of a sweep, at another epsilon) adds fresh noise to them instead of embedding every
    record again; they never leave the node.
    """
    key = repr((_data_key(cfg, context), cfg.distill.model, cfg.distill.bank_size, cfg.distill.bank_seed,
                cfg.distill.bank_augment, num_classes))
    exact = None
    if _SUMS in context.state and context.state[_SUMS_META].get("key") == key:
        from privacy.class_release import ClassStatistics

        kept = {k: torch.from_numpy(v.numpy()) for k, v in context.state[_SUMS].items()}
        exact = ClassStatistics(kept["sums"], kept["counts"], kept.get("moments"))
    arrays, meta, m, exact = release_statistics(data, cfg, num_classes, seed, exact)
    kept = {"sums": exact.sums, "counts": exact.counts, "moments": exact.moments}
    context.state[_SUMS] = ArrayRecord({k: Array(v.numpy()) for k, v in kept.items() if v is not None})
    context.state[_SUMS_META] = ConfigRecord({"key": key})
    metrics = _with_privacy({"client-id": cid, "distill-seconds": m.seconds, "peak-rss-mb": m.peak_rss_mb,
                             "images": 0}, meta, len(data))
    content = RecordDict({protocol.SUMMARY: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          protocol.META: ConfigRecord({**meta, "client-id": cid}),
                          protocol.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=message)


def dp_fedavg_round(data: Dataset, cfg: RunConfig, num_classes: int, state: dict[str, torch.Tensor],
                    seed: int, context: Context, features: FeatureCache | None = None,
                    ) -> tuple[dict[str, torch.Tensor], float, Measurement, dict]:
    """One DP-FedAvg round whose accountant lives in ``context.state`` across the whole run.

    The state is keyed by the settings that define the budget; the reply's metrics carry the
    epsilon spent so far (every local step of every round), not one round's.
    """
    from privacy.accounting import Accountant  # Opacus loads only for DP runs
    from privacy.record import privacy_record

    accountant = Accountant(cfg.distill.dp.accountant)
    key = repr((cfg.partition, cfg.distill.dp, cfg.fedavg_rounds, cfg.local_epochs, cfg.local_batch_size,
                sorted(context.node_config.items())))
    if _ACCOUNTANT in context.state and context.state[_ACCOUNTANT].get("key") == key:
        accountant.load_state_dict(dict(context.state[_ACCOUNTANT]))
    new_state, loss, m, plan = dp_fedavg_local(data, cfg, num_classes, state, seed, accountant, features)
    context.state[_ACCOUNTANT] = ConfigRecord({**accountant.state_dict(), "key": key})
    return new_state, loss, m, privacy_record(plan, accountant)


# --- secure aggregation (secure-aggregation = true): SecAgg+'s stages arrive as plain "train" messages,
# so client.secure.secure_route on the default train handler takes them (FedAvg's pass through) ---

def _secure_statistics(config: Mapping, context: Context,
                       threshold: int) -> tuple[dict[str, np.ndarray], dict]:
    """This node's share of a secure sum of statistics releases, and its metrics (sent in the clear).

    The release of :func:`_statistics_reply` with the DP noise cut to this client's share of one
    aggregate noise for a sum of at least ``threshold`` clients (:func:`privacy.secure_sum.share_config`),
    drawn from an OS-seeded generator: the run's seeds are public, and a server that could redraw
    the shares' noise could take it off the sum. The privacy record sent is the sum's
    (:func:`privacy.secure_sum.aggregate_meta`). The exact sums are not cached here (each request
    embeds the data once).
    """
    from privacy.secure_sum import aggregate_meta, share_config

    cfg, num_classes, _ = _read_flat(config)
    cid = client_id(context.node_config)
    data = _local_data(cfg, context, config)
    share = replace(cfg, distill=share_config(cfg.distill, threshold))
    arrays, meta, m, _ = release_statistics(data, share, num_classes, secrets.randbits(63))
    meta = aggregate_meta(meta, cfg.distill, threshold)
    metrics = _with_privacy({"client-id": cid, "distill-seconds": m.seconds, "peak-rss-mb": m.peak_rss_mb,
                             "images": 0}, meta, len(data))
    return arrays, {**meta, **metrics}


@app.train(mods=[secure_route(_secure_statistics)])
def fedavg_update(message: Message, context: Context) -> Message:
    """One FedAvg round: train the received global model on local data, return the weights."""
    cfg, num_classes, server_round = _read_config(message)
    cid = client_id(context.node_config)
    data = _local_data(cfg, context, message.content[protocol.CONFIG])
    state = message.content[protocol.ARRAYS].to_torch_state_dict()
    seed = client_seed(cfg, cid, server_round)
    features = _kept_features(context)
    if cfg.distill.dp.enabled:
        new_state, loss, m, record = dp_fedavg_round(data, cfg, num_classes, state, seed, context, features)
    else:
        (new_state, loss, m), record = fedavg_local(data, cfg, num_classes, state, seed, features), {}
    _keep_features(context, features)
    metrics = fedavg_reply_metrics(cid, len(data), loss, m, record)
    content = RecordDict({protocol.ARRAYS: ArrayRecord(new_state), protocol.METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=message)


def fedavg_reply_metrics(cid: int, num_examples: int, loss: float, m: Measurement,
                         record: dict) -> dict[str, int | float]:
    """The metrics of a FedAvg reply; a DP reply (``record`` non-empty) carries no training loss.

    The loss is computed from the private records with no noise, so a DP reply leaves it out.
    A DP reply keeps ``num-examples``, which FedAvg's example-weighted mean needs: under DP-SGD
    as Opacus and the literature account it, the record count is public - the privacy record
    already carries the Poisson rate ``sample-rate = local-batch-size / num-examples`` - so the
    count reveals nothing the accounting does not assume known. (DP image summaries have no such
    rate and leave the count out, see ``_with_privacy``.)
    """
    metrics: dict[str, int | float] = {"num-examples": num_examples, "client-id": cid,
                                       "train-seconds": m.seconds, "peak-rss-mb": m.peak_rss_mb}
    return {**metrics, **record} if record else {**metrics, "train-loss": loss}


# --- the features of a head-only model (model "scatter"): a FedAvg node embeds its records once per run,
# keyed by a digest of its records and of the frozen weights every global model carries (ddcore.frozen) ---
_FEATURES, _FEATURES_META = "head-features", "head-features-meta"


def _kept_features(context: Context) -> FeatureCache:
    """A feature cache holding what this node kept from an earlier round (empty at first)."""
    cache = FeatureCache()
    if _FEATURES in context.state:
        features = torch.from_numpy(context.state[_FEATURES]["features"].numpy())
        cache.put(str(context.state[_FEATURES_META]["key"]), features)
    return cache


def _keep_features(context: Context, cache: FeatureCache) -> None:
    """Keep the cache's features in the node's state when they are new (a model without a frozen
    front leaves the cache empty and the state untouched)."""
    latest = cache.latest()
    if latest is None or (_FEATURES in context.state and context.state[_FEATURES_META]["key"] == latest[0]):
        return
    context.state[_FEATURES] = ArrayRecord({"features": Array(latest[1].numpy())})
    context.state[_FEATURES_META] = ConfigRecord({"key": latest[0]})
