"""Collaborative rounds (FedAF-style): class means down, soft labels up, the server's KD term, safety."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import protocol
from client.app import distill_summary
from client.task import client_id
from ddcore.config import DistillConfig, TrainConfig
from ddcore.errors import ConfigError, SummaryError
from ddcore.methods import dm
from ddcore.methods.collab import (
    ClassSoftLabels,
    ClassTargets,
    class_means,
    class_soft_labels,
    combine,
    distill_toward,
)
from ddcore.models import ModelSpec, model_factory
from ddcore.runconfig import from_flat, run_preset
from ddcore.train import SoftTargets, distillation_loss, train_model
from server.ledger import Ledger
from server.strategy import CollaborativeStrategy
from server.validation import SummaryLimits, check_soft_labels
from simulations.compare import main as compare_main
from tests.conftest import blobs

K = 3
SMALL = ModelSpec(width=8, depth=2)


# --- settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flat, message", [
    ({"collab-weight": -1.0}, "collab-weight and collab-kd must be >= 0"),
    ({"collab-kd": -0.5}, "collab-weight and collab-kd must be >= 0"),
    ({"collab-temperature": 0.0}, "collab-temperature > 0"),
    ({"collaborative": True, "summary-kind": "statistics"}, "use summary-kind='images' with it"),
    ({"collaborative": True, "dp": True, "target-epsilon": 4.0}, "use dp=false with it"),
    ({"collaborative": True, "method": "gm"}, "use method='dm' with it, not 'gm'"),
    ({"collaborative": True, "soft-labels": "teacher"}, "use soft-labels='none' with it"),
])
def test_bad_collaborative_settings_are_refused_with_the_key_named(flat, message) -> None:
    with pytest.raises(ConfigError, match=message):
        from_flat(flat)


def test_compare_refuses_a_collaborative_system_it_cannot_run(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    code = compare_main(["--preset", "quick", "--dataset", "digits", "--clients", "3", "--systems",
                         "collaborative", "--set", "method=gm", "--out", str(out)])
    assert code == 2 and "use method='dm' with it" in capsys.readouterr().err
    assert not out.exists()
    from simulations.compare import plan_systems

    (system,) = plan_systems(run_preset("quick"), ["collaborative"])
    assert system.cfg.collaborative and system.cfg.rounds == 2 and system.kind == "distill"


# --- the client's matching term --------------------------------------------------------------------

def _distance(anchor: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
              targets: ClassTargets) -> float:
    means = class_means(anchor, images, labels, K).means
    return float(((means - targets.means)[targets.present] ** 2).sum())


def test_the_matching_term_pulls_the_class_means_toward_the_targets(one_thread) -> None:
    data = blobs(n_per_class=20, num_classes=K)
    factory = model_factory(SMALL, data.image_shape, K)
    cfg = DistillConfig(ipc=2, iterations=30, batch_real=16, model=SMALL, seed=0)
    anchor = factory(torch.Generator().manual_seed(99))
    # each class is pulled toward another class's real mean under the anchor: far from where DM takes it
    real = class_means(anchor, data.x, data.y, K)
    targets = ClassTargets(real.means.roll(1, 0), torch.tensor([True, True, False]))
    plain = dm.distill(data, factory, cfg)
    runs = {w: distill_toward(data, factory, cfg, anchor=anchor, targets=targets, weight=w)
            for w in (0.0, 5.0)}
    assert torch.equal(runs[0.0].images, plain.images)  # weight 0 is plain DM
    far, near = (_distance(anchor, runs[w].images, runs[w].labels, targets) for w in (0.0, 5.0))
    assert near < 0.5 * far, (near, far)
    assert runs[5.0].meta["anchor-classes"] == 2 and runs[5.0].meta["collab-weight"] == 5.0
    assert not any(p.requires_grad for p in anchor.parameters())  # the global model stays frozen
    with pytest.raises(ConfigError, match="method='dm'"):
        distill_toward(data, factory, replace(cfg, method="gm"), anchor=anchor, targets=targets, weight=1.0)


# --- the client's soft labels and the server's check -----------------------------------------------

def test_honest_soft_labels_pass_the_server_check_and_combine_by_counts() -> None:
    data = blobs(n_per_class=6, num_classes=K)
    data = data.subset(torch.nonzero(data.y != 1).flatten())  # this client holds classes 0 and 2
    model = model_factory(SMALL, data.image_shape, K)(torch.Generator().manual_seed(0))
    soft = class_soft_labels(model, data, temperature=2.0)
    assert soft.counts.tolist() == [6, 0, 6]
    assert torch.allclose(soft.probs.sum(1), torch.tensor([1.0, 0.0, 1.0]))
    checked = check_soft_labels(protocol.content_arrays(protocol.soft_labels_record(soft)), K, examples=12)
    assert torch.equal(checked.probs, soft.probs) and torch.equal(checked.counts, soft.counts)

    a = ClassSoftLabels(torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 1.0]]), torch.tensor([3, 0, 1]))
    b = ClassSoftLabels(torch.tensor([[0, 1.0, 0], [0, 1.0, 0], [0, 0, 0]]), torch.tensor([1, 2, 0]))
    both = combine([a, b], K)
    assert torch.allclose(both.probs, torch.tensor([[0.75, 0.25, 0], [0, 1.0, 0], [0, 0, 1.0]]))
    assert both.counts.tolist() == [4, 2, 1]
    none = combine([a], K)  # a class nobody holds keeps a zero row: no KD target for its images
    assert none.per_example(torch.tensor([1, 2])).tolist() == [[0, 0, 0], [0, 0, 1.0]]


def _soft(**changes) -> dict[str, np.ndarray]:
    arrays = {"probs": np.array([[0.8, 0.2, 0.0], [0.0, 0.0, 0.0], [0.1, 0.1, 0.8]], np.float32),
              "counts": np.array([5, 0, 3], np.int64)}
    return {**arrays, **changes}


BAD_SOFT = {
    "wrong shape": (_soft(probs=np.full((3, 4), 0.25, np.float32)), "expected \\(3, 3\\)"),
    "nan": (_soft(probs=np.full((3, 3), np.nan, np.float32)), "NaN or Inf"),
    "inf count": (_soft(counts=np.array([5.0, 0.0, np.inf])), "NaN or Inf"),
    "negative": (_soft(probs=np.array([[1.2, -0.2, 0], [0, 0, 0], [0, 0, 1]], np.float32)), "negative"),
    "negative count": (_soft(counts=np.array([9, -1, 0], np.int64)), "negative"),
    "row sum": (_soft(probs=np.array([[0.5, 0.2, 0], [0, 0, 0], [0.1, 0.1, 0.8]], np.float32)),
                "classes \\[0\\] sum to \\[0.7\\], not 1"),
    "absent row": (_soft(probs=np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)),
                   "classes \\[1\\] are non-zero but their count is 0"),
    "fractional count": (_soft(counts=np.array([4.5, 0, 3.5])), "not whole numbers"),
    "counts vs examples": (_soft(counts=np.array([50, 0, 3], np.int64)), "add up to 53, but the reply"),
    "int probs": (_soft(probs=np.eye(3, dtype=np.int64)), "float probs"),
    "extra array": ({**_soft(), "x": np.zeros(1, np.float32)}, "exactly the arrays"),
}


@pytest.mark.parametrize("kind", sorted(BAD_SOFT))
def test_bad_soft_labels_are_rejected_with_their_reason(kind: str) -> None:
    arrays, reason = BAD_SOFT[kind]
    with pytest.raises(SummaryError, match=reason):
        check_soft_labels(arrays, K, examples=8)
    check_soft_labels(_soft(), K, examples=8)  # the unspoilt reply passes


def _reply(node: int, cid: int, soft: dict[str, np.ndarray]) -> SimpleNamespace:
    """What aggregate_train reads of a reply: an honest 3-image summary of client ``cid`` plus ``soft``."""
    rng = np.random.default_rng(cid)
    summary = {"images": rng.normal(size=(3, 1, 8, 8)).astype(np.float32), "labels": np.arange(3)}
    content = RecordDict({
        protocol.SUMMARY: ArrayRecord({k: Array(v) for k, v in summary.items()}),
        protocol.META: ConfigRecord({"height": 8, "width": 8, "client-id": cid}),
        protocol.METRICS: MetricRecord({"client-id": cid, "num-examples": 8}),
        protocol.SOFT_LABELS: ArrayRecord({k: Array(v) for k, v in soft.items()}),
    })
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node),
                           has_error=lambda: False)


def test_a_bad_soft_label_reply_is_rejected_whole_and_the_round_goes_on(one_thread) -> None:
    cfg = from_flat({"collaborative": True, "rounds": 2, "min-clients": 2, "model-width": 8,
                     "model-depth": 2, "train-epochs": 1, "train-min-steps": 3}, base=run_preset("quick"))
    limits = SummaryLimits.for_data((1, 8, 8), K, max_images=10, pixel_bounds=(-5.0, 5.0))
    ledger = Ledger()
    strategy = CollaborativeStrategy(cfg, limits, ledger)
    nan = _soft(probs=np.full((3, 3), np.nan, np.float32))
    replies = [_reply(11, 0, _soft()), _reply(12, 1, nan), _reply(13, 2, _soft())]
    for node in (11, 12, 13):
        ledger.sent(2, node, 100)
    arrays, metrics = strategy.aggregate_train(2, replies)
    status = {e.node_id: (e.status, e.reason) for e in ledger.entries}
    assert status[11] == status[13] == ("accepted", "")
    assert status[12][0] == "rejected" and "NaN or Inf" in status[12][1]
    assert ledger.entries[1].bytes_up > 0  # its bytes were sent, and are counted
    assert arrays is not None and metrics["accepted"] == 2 and sorted(strategy.pool) == [11, 13]
    assert all(c.soft is not None and c.soft.counts.tolist() == [5, 0, 3] for c in strategy.pool.values())
    assert len(strategy.pooled()) == 6


# --- the server's KD term ---------------------------------------------------------------------------

def test_the_kd_term_moves_the_models_predictions_toward_the_soft_targets(one_thread) -> None:
    data = blobs(n_per_class=10, num_classes=K)
    factory = model_factory(SMALL, data.image_shape, K)
    cfg = TrainConfig(epochs=10, min_steps=0, batch_size=10, lr=0.05, dsa_strategy="none")
    extreme = torch.zeros(len(data), K)
    extreme[:, 0] = 1.0  # every image's target: class 0, whatever its label

    def mean_prediction(targets: SoftTargets | None) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        model = train_model(factory(g), data.x, data.y, cfg, g, soft_targets=targets)
        with torch.no_grad():
            return torch.softmax(model.eval()(data.x), 1).mean(0)  # (K,)

    plain = mean_prediction(None)
    pulled = mean_prediction(SoftTargets(extreme, weight=2.0, temperature=2.0))
    assert pulled[0] > plain[0] + 0.2, (pulled, plain)
    no_target = SoftTargets(torch.zeros(len(data), K), weight=2.0)  # zero rows: nothing to match
    assert torch.equal(mean_prediction(no_target), plain)
    # the term is T^2 KL(p || softmax(z / T)), per row, averaged over the batch
    logits, p = torch.randn(4, K), torch.softmax(torch.randn(4, K), 1)
    expected = 4.0 * torch.nn.functional.kl_div(torch.log_softmax(logits / 2.0, 1), p, reduction="batchmean")
    assert torch.allclose(distillation_loss(logits, p, 2.0), expected)


# --- end to end in a Flower simulation ---------------------------------------------------------------

def spoil_soft_labels(plan: set[tuple[int, int]]) -> ClientApp:
    """The real client, except that the (round, partition id) pairs of ``plan`` send a NaN soft label."""
    app = ClientApp()

    @app.train("distill")
    def distill(message: Message, context: Context) -> Message:
        reply = distill_summary(message, context)
        server_round = int(message.content[protocol.CONFIG][protocol.SERVER_ROUND])
        if (server_round, client_id(context.node_config)) in plan:
            arrays = protocol.content_arrays(reply.content[protocol.SOFT_LABELS])
            arrays["probs"] = arrays["probs"].copy()
            arrays["probs"][0, 0] = np.nan
            reply.content[protocol.SOFT_LABELS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return reply

    return app


@pytest.mark.slow
def test_collaborative_rounds_run_end_to_end_and_count_every_byte() -> None:
    from server.run import initial_model
    from simulations.common import System, check_partitions, run_in_simulation
    from simulations.compare import plan_systems

    base = from_flat({"dataset": "digits", "num-clients": 3, "min-clients": 2, "fedavg-rounds": 0, "ipc": 2},
                     base=run_preset("quick"))
    (system,) = plan_systems(base, ["collaborative"])
    splits = check_partitions(system.cfg)
    result = run_in_simulation(system.cfg, splits.test, [System("collaborative", "distill", system.cfg)],
                               client_app=spoil_soft_labels({(2, 2)}))["collaborative"]
    # a rejected reply's self-reported id is not read: name every node by its round-1 client id
    cids = {e.node_id: e.client_id for e in result.ledger.entries if e.round == 1}
    assert sorted(cids.values()) == [0, 1, 2]
    entries = {(e.round, cids[e.node_id]): e for e in result.ledger.entries}
    k, (c, h, w) = splits.test.num_classes, splits.test.image_shape
    state = initial_model(system.cfg, splits.test).state_dict()
    dim = state["classifier.weight"].shape[1]  # the embedding the class means live in (quick: 16 x 2 x 2)
    assert dim == 64

    # round 1 is one-shot DM: only the config goes down, only the summary comes up
    for cid in range(3):
        first = entries[(1, cid)]
        assert first.status == "accepted" and first.array_bytes_up == first.images * (c * h * w * 4 + 8)
    # round 2: the global weights and the class means (K, D) with the present mask (K,) go down ...
    extra = RecordDict({protocol.ARRAYS: ArrayRecord(state),
                        protocol.GLOBAL_STATS: protocol.targets_record(
                            ClassTargets(torch.zeros(k, dim), torch.zeros(k, dtype=torch.bool)))})
    payload = sum(v.numel() * 4 for v in state.values()) + k * dim * 4 + k
    assert protocol.array_bytes(extra) == payload
    for cid in range(3):
        assert entries[(2, cid)].bytes_down - entries[(1, cid)].bytes_down == protocol.content_bytes(extra)
    # ... and the soft labels (K, K) float32 with the counts (K,) int64 come up beside the summary
    for cid in (0, 1):
        second = entries[(2, cid)]
        assert second.status == "accepted"
        assert second.array_bytes_up == second.images * (c * h * w * 4 + 8) + k * k * 4 + k * 8
    spoilt = entries[(2, 2)]
    assert spoilt.status == "rejected" and "NaN or Inf" in spoilt.reason and spoilt.bytes_up > 0
    assert result.ledger.history[-1]["bytes_up_cum"] == sum(e.bytes_up for e in result.ledger.entries)
    assert result.ledger.history[-1]["bytes_down_cum"] == sum(e.bytes_down for e in result.ledger.entries)
    # the pool: the newest accepted summary of each client (client 2's from round 1)
    assert [hist["round"] for hist in result.ledger.history] == [1, 2]
    assert len(result.pooled) == entries[(2, 0)].images + entries[(2, 1)].images + entries[(1, 2)].images
    assert 0.0 <= result.ledger.history[-1]["accuracy"] <= 1.0 and result.final_state is not None
