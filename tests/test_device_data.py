"""A device's own data: distilled whole, normalised like the run, refused early on any mismatch."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

import client.app
from client import protocol
from client.task import local_data, run_spec
from ddcore.devicedata import DataSpec, load_device_data
from ddcore.errors import DataError
from ddcore.runconfig import from_flat
from server.run import round_config

MNIST = DataSpec("mnist5k", (1, 28, 28), 10, (0.13,), (0.31,))
RGB = DataSpec("cifar10", (3, 32, 32), 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def save(tmp_path, name: str = "dev.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def request(config: ConfigRecord) -> Message:
    """A distillation request as the SuperNode hands it to the ClientApp."""
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                    group_id="", created_at=time.time(), ttl=3600.0, message_type=protocol.DISTILL)
    return Message(content=RecordDict({protocol.CONFIG: config}), metadata=meta)


def pixels(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_a_file_without_a_test_split_is_used_whole_and_normalised_with_the_run_stats(tmp_path) -> None:
    x, y = pixels(57, (28, 28)), np.arange(57) % 10
    data = load_device_data(save(tmp_path, x=x, y=y), MNIST)
    assert len(data) == 57 and data.x.shape == (57, 1, 28, 28)  # no 20% held out
    expected = (x[:, None] / 255.0 - 0.13) / 0.31
    assert torch.allclose(data.x, torch.from_numpy(expected).float(), atol=1e-6)
    assert data.y.dtype == torch.int64 and data.y.tolist() == y.tolist()
    assert (data.mean, data.std, data.num_classes, data.name) == ((0.13,), (0.31,), 10, "dev")


def test_x_test_in_a_device_file_is_ignored_not_mixed_in(tmp_path) -> None:
    path = save(tmp_path, x=pixels(20, (28, 28)), y=np.zeros(20, np.int64),
                x_test=pixels(5, (28, 28)), y_test=np.ones(5, np.int64))
    data = load_device_data(path, MNIST)
    assert len(data) == 20 and set(data.y.tolist()) == {0}


def test_every_layout_and_pixel_encoding_gives_the_same_images(tmp_path) -> None:
    nhwc = pixels(6, (32, 32, 3))
    y = np.arange(6)
    ref = load_device_data(save(tmp_path, "a.npz", x=nhwc, y=y), RGB).x
    variants = {"nchw": nhwc.transpose(0, 3, 1, 2), "float01": nhwc / 255.0,
                "float255": nhwc.astype(np.float32), "float16": (nhwc / 255.0).astype(np.float16)}
    for name, x in variants.items():
        got = load_device_data(save(tmp_path, f"{name}.npz", x=x, y=y.reshape(-1, 1)), RGB).x
        assert torch.allclose(got, ref, atol=2e-3), name
    assert ref.shape == (6, 3, 32, 32)


@pytest.mark.parametrize(("arrays", "message"), [
    ({"x": pixels(4, (32, 32, 3)), "y": np.zeros(4, int)},
     "images are 3x32x32 but the run's dataset mnist5k has 1x28x28; convert them to grayscale "
     r"\(1 channel\) and resize them to 28x28"),
    ({"x": pixels(4, (3, 28, 28)), "y": np.zeros(4, int)},
     "images are 3x28x28 but the run's dataset mnist5k has 1x28x28; convert them to grayscale"),
    ({"x": pixels(4, (8, 8)), "y": np.zeros(4, int)},
     "images are 1x8x8 but the run's dataset mnist5k has 1x28x28; resize them to 28x28"),
    ({"x": pixels(4, (28,)), "y": np.zeros(4, int)}, r"images must be \(N,H,W\).*got shape \(4, 28\)"),
    ({"x": pixels(0, (28, 28)), "y": np.zeros(0, int)}, "holds no images"),
    ({"x": pixels(4, (28, 28)).astype(np.int64), "y": np.zeros(4, int)}, "images are int64; give uint8"),
    ({"x": pixels(4, (28, 28)) / 255.0 - 0.5, "y": np.zeros(4, int)},
     r"pixel values span -0.5..0.5; give raw pixels in 0..1 or 0..255 \(not normalised"),
    ({"x": pixels(4, (28, 28)) * 4.0, "y": np.zeros(4, int)}, r"pixel values span 0..1.02e\+03"),
    ({"x": np.full((4, 28, 28), np.nan, np.float32), "y": np.zeros(4, int)}, "NaN or Inf"),
    ({"x": pixels(4, (28, 28)), "y": np.arange(4) + 7},
     r"labels span 7..10 but the run's dataset mnist5k has 10 classes \(0..9\)"),
    ({"x": pixels(4, (28, 28)), "y": np.array([0, -1, 2, 3])}, "labels span -1..3"),
    ({"x": pixels(4, (28, 28)), "y": np.zeros(4, np.float32)}, "labels are float32; give integer class"),
    ({"x": pixels(4, (28, 28)), "y": np.eye(10, dtype=np.int64)[:4]}, r"\(4, 10\); for one-hot.*argmax"),
    ({"x": pixels(4, (28, 28)), "y": np.zeros(3, int)}, "4 images but 3 labels"),
    ({"x": pixels(4, (28, 28))}, "needs 'x' and 'y'"),
])
def test_a_mismatch_with_the_run_is_one_line_naming_file_and_fix(tmp_path, arrays, message) -> None:
    path = save(tmp_path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_device_data(path, MNIST)
    text = str(info.value)
    assert "\n" not in text and path in text


def test_unreadable_or_missing_files_are_refused(tmp_path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"cannot read .*junk\.npz as \.npz"):
        load_device_data(tmp_path / "junk.npz", MNIST)
    with pytest.raises(DataError, match="no such file or directory; set the node's data-path"):
        load_device_data(tmp_path / "gone.npz", MNIST)


def test_an_image_folder_uses_class_folder_names_as_labels(tmp_path) -> None:
    from PIL import Image

    for cls in ("3", "7"):  # a device holding two of the run's ten classes
        (tmp_path / "dev" / cls).mkdir(parents=True)
        for i in range(2):
            image = Image.fromarray(pixels(1, (28, 28), seed=i)[0], mode="L")
            image.save(tmp_path / "dev" / cls / f"{i}.png")
    data = load_device_data(tmp_path / "dev", MNIST)
    assert sorted(data.y.tolist()) == [3, 3, 7, 7] and data.x.shape == (4, 1, 28, 28)
    (tmp_path / "dev" / "3").rename(tmp_path / "dev" / "cat")
    with pytest.raises(DataError, match=r"class folders \['7', 'cat'\] must be named by class index"):
        load_device_data(tmp_path / "dev", MNIST)


def test_local_data_reads_the_device_file_whole_with_the_run_spec(tmp_path) -> None:
    cfg = from_flat({"dataset": "digits"})
    spec = run_spec(cfg)
    assert spec.image_shape == (1, 8, 8) and spec.num_classes == 10 and spec.name == "digits"
    path = save(tmp_path, x=pixels(33, (8, 8)) // 16, y=np.arange(33) % 10)
    for given in (spec, None):  # sent by the server, or loaded from the run's dataset here
        data = local_data(cfg, {"data-path": path, "client-id": 4}, given)
        assert len(data) == 33 and data.mean == spec.mean and data.std == spec.std


def test_the_round_config_carries_the_spec_and_the_run_config_still_parses() -> None:
    cfg = from_flat({"dataset": "digits", "ipc": 3})
    record = round_config(cfg, RGB)
    assert protocol.read_spec(record) == RGB and protocol.read_spec({"num-classes": 10}) is None
    assert client.app._read_config(request(record)) == (cfg, 10, 1)


def test_the_client_app_refuses_a_mismatched_file_before_distilling(tmp_path, monkeypatch) -> None:
    cfg = from_flat({"dataset": "digits", "num-clients": 1, "ipc": 1, "iterations": 2, "model-width": 8})
    spec = run_spec(cfg)
    calls = []
    real = client.app.distill_local
    monkeypatch.setattr(client.app, "distill_local", lambda *a, **k: calls.append(1) or real(*a, **k))

    def ask(path: str) -> Message:
        context = Context(run_id=1, node_id=1, node_config={"data-path": path, "client-id": 2},
                          state=RecordDict(), run_config={})
        return client.app.distill_summary(request(round_config(cfg, spec)), context)

    with pytest.raises(DataError, match="images are 3x32x32 but the run's dataset digits has 1x8x8"):
        ask(save(tmp_path, "rgb.npz", x=pixels(20, (32, 32, 3)), y=np.arange(20) % 10))
    assert not calls  # refused before any distillation
    reply = ask(save(tmp_path, "ok.npz", x=pixels(23, (8, 8)), y=np.arange(23) % 10))
    assert calls and reply.content[protocol.METRICS]["num-examples"] == 23


def test_a_dp_client_reply_carries_its_privacy_record_but_not_its_exact_size(tmp_path) -> None:
    import privacy.methods  # noqa: F401  (registers dp-dm)

    cfg = from_flat({"dataset": "digits", "num-clients": 1, "ipc": 1, "iterations": 2, "model-width": 8,
                     "bank-size": 2, "method": "dm", "dp": True, "target-epsilon": 2.0, "delta": 1e-3,
                     "init": "noise"})
    context = Context(run_id=1, node_id=1, node_config={"data-path": save(tmp_path, "ok.npz",
                      x=pixels(23, (8, 8)), y=np.arange(23) % 10), "client-id": 2},
                      state=RecordDict(), run_config={})
    metrics = client.app.distill_summary(request(round_config(cfg, run_spec(cfg))), context).content[
        protocol.METRICS]
    assert "num-examples" not in metrics  # add/remove adjacency: the size is private
    assert 1.9 < metrics["epsilon"] <= 2.0 and metrics["images"] == 10


def test_a_dp_fedavg_reply_carries_no_training_loss_and_a_plain_one_does(tmp_path) -> None:
    from flwr.app import ArrayRecord

    from ddcore.models import build_model

    path = save(tmp_path, "ok.npz", x=pixels(40, (8, 8)), y=np.arange(40) % 10)
    replies = {}
    for dp in (False, True):
        cfg = from_flat({"dataset": "digits", "num-clients": 1, "model": "mlp", "model-width": 8,
                         "fedavg-rounds": 1, "local-batch-size": 8, "dp": dp, "target-epsilon": 2.0,
                         "delta": 1e-3})
        model = build_model(cfg.distill.model, (1, 8, 8), 10, torch.Generator().manual_seed(0))
        message = request(round_config(cfg, run_spec(cfg)))
        message.content[protocol.ARRAYS] = ArrayRecord(model.state_dict())
        context = Context(run_id=1, node_id=1, node_config={"data-path": path, "client-id": 2},
                          state=RecordDict(), run_config={})
        replies[dp] = client.app.fedavg_update(message, context).content[protocol.METRICS]
    assert "train-loss" in replies[False] and "train-loss" not in replies[True]  # noise-free statistic
    assert 0 < replies[True]["epsilon"] <= 2.0
    assert replies[True]["num-examples"] == 40  # public under the accounting: sample-rate = 8 / 40
    assert replies[True]["sample-rate"] == pytest.approx(8 / 40)
