"""The instrument: DSA's one-op / all-ops modes, the training setting reaching every trainer, the
validation split, and the calibration driver."""

from __future__ import annotations

import json

import pytest
import torch

from ddcore import train as train_module
from ddcore.augment import AUGMENTATIONS, ONE, apply, augment, parse_strategy, sample_params
from ddcore.config import DistillConfig, TrainConfig
from ddcore.data import validation_split
from ddcore.errors import ConfigError, UnknownNameError
from ddcore.models import ModelSpec, build_model
from ddcore.runconfig import RunConfig, from_flat
from simulations import calibrate, compare, privacy_utility
from simulations.common import run_config
from tests.conftest import blobs

STRATEGY = "color_crop_cutout_flip_scale_rotate"


def _images(n: int = 6, size: int = 16) -> torch.Tensor:
    return torch.randn((n, 1, size, size), generator=torch.Generator().manual_seed(1))


def _each_op(x: torch.Tensor, params) -> list[torch.Tensor]:
    """``x`` under each op of ``params`` alone."""
    return [AUGMENTATIONS.get(token).apply(x, p) for token, p in params]


def test_one_op_mode_applies_exactly_one_op_per_batch_and_picks_every_op() -> None:
    x = _images()
    picked = set()
    for seed in range(60):
        params = sample_params(STRATEGY, x.shape[0], torch.Generator().manual_seed(seed), ONE)
        out = apply(x, params)
        assert params[0][0] == ONE and len(params) == 1 + len(parse_strategy(STRATEGY))
        matches = [i for i, y in enumerate(_each_op(x, params[1:])) if torch.allclose(out, y)]
        assert len(matches) == 1, f"seed {seed}: output equals ops {matches}, expected exactly one"
        picked.add(params[1 + matches[0]][0])
    assert picked == set(parse_strategy(STRATEGY))  # the pick is random over the strategy


def test_all_ops_mode_applies_every_op_in_order() -> None:
    x = _images()
    params = sample_params(STRATEGY, x.shape[0], torch.Generator().manual_seed(0), "all")
    expected = x
    for token, p in params:
        expected = AUGMENTATIONS.get(token).apply(expected, p)
    out = apply(x, params)
    assert torch.allclose(out, expected)
    assert not any(torch.allclose(out, y) for y in _each_op(x, params))  # more than any single op


def test_training_augments_each_image_with_its_own_parameters_in_one_op_mode() -> None:
    x = _images(n=8).expand(8, 1, 16, 16).clone()
    x[:] = x[0]  # eight copies of one image
    out = augment(x, "crop_rotate", torch.Generator().manual_seed(0), ONE)
    assert not torch.allclose(out[0], out[1])  # per-image draws of the one picked op


def test_bad_training_mode_is_refused_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match="train-dsa-mode"):
        TrainConfig(dsa_mode="some")
    with pytest.raises(ConfigError, match="train-dsa-mode"):
        from_flat({"train-dsa-mode": "some"})


@pytest.fixture
def recorded_modes(monkeypatch) -> list[str]:
    """Every mode ``ddcore.train.train_model`` augments with, in call order."""
    modes: list[str] = []

    def spy(x, strategy, generator, mode=ONE):
        modes.append(mode)
        return augment(x, strategy, generator, mode)

    monkeypatch.setattr(train_module, "augment", spy)
    return modes


def _front_end_configs(mode: str) -> dict[str, RunConfig]:
    from ddcore import cli

    argv = ["--set", f"train-dsa-mode={mode}"]
    parsed = {name: run_config(module.build_parser().parse_args(["--out", "x", *argv]))
              for name, module in (("compare", compare), ("privacy_utility", privacy_utility))}
    parsed["ddcore"] = cli.build_config(cli.build_parser().parse_args(["distill", *argv]))
    cal = calibrate.build_parser().parse_args(["--out", "x", *argv])
    parsed["calibrate"] = calibrate.settings_from_args(cal, calibrate.FLAGS)
    return parsed


@pytest.mark.parametrize("mode", ["one", "all"])
def test_the_training_mode_reaches_every_front_end_and_trainer(mode, recorded_modes, one_thread) -> None:
    from client.task import fedavg_local
    from privacy.audit import fedavg_shadow_trainer
    from server.strategy import train_global

    for name, cfg in _front_end_configs(mode).items():
        assert cfg.train.dsa_mode == mode, name
        assert cfg.local_training().dsa_mode == mode, name  # FedAvg's local epochs, LiRA's shadows
    data = blobs(num_classes=2, n_per_class=8, size=16)
    cfg = replace_quick(from_flat({"train-dsa-mode": mode, "fedavg-rounds": 1, "local-dsa-strategy": "auto"}))
    model = build_model(cfg.distill.model, data.image_shape, 2, torch.Generator().manual_seed(0))
    from ddcore.summary import Summary

    pooled = Summary(images=data.x, labels=data.y, meta={})
    train_global(cfg, pooled, data.image_shape, 2, seed=0)  # the server's global model
    fedavg_local(data, cfg, 2, model.state_dict(), seed=0)  # a FedAvg client's local epochs
    fedavg_shadow_trainer(cfg)(data, torch.Generator().manual_seed(0))  # a LiRA shadow
    assert len(recorded_modes) >= 3 and set(recorded_modes) == {mode}


def replace_quick(cfg: RunConfig) -> RunConfig:
    """``cfg`` with a tiny model and a few SGD steps (the spy sees the mode whatever the length)."""
    from dataclasses import replace

    return replace(cfg, distill=replace(cfg.distill, model=ModelSpec(width=4)),
                   train=replace(cfg.train, epochs=1, min_steps=2), local_batch_size=8)


def test_fedavg_local_epochs_augment_only_when_asked() -> None:
    assert RunConfig().local_training().dsa_strategy == "none"  # chosen on a validation split
    assert from_flat({"local-dsa-strategy": "crop"}).local_training().dsa_strategy == "crop"
    with pytest.raises(UnknownNameError, match=r"unknown augmentation .twirl."):
        from_flat({"local-dsa-strategy": "twirl"})


def test_the_teacher_trains_with_the_matching_mode(recorded_modes, one_thread) -> None:
    from ddcore.methods.soft_labels import teacher_labels
    from ddcore.models import model_factory
    from ddcore.summary import Summary

    data = blobs(num_classes=2, n_per_class=8, size=16)
    cfg = DistillConfig(dsa_mode="all", teacher_epochs=1, model=ModelSpec(width=4))
    factory = model_factory(cfg.model, data.image_shape, 2)
    teacher_labels(Summary(images=data.x[:2], labels=data.y[:2], meta={}), data, factory, cfg)
    assert recorded_modes and set(recorded_modes) == {"all"}


def test_validation_split_is_stratified_disjoint_and_seeded() -> None:
    data = blobs(num_classes=4, n_per_class=30, size=8)
    a = validation_split(data, 0.2, seed=3)
    b = validation_split(data, 0.2, seed=3)
    assert len(a.test) == 24 and len(a.train) == 96
    assert torch.bincount(a.test.y).tolist() == [6, 6, 6, 6]
    assert torch.equal(a.test.x, b.test.x)
    train_rows = {tuple(r.flatten().tolist()) for r in a.train.x}
    assert not any(tuple(r.flatten().tolist()) in train_rows for r in a.test.x)
    assert not torch.equal(validation_split(data, 0.2, seed=4).test.x, a.test.x)


def test_calibrate_writes_a_table_beside_the_published_figures(tmp_path, capsys, one_thread) -> None:
    out = tmp_path / "cal"
    code = calibrate.main(["--dataset", "digits", "--out", str(out), "--ipcs", "1", "--widths", "4",
                           "--seeds", "2", "--whole-epochs", "1", "--whole-widths", "4", "--split",
                           "validation", "--grid", "train-dsa-mode=one,all", "--set", "train-epochs=1",
                           "train-min-steps=2"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["label"] for r in report["recipes"]] == ["train-dsa-mode=one", "train-dsa-mode=all"]
    rows = report["recipes"][0]["rows"]
    assert [(r["set"], r["width"], len(r["accuracy"])) for r in rows] == [("ipc 1", 4, 2), ("whole", 4, 2)]
    assert report["recipes"][1]["train"]["train-dsa-mode"] == "all"
    assert (out / "report.md").read_text().count("| ipc 1 | ConvNet-4 |") == 2
    assert (out / "calibration.png").stat().st_size > 0


def test_calibrate_refuses_a_grid_over_non_training_keys(tmp_path, capsys) -> None:
    assert calibrate.main(["--dataset", "digits", "--out", str(tmp_path), "--grid", "ipc=1,2"]) == 2
    assert "only training keys" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()
