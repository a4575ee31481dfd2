"""The secure sum: SecAgg+ gives the server the sum of the clients' arrays, within the quantisation bound.

Most tests drive Flower's real ``SecAggPlusWorkflow`` and ``secaggplus_mod`` through
:class:`InlineGrid`, which hands every message (serialised and parsed back, as on the wire) to
in-process ClientApps - no Ray, so they take a fraction of a second and the clients' logs reach
``caplog``. One test runs the same protocol in a real Flower simulation.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from client.secure import secure_route
from ddcore.config import DistillConfig, DPConfig
from ddcore.errors import ConfigError
from ddcore.runconfig import from_flat, run_preset
from privacy.secure_sum import (
    CLIPPING_RANGE,
    FlatSpec,
    Quantisation,
    SecureSumError,
    aggregate_epsilon,
    aggregate_meta,
    check_release,
    distributed_noise_std,
    flatten,
    protocol_threshold,
    quantisation_error,
    share_config,
    share_epsilon,
    unflatten,
)
from privacy.single_release import calibrate_gaussian
from server.ledger import Ledger
from server.secure import secure_total

CLIENTS, THRESHOLD = 5, 3


# --- a generic release: three arrays of any names and shapes, faults chosen by the server's config ---

def client_arrays(pid: int) -> dict[str, np.ndarray]:
    """Partition ``pid``'s arrays: class sums and counts of thousands of records, and a third array."""
    rng = np.random.default_rng(pid)
    return {"sums": rng.uniform(-5000, 5000, (3, 4)), "counts": rng.integers(0, 6000, 3).astype(np.float32),
            "extra": rng.normal(size=(2, 2, 2)).astype(np.float32)}


def expected_sum(pids: Iterable[int]) -> dict[str, np.ndarray]:
    parts = [client_arrays(p) for p in pids]
    return {k: sum(p[k].astype(np.float64) for p in parts) for k in parts[0]}


def release(config, context: Context, threshold: int) -> tuple[dict[str, np.ndarray], dict]:
    pid = int(context.node_config["partition-id"])
    arrays = client_arrays(pid)
    faults = dict(item.split(":") for item in str(config.get("faults", "")).split(",") if item)
    fault = faults.get(str(pid))
    if fault == "crash":
        raise RuntimeError(f"partition {pid} dropped out after the key exchange")
    if fault == "range":
        arrays["sums"][1, 2] = 3 * CLIPPING_RANGE
    if fault == "nan":
        arrays["extra"][0, 0, 0] = np.nan
    return arrays, {"partition-id": pid, "threshold-seen": threshold}


SUM_APP = ClientApp()


@SUM_APP.train(mods=[secure_route(release)])
def plain_train(message: Message, context: Context) -> Message:
    raise RuntimeError("only SecAgg+ messages are expected here")


class InlineGrid(Grid):
    """A grid whose nodes are ClientApps in this process; messages are serialised both ways.

    ``silent``: {partition id: SecAgg+ stage} whose reply is lost (a node that stops answering).
    Errors raised by an app come back as error replies, as Flower's runtimes send them.
    """

    def __init__(self, app: ClientApp, clients: int, silent: dict[int, str] | None = None) -> None:
        self.app, self.silent = app, silent or {}
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                                          node_config={"partition-id": i, "num-partitions": clients})
                         for i in range(clients)}
        self._run = Run.create_empty(1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            context = self.contexts[message.metadata.dst_node_id]
            stage = (message.content[RECORD_KEY_CONFIGS].get(Key.STAGE)
                     if RECORD_KEY_CONFIGS in message.content else None)
            pid = int(context.node_config["partition-id"])
            if pid in self.silent and self.silent[pid] == stage:
                continue
            received = message_from_proto(message_to_proto(message))
            try:
                reply = self.app(received, context)
            except Exception as exc:  # what a runtime does with a ClientApp's exception
                reply = Message(Error(code=0, reason=f"{type(exc)}:<'{exc}'>"), reply_to=received)
            replies.append(message_from_proto(message_to_proto(reply)))
        return replies


@pytest.fixture
def server_identity(monkeypatch):
    """The process identity Flower's Message constructor reads (a ServerApp's runtime sets it)."""
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def max_error(total: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    assert sorted(total) == sorted(expected)
    assert all(total[k].shape == expected[k].shape for k in expected)
    return max(float(np.abs(total[k] - expected[k]).max()) for k in expected)


# --- layout and quantisation ---

def test_flatten_round_trips_any_named_arrays_and_refuses_what_it_cannot_sum() -> None:
    arrays = client_arrays(0)
    vector, spec = flatten(arrays)
    assert vector.dtype == np.float64 and vector.shape == (12 + 3 + 8,)
    assert spec.names == ("counts", "extra", "sums") and FlatSpec.from_json(spec.to_json()) == spec
    back = unflatten(vector, spec)
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    with pytest.raises(SecureSumError, match="'labels' is int64"):
        flatten({"labels": np.arange(3)})
    with pytest.raises(SecureSumError, match="does not hold 23 entries"):
        unflatten(vector[:-1], spec)
    with pytest.raises(SecureSumError, match="not a flat-vector spec"):
        FlatSpec.from_json('{"names": ["a"]}')


def test_the_quantisation_bound_holds_for_flowers_own_arithmetic() -> None:
    q = Quantisation()
    n = 10
    step = 2 * q.clipping_range / q.quantization_range
    assert step == 2.0**-7 and q.max_clients == 1023
    assert q.error(n) == pytest.approx(n * step, rel=1e-8) == quantisation_error(2.0**14, 2**22, n)
    # what secaggplus_mod sends and the workflow reconstructs (weight 1, masks cancelled)
    rng = np.random.default_rng(1)
    xs = [rng.uniform(-0.99, 0.99, 50_000) * q.clipping_range for _ in range(n)]
    summed = sum(quantize([x], q.clipping_range, q.quantization_range)[0].astype(np.int64) for x in xs)
    assert summed.max() < q.modulus_range  # n T < M: no wrap
    mean = dequantize([summed], q.clipping_range, q.quantization_range)[0]
    mean = (mean - (n - 1) * q.clipping_range) * (1 / n)
    error = mean * n - sum(xs)
    assert np.abs(error).max() < q.error(n)
    assert error.std() == pytest.approx(math.sqrt(n) * step / math.sqrt(6), rel=0.05)  # uniform fractions
    q.check_clients(1023)
    with pytest.raises(SecureSumError, match="1024 clients could wrap the modulus"):
        q.check_clients(1024)
    with pytest.raises(SecureSumError, match="power of 2"):
        Quantisation(modulus_range=3 * 2**22)


# --- the protocol, in process ---

def test_secagg_plus_returns_the_sum_of_every_client_within_the_bound(server_identity) -> None:
    grid, ledger = InlineGrid(SUM_APP, CLIENTS), Ledger()
    result = secure_total(grid, grid.get_node_ids(), {"faults": ""}, threshold=THRESHOLD, ledger=ledger)
    assert result.finished == tuple(grid.contexts) and result.failures == {} and result.note == ""
    error = max_error(result.total, expected_sum(range(CLIENTS)))
    assert 0 < error < result.error_bound == pytest.approx(CLIENTS * 2.0**-7)
    # the release was told the protocol's threshold; its metrics travel in the clear
    assert {m["threshold-seen"] for m in result.metrics.values()} == {THRESHOLD}
    assert sorted(m["partition-id"] for m in result.metrics.values()) == list(range(CLIENTS))
    # every stage's bytes are counted, and each upload holds the masked int64 vector (23 entries + weight)
    for entry in ledger.entries:
        assert entry.bytes_down > 0 and entry.bytes_up > entry.array_bytes_up >= 8 * (23 + 1)


def test_a_dropout_after_the_key_exchange_leaves_the_sum_of_the_finishing_clients(server_identity) -> None:
    # partition 4 fails while making its vector, partition 3 never sends its own: both after setup
    grid = InlineGrid(SUM_APP, CLIENTS, silent={3: "collect_masked_vectors"})
    result = secure_total(grid, grid.get_node_ids(), {"faults": "4:crash"}, threshold=THRESHOLD)
    assert result.finished == (100, 101, 102)
    assert "dropped out after the key exchange" in result.failures[104]
    assert result.failures[103] == "stage collect_masked_vectors: no reply (dropped out or timed out)"
    assert max_error(result.total, expected_sum([0, 1, 2])) < quantisation_error(CLIPPING_RANGE, 2**22, 3)
    # a node lost after its vector was sent stays in the sum (its mask comes back from the others' shares)
    late = InlineGrid(SUM_APP, CLIENTS, silent={2: "unmask"})
    result = secure_total(late, late.get_node_ids(), {"faults": ""}, threshold=THRESHOLD)
    assert result.finished == tuple(late.contexts) and result.failures == {}
    assert max_error(result.total, expected_sum(range(CLIENTS))) < result.error_bound
    # one more loss and the sum would hold fewer than the threshold: no sum at all
    grid = InlineGrid(SUM_APP, CLIENTS, silent={3: "collect_masked_vectors"})
    halted = secure_total(grid, grid.get_node_ids(), {"faults": "4:crash,2:crash"}, threshold=THRESHOLD)
    assert halted.total is None and halted.finished == () and "SecAgg+ halted" in halted.note
    assert len(halted.failures) == CLIENTS


def test_a_release_secagg_would_alter_is_refused_with_a_logged_reason(server_identity, caplog) -> None:
    with pytest.raises(SecureSumError, match=r"'sums' reaches 49152, beyond the clipping range 16384.*"
                                             r"raise secagg-clipping-range above 49152"):
        check_release({"sums": np.array([1.0, -3 * CLIPPING_RANGE])}, CLIPPING_RANGE)
    with pytest.raises(SecureSumError, match="'extra' holds NaN or Inf"):
        check_release({"extra": np.array([np.inf])}, CLIPPING_RANGE)
    check_release({"sums": np.array([CLIPPING_RANGE, -CLIPPING_RANGE])}, CLIPPING_RANGE)  # the edges pass

    grid = InlineGrid(SUM_APP, CLIENTS)
    with caplog.at_level(logging.WARNING):
        result = secure_total(grid, grid.get_node_ids(), {"faults": "1:range,3:nan"}, threshold=THRESHOLD)
    assert result.finished == (100, 102, 104)
    assert max_error(result.total, expected_sum([0, 2, 4])) < result.error_bound
    assert "beyond the clipping range 16384" in result.failures[101]
    assert "holds NaN or Inf" in result.failures[103]
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("node 101 refuses to send its release") and "clipping range" in m for m in logged)
    assert any(m.startswith("node 103 refuses to send its release") and "NaN" in m for m in logged)
    assert any(m.startswith("secure sum: node 103 is not in the sum") and "NaN" in m for m in logged)


# --- distributed DP ---

def test_the_shares_of_the_fewest_finishing_clients_carry_the_aggregate_noise() -> None:
    assert distributed_noise_std(6.0, 4) == 3.0
    for clients in range(3, 12):  # the threshold: a strict majority, below the number of clients
        t = protocol_threshold(clients, 0.6)
        assert clients / 2 < t < clients
    with pytest.raises(SecureSumError, match="at least 3 clients"):
        protocol_threshold(2, 0.6)
    cfg = DistillConfig(dp=DPConfig(enabled=True, target_epsilon=2.0, delta=1e-5))
    sigma = calibrate_gaussian(target_epsilon=2.0, delta=1e-5)
    share = calibrate_gaussian(target_epsilon=share_config(cfg, THRESHOLD).dp.target_epsilon, delta=1e-5)
    # t shares carry at least the aggregate's sigma (and no more than rounding above it)
    assert sigma <= share * math.sqrt(THRESHOLD) < sigma * (1 + 1e-6)
    draws = torch.randn((THRESHOLD, 200_000), generator=torch.Generator().manual_seed(0)) * share
    assert float(draws.sum(0).std()) == pytest.approx(sigma, rel=0.01)
    # the record a client reports is the sum's; a share with too little noise is refused
    meta = {"dp": True, "noise-multiplier": share, "epsilon": 9.9}
    record = aggregate_meta(meta, cfg, THRESHOLD)
    assert record["epsilon"] == pytest.approx(2.0, rel=1e-6) and record["epsilon"] <= 2.0 + 1e-9
    assert record["share-noise-multiplier"] == share and record["share-epsilon"] == 9.9
    with pytest.raises(SecureSumError, match="below the"):
        aggregate_meta({**meta, "noise-multiplier": 0.9 * share}, cfg, THRESHOLD)


def analytic_gaussian_delta(epsilon: float, sigma: float) -> float:
    """Balle and Wang (2018), Theorem 8, written out here independently of privacy.single_release."""
    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    a, b = 1 / (2 * sigma) - epsilon * sigma, -1 / (2 * sigma) - epsilon * sigma
    return phi(a) - math.exp(epsilon) * phi(b)


def test_the_aggregate_epsilon_is_the_analytic_gaussian_mechanisms() -> None:
    from dp_accounting import GaussianDpEvent
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    delta, sensitivity = 1e-5, 1.0
    for sigma in (0.8, 2.0, 5.0):
        epsilon = aggregate_epsilon(total_std=sigma * sensitivity, sensitivity=sensitivity, delta=delta)
        assert analytic_gaussian_delta(epsilon, sigma) == pytest.approx(delta, rel=1e-6)
        assert analytic_gaussian_delta(epsilon * 0.999, sigma) > delta  # the least such epsilon
        pld = PLDAccountant()
        pld.compose(GaussianDpEvent(sigma))
        assert pld.get_epsilon(delta) == pytest.approx(epsilon, rel=1e-3)
        # seen alone, one of THRESHOLD shares would cost more
        alone = share_epsilon(total_std=sigma, sensitivity=sensitivity, delta=delta, threshold=THRESHOLD)
        assert analytic_gaussian_delta(alone, sigma / math.sqrt(THRESHOLD)) == pytest.approx(delta, rel=1e-6)
        assert alone > epsilon
    assert aggregate_epsilon(total_std=4.0, sensitivity=2.0, delta=delta) == pytest.approx(
        aggregate_epsilon(total_std=2.0, sensitivity=1.0, delta=delta))


# --- the settings and the project's statistics system ---

def test_the_secure_aggregation_settings_are_checked_and_named() -> None:
    base = {"summary-kind": "statistics", "num-clients": 4}
    cfg = from_flat({**base, "secure-aggregation": True, "secagg-clipping-range": 4096.0,
                     "secagg-threshold": 0.75})
    assert (cfg.secure_aggregation, cfg.secagg_clipping_range, cfg.secagg_threshold) == (True, 4096.0, 0.75)
    for bad, key in (({"secagg-threshold": 0.5}, "secagg-threshold"),
                     ({"secagg-threshold": 1.0}, "secagg-threshold"),
                     ({"secagg-clipping-range": 0.0}, "secagg-clipping-range"),
                     ({"secagg-clipping-range": math.inf}, "secagg-clipping-range"),
                     ({"secure-aggregation": True, "summary-kind": "images"}, "summary-kind='statistics'"),
                     ({"secure-aggregation": True, "num-clients": 2}, "num-clients >= 3")):
        with pytest.raises(ConfigError, match=key):
            from_flat({**base, **bad})


def test_the_statistics_system_runs_through_secure_aggregation(server_identity, monkeypatch, digits,
                                                               one_thread) -> None:
    """The project's own apps: client.app's routed default train handler, server.run's secure path."""
    import client.app
    import privacy.statistics
    from client.task import local_data, release_statistics
    from server.run import run_distillation, run_fedavg

    flat = {"dataset": "digits", "num-clients": 4, "min-clients": 3, "summary-kind": "statistics",
            "bank-size": 2, "ipc": 1, "iterations": 5, "secure-aggregation": True, "fedavg-rounds": 1,
            "train-epochs": 2, "train-min-steps": 5}
    cfg = from_flat(flat, base=run_preset("quick"))
    totals = []
    real = privacy.statistics.global_summary
    monkeypatch.setattr(privacy.statistics, "global_summary",
                        lambda total, *a, **k: totals.append(total) or real(total, *a, **k))
    grid = InlineGrid(client.app.app, 4)
    plain = run_distillation(grid, cfg, digits.test)
    assert [e.status for e in plain.ledger.entries] == ["accepted"] * 4
    assert plain.pooled is not None and len(plain.pooled) == digits.test.num_classes
    assert len(plain.ledger.history) == 1 and not plain.received.releases  # no single release seen
    assert plain.received.total is not None  # the sum alone
    # without DP the secure total is the sum of the clients' exact releases, up to the quantisation
    exact = [release_statistics(local_data(cfg, c.node_config, None), cfg, 10, 0)[0]
             for c in grid.contexts.values()]
    total = {"sums": totals[0].sums.numpy(), "counts": totals[0].counts.numpy()}
    expected = {k: sum(e[k].astype(np.float64) for e in exact) for k in total}
    assert max_error(total, expected) < quantisation_error(cfg.secagg_clipping_range, 2**22, 4) + 1e-3

    dp = run_distillation(InlineGrid(client.app.app, 4), from_flat({"dp": True, "target-epsilon": 4.0},
                                                                    base=cfg), digits.test)
    record = dp.privacy()
    assert record["epsilon_spent_max"] == pytest.approx(4.0, rel=1e-6)
    sigma = calibrate_gaussian(target_epsilon=4.0, delta=1e-5)  # the sum's: sqrt(3) shares of it
    assert [p["noise-multiplier"] for p in record["per_client"].values()] == pytest.approx([sigma] * 4)
    assert all(p["noise-multiplier"] >= sigma for p in record["per_client"].values())
    assert all(e.examples == 0 for e in dp.ledger.entries)  # the record count stays private under DP
    assert not np.allclose(totals[1].sums.numpy(), totals[0].sums.numpy(), atol=0.1)  # noise was added

    fedavg = run_fedavg(grid, cfg, digits.test)  # plain "train" messages still reach fedavg_update
    assert [e.status for e in fedavg.ledger.entries] == ["accepted"] * 4 and fedavg.final_state is not None

    # a client that fails leaves a sum of 3; with min-clients 4 the server refuses it, saying why
    real_data = client.app._local_data

    def lost(cfg, context, config):
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("partition 1 lost its data")
        return real_data(cfg, context, config)

    monkeypatch.setattr(client.app, "_local_data", lost)
    short = run_distillation(InlineGrid(client.app.app, 4), from_flat({"min-clients": 4}, base=cfg),
                             digits.test)
    assert short.pooled is None and short.ledger.history == [] and len(totals) == 2
    assert "3 clients in the sum, fewer than min-clients=4" in short.ledger.round_notes[1]
    failed = [e for e in short.ledger.entries if e.status == "failed"]
    assert len(failed) == 1 and "partition 1 lost its data" in failed[0].reason


def test_the_ridge_head_runs_through_secure_aggregation_as_in_the_clear(server_identity, digits,
                                                                       one_thread) -> None:
    """Sums, counts and second moments go through SecAgg+; the head equals the clear run's."""
    import client.app
    from server.run import run_distillation

    flat = {"dataset": "digits", "num-clients": 4, "min-clients": 3, "summary-kind": "statistics",
            "statistics-head": "ridge", "model": "scatter", "model-width": 16, "bank-size": 1,
            "secure-aggregation": True}
    cfg = from_flat(flat, base=run_preset("quick"))
    secure = run_distillation(InlineGrid(client.app.app, 4), cfg, digits.test)
    clear = run_distillation(InlineGrid(client.app.app, 4),
                             from_flat({"secure-aggregation": False}, base=cfg), digits.test)
    assert [e.status for e in secure.ledger.entries] == ["accepted"] * 4
    assert not secure.received.releases and secure.received.total is not None  # the sum alone
    assert clear.received.kind == "statistics"  # in the clear the server holds every release
    assert secure.pooled is None and secure.final_state is not None  # no image anywhere
    weights = secure.final_state["classifier.weight"]
    assert torch.allclose(weights, clear.final_state["classifier.weight"], atol=1e-3)
    accuracy = secure.ledger.history[-1]["accuracy"]
    assert accuracy == pytest.approx(clear.ledger.history[-1]["accuracy"], abs=0.01)
    assert accuracy > 0.5  # chance: 0.1


# --- one real Flower simulation ---

SIMULATED: dict = {}


@pytest.mark.slow
def test_secagg_plus_in_a_flower_simulation_sums_the_finishing_clients() -> None:
    import os

    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 120
        while len(grid.get_node_ids()) < CLIENTS and time.monotonic() < deadline:
            time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
        for name, faults in (("clean", ""), ("dropout", "4:crash")):
            SIMULATED[name] = secure_total(grid, nodes, {"faults": faults}, threshold=THRESHOLD, timeout=120)

    run_simulation(server_app=server_app, client_app=SUM_APP, num_supernodes=CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    clean, dropout = SIMULATED["clean"], SIMULATED["dropout"]
    assert len(clean.finished) == CLIENTS and clean.note == ""
    assert max_error(clean.total, expected_sum(range(CLIENTS))) < clean.error_bound
    pids = sorted(int(m["partition-id"]) for m in dropout.metrics.values())
    assert pids == [0, 1, 2, 3] and len(dropout.failures) == 1
    assert "dropped out after the key exchange" in next(iter(dropout.failures.values()))
    assert max_error(dropout.total, expected_sum(pids)) < dropout.error_bound
