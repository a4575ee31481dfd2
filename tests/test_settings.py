"""One configuration surface: keys derived from the dataclasses, accepted by every front end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ddcore import cli
from ddcore.config import DistillConfig
from ddcore.errors import ConfigError
from ddcore.runconfig import ALIASES, FIXED, KEYS, RUN_PRESETS, RunConfig, from_flat, keys, to_flat
from simulations import benchmark_methods, compare, edge_profile, privacy_utility
from simulations.common import run_config

DEFAULTS = to_flat(RunConfig())


def _value(key: str, flat: dict = DEFAULTS) -> str:
    """The value of ``key`` in ``flat`` as a command line would spell it."""
    value = flat[key]
    return str(value).lower() if isinstance(value, bool) else str(value)


def _ddcore(argv: list[str]) -> RunConfig:
    return cli.build_config(cli.build_parser().parse_args(["distill", *argv]))


def _driver(module) -> callable:
    def build(argv: list[str]) -> RunConfig:
        return run_config(module.build_parser().parse_args(["--out", "unused", *argv]))

    return build


def _benchmark(argv: list[str]) -> RunConfig:
    args = benchmark_methods.build_parser().parse_args(["--out", "unused", *argv])
    return benchmark_methods.plan(args)[0]


def _edge(argv: list[str]) -> RunConfig:
    return edge_profile.parse_config(edge_profile.build_parser().parse_args(["--out", "unused", *argv]))


# each front end's own default preset
PRESET = {"ddcore": "central", "compare": "default", "privacy_utility": "privacy",
          "benchmark_methods": "benchmark", "edge_profile": "default"}
FRONT_ENDS = {"ddcore": _ddcore, "compare": _driver(compare), "privacy_utility": _driver(privacy_utility),
              "benchmark_methods": _benchmark, "edge_profile": _edge}


def test_keys_are_every_scalar_field_of_every_section() -> None:
    # the derivation itself: every field but the fixed ones is a key, named after the field
    distill_fields = set(DistillConfig.__dataclass_fields__) - {"model", "dp", "seed"}
    assert {name for key, (section, name) in KEYS.items() if section == "distill"} == distill_fields
    assert KEYS["lr-images"] == ("distill", "lr_images") and KEYS["model-width"] == ("model", "width")
    assert KEYS["train-min-steps"] == ("train", "min_steps") and KEYS["num-clients"] == ("partition",
                                                                                       "num_partitions")
    assert all(key in KEYS for key in ALIASES.values())
    assert not any(KEYS[k] in FIXED for k in KEYS)
    assert keys("dp") == ["dp", "target-epsilon", "delta", "max-grad-norm", "accountant", "secret-noise"]


def test_from_flat_round_trips_every_key_and_rejects_bad_ones() -> None:
    for preset in RUN_PRESETS.values():
        assert from_flat(to_flat(preset)) == preset
    with pytest.raises(ConfigError, match=r"unknown setting.*known: dataset"):
        from_flat({"model-widht": 3})
    with pytest.raises(ConfigError, match="bad value 'maybe' for dd-augment: expected true or false"):
        from_flat({"dd-augment": "maybe"})
    with pytest.raises(ConfigError, match="bad value 'x' for ipc"):
        from_flat({"ipc": "x"})
    cfg = from_flat({"seed": 4, "model-width": 8, "train-lr": 0.5})
    assert cfg.partition.seed == cfg.distill.seed == 4  # one run seed
    assert cfg.distill.model.width == 8 and cfg.train.lr == 0.5


@pytest.mark.parametrize("front_end", sorted(FRONT_ENDS))
def test_every_run_config_key_is_accepted_by_every_front_end(front_end: str) -> None:
    defaults = to_flat(RUN_PRESETS[PRESET[front_end]])
    for key in KEYS:
        section = KEYS[key][0]
        if front_end == "benchmark_methods" and section == "dp" and key != "dp":
            continue  # the methods benchmark runs without DP and says so (test below)
        pairs = {key: _value(key, defaults)}
        if section == "dp" and key != "dp":  # DP settings act only with DP on (the CLI insists)
            pairs = {"dp": "true", "target-epsilon": "inf", **pairs}
        argv = ["--set", *(f"{k}={v}" for k, v in pairs.items())]
        if front_end == "benchmark_methods":
            args = benchmark_methods.build_parser().parse_args(["--out", "unused", *argv])
            cfg, _, methods, ipcs, _, options = benchmark_methods.plan(args)
            if key in ("method", "ipc"):  # one-element lists of --methods / --ipc
                assert (methods if key == "method" else ipcs) == [defaults[key]]
                continue
            if section == "distill" and key != "device":  # options of the matching methods
                assert options == {key: _value(key, defaults)}, key
                continue
        else:
            cfg = FRONT_ENDS[front_end](argv)
        value, got = defaults[key], to_flat(cfg)[key]
        assert got == value or (isinstance(value, float) and math.isclose(got, value)), (front_end, key)


def test_set_changes_reach_the_config_in_every_front_end() -> None:
    for name, build in FRONT_ENDS.items():
        cfg = build(["--set", "model-width=24", "train-epochs=7", "seed=3"])
        assert (cfg.distill.model.width, cfg.train.epochs, cfg.partition.seed) == (24, 7, 3), name
    # the benchmark keeps distillation keys as options for the matching methods (not the baselines)
    args = benchmark_methods.build_parser().parse_args(["--out", "unused", "--set", "iterations=3"])
    _, budget, *_, options = benchmark_methods.plan(args)
    assert options == {"iterations": "3"}
    assert budget.config("dm", 1, 0, "cpu").iterations == 3
    assert budget.config("random_real", 1, 0, "cpu").iterations != 3


@pytest.mark.parametrize("front_end", sorted(FRONT_ENDS))
def test_presets_mean_one_table_everywhere(front_end: str) -> None:
    for name, preset in RUN_PRESETS.items():
        cfg = FRONT_ENDS[front_end](["--preset", name])
        assert cfg == preset, (front_end, name)


def test_ddcore_help_reaches_every_distillation_and_training_key(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["distill", "--help"])
    text = capsys.readouterr().out
    for key in keys("distill", "model", "dp", "train"):
        assert f"--{key}" in text, key
    assert "--set KEY=VALUE" in text


@pytest.mark.parametrize("argv, message", [
    (["--set", "nope=1"], "--set nope: unknown run-config key"),
    (["--set", "ipc"], "--set takes KEY=VALUE"),
    (["--set", "ipc=0"], r"ipc (must be|needs numbers) >= 1"),
    (["--set", "model-norm=batchy"], "unknown norm 'batchy'"),
])
@pytest.mark.parametrize("front_end", sorted(FRONT_ENDS))
def test_bad_settings_fail_with_the_key_named(front_end, argv, message) -> None:
    with pytest.raises(ConfigError, match=message):
        FRONT_ENDS[front_end](argv)


def test_a_key_given_twice_is_refused() -> None:
    for name in ("ddcore", "compare"):
        with pytest.raises(ConfigError, match="ipc given both as a flag and with --set"):
            FRONT_ENDS[name](["--ipc", "2", "--set", "ipc=3"])


def test_federated_keys_are_noted_as_ignored_by_the_central_cli(capsys) -> None:
    _ddcore(["--set", "num-clients=4", "fedavg-rounds=2"])
    err = capsys.readouterr().err
    assert "fedavg-rounds, num-clients only act in federated runs; ignored here" in err


def test_benchmark_refuses_dp_and_double_lists() -> None:
    for argv, message in ((["--set", "dp=true"], "runs without DP"),
                          (["--methods", "dm", "--set", "method=gm"], "--set method and --methods")):
        args = benchmark_methods.build_parser().parse_args(["--out", "unused", *argv])
        with pytest.raises(ConfigError, match=message):
            benchmark_methods.plan(args)


def test_no_driver_imports_a_cli_module() -> None:
    root = Path(__file__).resolve().parents[1]
    for path in [*(root / "simulations").glob("*.py"), *(root / "server").glob("*.py"),
                 *(root / "client").glob("*.py"), *(root / "privacy").rglob("*.py")]:
        assert "ddcore.cli" not in path.read_text(), path


def test_one_ipc_rule_for_central_data_and_clients() -> None:
    import torch

    from ddcore.data import Dataset
    from ddcore.methods.base import check_ipc, per_class_counts

    y = torch.tensor([0] * 5 + [1] * 2)  # classes of 5 and 2 examples
    data = Dataset(torch.zeros(7, 1, 4, 4), y, 3, (0.0,), (1.0,), "client 3")
    check_ipc(data, 5)  # the largest class can fill it; the smaller one gives all it has
    assert per_class_counts(data, 5) == {0: 5, 1: 2}
    for call in (check_ipc, per_class_counts):
        with pytest.raises(ConfigError, match=r"ipc 6 is larger than every class of client 3 \(largest: 5"):
            call(data, 6)
