"""A fault-injecting ClientApp: the real client, except that chosen nodes crash, stall or lie.

A node's fault comes from its node config (``--node-config "... fault='nan'"`` on a real
SuperNode) or from the ``plan`` given to :func:`make_app`, keyed by ``(server_round,
partition_id)`` (simulation, where node configs only carry the partition). Every fault except
``crash`` runs the real handler first and then tampers with its reply, so the server sees a
summary that is wrong in exactly one way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client import protocol
from client.app import distill_summary, fedavg_update
from client.task import client_id

Arrays = dict[str, np.ndarray]
TIMEOUT_MARGIN = 3.0  # a "timeout" node replies this many seconds after the round timeout


def _nan(a: Arrays, _cfg: Mapping) -> None:
    a["images"] = a["images"].copy()
    a["images"][0, 0, 0, 0] = np.nan


def _inf(a: Arrays, _cfg: Mapping) -> None:
    a["images"] = a["images"].copy()
    a["images"][-1, 0, -1, -1] = np.inf


def _shape(a: Arrays, _cfg: Mapping) -> None:
    n, c, h, w = a["images"].shape
    a["images"] = a["images"].reshape(n, c * h, w)  # 3-D instead of (n, C, H, W)


def _channels(a: Arrays, _cfg: Mapping) -> None:
    a["images"] = np.repeat(a["images"], 3, axis=1)


def _dtype(a: Arrays, _cfg: Mapping) -> None:
    a["images"] = a["images"].astype(np.float64)


def _label_range(a: Arrays, cfg: Mapping) -> None:
    a["labels"] = a["labels"] + int(cfg["num-classes"])


def _soft_labels(a: Arrays, cfg: Mapping) -> None:
    a["labels"] = np.full((len(a["labels"]), int(cfg["num-classes"])), 0.5, np.float32)  # rows sum to K/2


def _too_many(a: Arrays, cfg: Mapping) -> None:
    reps = int(cfg["max-images"]) // len(a["images"]) + 1
    a["images"] = np.tile(a["images"], (reps, 1, 1, 1))
    a["labels"] = np.tile(a["labels"], reps)


def _count_mismatch(a: Arrays, _cfg: Mapping) -> None:
    a["labels"] = a["labels"][:-1]


def _far_range(a: Arrays, _cfg: Mapping) -> None:
    a["images"] = a["images"] * 1e4


def _empty(a: Arrays, _cfg: Mapping) -> None:
    a["images"], a["labels"] = a["images"][:0], a["labels"][:0]


# fault -> how it tampers with the arrays of an honest summary
TAMPER: dict[str, Callable[[Arrays, Mapping], None]] = {
    "nan": _nan, "inf": _inf, "shape": _shape, "channels": _channels, "dtype": _dtype,
    "label-range": _label_range, "soft-labels": _soft_labels, "too-many": _too_many,
    "count-mismatch": _count_mismatch, "far-range": _far_range, "empty": _empty,
}
FAULTS = ("crash", "timeout", "bad-meta", *TAMPER)


def tampered(content: RecordDict, fault: str, cfg: Mapping) -> RecordDict:
    """``content`` (an honest reply) with its summary or metadata spoiled by ``fault``."""
    arrays = protocol.content_arrays(content[protocol.SUMMARY])
    meta = dict(content[protocol.META])
    if fault == "bad-meta":
        meta["height"] = "eight"  # not a number: decoding must not crash the server
    else:
        TAMPER[fault](arrays, cfg)
    return RecordDict({
        protocol.SUMMARY: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
        protocol.META: ConfigRecord(meta),
        protocol.METRICS: content[protocol.METRICS],
    })


def make_app(plan: Mapping[tuple[int, int], str] | None = None) -> ClientApp:
    """A ClientApp whose node ``pid`` misbehaves as ``plan[(round, pid)]`` (or its node config) says."""
    plan = dict(plan or {})
    unknown = sorted(set(plan.values()) - set(FAULTS))
    if unknown:
        raise ValueError(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    app = ClientApp()
    app.train()(fedavg_update)  # FedAvg rounds stay honest (a test warms the nodes up with one)

    @app.train("distill")
    def distill(message: Message, context: Context) -> Message:
        cfg = dict(message.content[protocol.CONFIG])
        server_round = int(cfg.get("server-round", 1))
        planned = plan.get((server_round, client_id(context.node_config)), "")
        fault = str(context.node_config.get("fault", planned))
        if fault == "crash":
            raise RuntimeError("injected crash")
        reply = distill_summary(message, context)
        if fault == "timeout":
            time.sleep(float(cfg["round-timeout"]) + TIMEOUT_MARGIN)
        elif fault:
            return Message(content=tampered(reply.content, fault, cfg), reply_to=message)
        return reply

    return app


app = make_app()  # for a SuperNode: faults come from --node-config "fault='...'"
