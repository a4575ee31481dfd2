"""The server side of the secure sum: Flower's SecAgg+ workflow run on a Message-API grid.

:func:`secure_total` drives ``SecAggPlusWorkflow`` directly (no ``DefaultWorkflow``: there is no
model to initialise or evaluate) with a ``LegacyContext`` whose legacy FedAvg strategy is
overridden twice: ``configure_fit`` hands the workflow the chosen nodes and the config, and
``aggregate_fit`` takes the unmasked vector - SecAgg+'s mean of the clients' vectors, every client
weighing 1 - instead of averaging it again. The mean times the number of vectors in it is their
sum (:mod:`privacy.secure_sum`). Every message of the four stages passes through
:class:`WatchedGrid`, which counts its bytes and notes which node failed, where and why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, log, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server import ClientManager, LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from client import protocol
from privacy.secure_sum import MAX_WEIGHT, SPEC_KEY, FlatSpec, Quantisation, SecureSumError, unflatten
from server.ledger import Ledger

Scalar = str | int | float | bool


@dataclass(frozen=True)
class SecureSum:
    """What a secure sum gave the server: the sum, who is in it, who is not and why."""

    total: dict[str, np.ndarray] | None  # the summed arrays (float64); None: no sum (see ``note``)
    finished: tuple[int, ...]  # node ids whose vectors are in the sum
    failures: dict[int, str]  # node id -> why it is not in the sum (refusal, error, silence)
    metrics: dict[int, dict[str, Scalar]]  # node id -> the metrics its reply carried in the clear
    threshold: int  # the reconstruction threshold: no sum holds fewer vectors
    error_bound: float  # per-entry quantisation error bound of ``total`` (privacy.secure_sum)
    note: str = ""


class WatchedGrid(Grid):
    """A grid that passes every message on and notes, per node, its bytes and its first failure."""

    def __init__(self, grid: Grid, ledger: Ledger | None = None, server_round: int = 1) -> None:
        self._grid, self._ledger, self._round = grid, ledger, server_round
        self.failures: dict[int, str] = {}

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stages = {m.metadata.dst_node_id: _stage(m.content) for m in messages}
        for m in messages:
            self._count(m.metadata.dst_node_id, down=protocol.content_bytes(m.content))
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.failures.setdefault(node, f"stage {stages.get(node)}: {reply.error.reason}")
                continue
            configs = reply.content.get(RECORD_KEY_CONFIGS, {})
            masked = configs.get(Key.MASKED_PARAMETERS, [])
            self._count(node, up=protocol.content_bytes(reply.content), arrays=sum(len(b) for b in masked))
        for node in stages.keys() - {r.metadata.src_node_id for r in replies}:
            self.failures.setdefault(node, f"stage {stages[node]}: no reply (dropped out or timed out)")
        return replies

    def _count(self, node: int, down: int = 0, up: int = 0, arrays: int = 0) -> None:
        if self._ledger is None:
            return
        entry = self._ledger.find(self._round, node)
        entry.bytes_down += down
        entry.bytes_up += up
        entry.array_bytes_up += arrays  # the masked vector (int64 .npy bytes)


def _stage(content: RecordDict) -> str:
    return str(content[RECORD_KEY_CONFIGS].get(Key.STAGE, "?")) if RECORD_KEY_CONFIGS in content else "?"


class SumOf(FedAvg):
    """Flower's legacy FedAvg, told which nodes to ask and keeping SecAgg+'s result as it comes."""

    def __init__(self, proxies: list[ClientProxy], config: Mapping) -> None:
        super().__init__(fraction_evaluate=0.0, min_fit_clients=len(proxies),
                         min_available_clients=len(proxies))
        self.proxies, self.config = proxies, dict(config)
        self.results: list[tuple[ClientProxy, FitRes]] = []  # one per vector in the sum
        self.failures: list = []

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        ins = FitIns(parameters, self.config)
        return [(proxy, ins) for proxy in self.proxies]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results, self.failures = list(results), list(failures)
        return None, {}


def secure_total(grid: Grid, node_ids: Iterable[int], config: Mapping, *, threshold: int,
                 quantisation: Quantisation | None = None, timeout: float | None = None,
                 ledger: Ledger | None = None, server_round: int = 1) -> SecureSum:
    """The sum over ``node_ids`` of the arrays each client releases, the server seeing only the sum.

    Parameters
    ----------
    grid
        The ServerApp's grid.
    node_ids
        The clients asked (at least 3); every one shares its keys with every other.
    config
        What every client's release handler receives (the round config).
    threshold
        SecAgg+'s reconstruction threshold (2 <= t < clients, e.g.
        :func:`privacy.secure_sum.protocol_threshold`): the sum finishes with at least ``t`` clients
        or not at all.
    quantisation
        SecAgg+'s clipping range, quantisation range and modulus (:class:`Quantisation` defaults).
    timeout
        Seconds each stage waits for replies (None: until every node answers).
    ledger, server_round
        Where the bytes of every message of every stage are counted (optional).

    Returns
    -------
    SecureSum
        ``total`` None when the protocol halted or the sum is unusable (mixed layouts or weights,
        non-finite values); ``note`` says why, ``failures`` says who is missing and why.
    """
    nodes = sorted(node_ids)
    q = quantisation or Quantisation()
    q.check_clients(len(nodes))
    if not 2 <= threshold < len(nodes):
        raise SecureSumError(f"a SecAgg+ threshold needs 2 <= t < {len(nodes)} clients, got {threshold}")
    watched = WatchedGrid(grid, ledger, server_round)
    proxies = [GridClientProxy(n, grid, grid.run.run_id) for n in nodes]
    strategy = SumOf(proxies, config)
    context = _legacy_context(grid, strategy, server_round)
    for proxy in proxies:
        context.client_manager.register(proxy)  # only for the workflow's "sampled n (out of n)" log
    workflow = SecAggPlusWorkflow(len(nodes), threshold, max_weight=MAX_WEIGHT,
                                  clipping_range=q.clipping_range, quantization_range=q.quantization_range,
                                  modulus_range=q.modulus_range, timeout=timeout)
    workflow(watched, context)
    return _result(strategy, watched.failures, nodes, threshold, q)


def _legacy_context(grid: Grid, strategy: SumOf, server_round: int) -> LegacyContext:
    """A LegacyContext holding ``strategy``, no parameters and the round, as SecAgg+ reads them."""
    base = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, config=ServerConfig(num_rounds=1), strategy=strategy)
    context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    return context


def _result(strategy: SumOf, seen: dict[int, str], nodes: list[int], threshold: int,
            q: Quantisation) -> SecureSum:
    """The checked sum of SecAgg+'s result (see :func:`secure_total`); every gap logged with its reason."""
    results = strategy.results
    finished = tuple(sorted(proxy.node_id for proxy, _ in results))
    metrics = {proxy.node_id: dict(fitres.metrics) for proxy, fitres in results}
    failures = {n: seen.get(n, "left out: SecAgg+ halted before its vector was summed")
                for n in nodes if n not in finished}
    for node, reason in sorted(failures.items()):
        log(WARNING, "secure sum: node %d is not in the sum: %s", node, reason)
    for node in sorted(set(finished) & set(seen)):  # e.g. no key shares in the last stage
        log(INFO, "secure sum: node %d is in the sum but failed afterwards: %s", node, seen[node])
    note, total = "", None
    if not results:
        note = f"SecAgg+ halted: fewer than the threshold of {threshold} clients took part in every stage"
    elif len(finished) < threshold:
        note = f"only {len(finished)} vectors in the sum, fewer than the threshold {threshold}"
    elif {fitres.num_examples for _, fitres in results} != {int(MAX_WEIGHT)}:
        note = "a client reported a weight other than 1: SecAgg+'s mean is weighted and the sum is lost"
    elif len(specs := {str(m.get(SPEC_KEY)) for m in metrics.values()}) != 1:
        note = f"the clients' vectors have different layouts: {sorted(specs)}"
    else:
        mean = parameters_to_ndarrays(results[0][1].parameters)[0]
        total = unflatten(mean * len(results), FlatSpec.from_json(specs.pop()))
        if not all(np.isfinite(v).all() for v in total.values()):
            note, total = "the sum is not finite", None
    if total is None:
        log(WARNING, "secure sum refused: %s", note)
    else:
        log(INFO, "secure sum of %d clients (threshold %d): quantisation error below %.3g per entry",
            len(finished), threshold, q.error(len(finished)))
    return SecureSum(total, finished, failures, metrics, threshold, q.error(len(finished)), note)
