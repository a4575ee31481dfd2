"""The methods benchmark reports per-seed results, their mean and std, and refuses bad input."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from ddcore.files import provenance_line
from ddcore.models import ModelSpec, build_model
from ddcore.runconfig import run_preset
from simulations.benchmark_methods import (
    TUNING,
    WIDE,
    build_parser,
    main,
    markdown,
    mean_std,
    plan,
    published_for,
    verdict,
)

ARGS = ["--dataset", "digits", "--methods", "random_real,dm", "--ipc", "1", "--seeds", "2",
        "--archs", "convnet,mlp", "--preset", "quick", "--threads", "1"]


def test_benchmark_reports_accuracy_cost_and_bytes_per_seed(tmp_path, one_thread) -> None:
    assert main(["--out", str(tmp_path), *ARGS]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    runs = report["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("random_real", 0), ("random_real", 1), ("dm", 0),
                                                        ("dm", 1)]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == runs  # the partial file holds every finished job
    for r in runs:
        assert set(r["accuracy"]) == {"convnet", "mlp"}
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
        assert r["images"] == 10
        assert r["summary_bytes"] == 10 * (8 * 8 * 4 + 8)  # float32 8x8 images, int64 labels
        assert r["distill_seconds"] > 0 and r["peak_rss_mb"] > 0
    real = [r for r in runs if r["method"] == "random_real"]
    assert real[0]["accuracy"] != real[1]["accuracy"]  # seeds differ

    table = report["results"]["1"]
    assert list(table) == ["random_real", "dm"]
    for method in ("random_real", "dm"):
        for arch in ("convnet", "mlp"):
            values = [r["accuracy"][arch] for r in runs if r["method"] == method]
            stat = table[method]["accuracy"][arch]
            assert stat["values"] == values
            assert stat["mean"] == pytest.approx(statistics.fmean(values))
            assert stat["std"] == pytest.approx(statistics.stdev(values))
    assert "vs_random_real" not in table["random_real"]
    assert table["dm"]["vs_random_real"]["verdict"] in ("beats", "on par", "worse")
    assert report["budget"]["distill"]["iterations"] == 10 and report["budget"]["train"]["min_steps"] == 20
    assert report["environment"]["torch_threads"] == 1

    md = (tmp_path / "report.md").read_text()
    head = ("| method | ConvNet | MLP | iterations | distill s (wall / CPU) | eval s | peak MiB "
            "| summary bytes | vs random-real (ConvNet) |")
    assert head in md
    assert "| random_real |" in md and "| dm |" in md and "Published" not in md  # digits: no MNIST figures
    assert md.rstrip().endswith(provenance_line(report)) and provenance_line(report)  # command and commit


def test_verdict_uses_twice_the_pooled_std() -> None:
    base = mean_std([0.50, 0.52, 0.54])  # std 0.02
    assert verdict(mean_std([0.60, 0.62, 0.64]), base)["verdict"] == "beats"  # +0.10 > 0.04
    assert verdict(mean_std([0.53, 0.55, 0.57]), base)["verdict"] == "on par"  # +0.03
    assert verdict(mean_std([0.40, 0.42, 0.44]), base)["verdict"] == "worse"
    assert verdict(mean_std([0.9]), mean_std([0.1]))["verdict"] == "n/a (1 seed)"
    assert mean_std([0.3])["std"] == 0.0


@pytest.mark.parametrize("bad, message", [
    (["--methods", "random_real,nope"], "unknown method 'nope'"),
    (["--archs", "convnet,vgg"], "unknown model 'vgg'"),
    (["--dataset", "nosuchset"], "unknown dataset 'nosuchset'"),
    (["--ipc", "1,500"], "ipc 500 is larger than every class"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--ipc", "1,x"], "--ipc takes a comma list"),
    (["--device", "gpu0"], "is not a torch device"),
    (["--set", "soft-labels=learned"], "soft-labels=learned needs a method that unrolls"),  # dm cannot
    (["--set", "dp=true"], "runs without DP"),
    (["--set", "nope=1"], "unknown run-config key"),
    (["--set", "ipc=3"], "--set ipc and --ipc both given"),
    (["--set", "multires=2"], "multires is the fraction"),
    (["--set", "multires"], "--set takes KEY=VALUE"),
])
def test_benchmark_refuses_bad_input_and_writes_nothing(tmp_path, capsys, bad, message) -> None:
    out = tmp_path / "out"
    assert main(["--out", str(out), *ARGS, *bad]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 32, 32)])
def test_resnet_builds_seeded_with_embeddings(shape) -> None:
    spec = ModelSpec(name="resnet", width=8)
    a, b = (build_model(spec, shape, 10, torch.Generator().manual_seed(3)) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    x = torch.randn(4, *shape)
    emb = a.embed(x)
    assert emb.shape == (4, 32) and a(x).shape == (4, 10)  # 8 -> 16 -> 32 channels, pooled
    assert emb.std(0).sum() > 0  # not flattened to a constant by instance norm on 1x1 maps


def test_set_options_apply_to_the_matching_methods_only(tmp_path, one_thread) -> None:
    args = [a if a != "random_real,dm" else "random_real,herding,dm" for a in ARGS]
    assert main(["--out", str(tmp_path), *args, "--set", "multires=0.6", "precision=bf16"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["options"] == {"multires": "0.6", "precision": "bf16"}
    settings = {r["method"]: r["settings"] for r in report["runs"]}
    assert settings["dm"]["multires"] == 0.6 and settings["dm"]["precision"] == "bf16"
    assert "multires" not in settings["random_real"] and "precision" not in settings["herding"]
    assert "Options (`--set`, every method but random_real and herding): `multires=0.6`, `precision=bf16`." \
        in (tmp_path / "report.md").read_text()
    # the option reached the distillation: bf16 autocast gives another dm summary than fp32
    plain = tmp_path / "plain"
    assert main(["--out", str(plain), *args, "--methods", "dm"]) == 0
    with_opts = [r for r in report["runs"] if r["method"] == "dm"]
    without = json.loads((plain / "report.json").read_text())["runs"]
    assert [r["loss"] for r in with_opts] != [r["loss"] for r in without]


def test_published_figures_follow_the_dataset() -> None:
    assert published_for("mnist5k") is published_for("mnist")
    assert published_for("mnist").figures["DC"] == {1: 91.7, 10: 97.4}
    fashion = published_for("fashion-mnist")
    assert fashion.figures == {"DC": {1: 70.5, 10: 82.3, 50: 83.6}, "DSA": {1: 70.6, 10: 84.6, 50: 88.7},
                               "random real": {1: 51.4, 10: 73.8, 50: 82.5}}
    assert fashion.whole == 93.5
    assert published_for("digits") is None and published_for("cifar10") is None


def test_ceiling_and_wide_best_rows_and_published_figures_per_dataset(tmp_path, one_thread) -> None:
    assert main(["--out", str(tmp_path), *ARGS, "--ceiling", "2", "--wide-best"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    top = report["ceiling"]
    n = report["config"]["train_examples"]
    assert top["arch"] == "convnet" and top["images"] == n and top["epochs"] == 2
    assert top["steps"] == 2 * math.ceil(n / 256)  # the evaluation recipe's batch of 256, no minimum steps
    assert 0.0 <= top["accuracy"] <= 1.0 and top["seconds"] > 0 and top["cpu_seconds"] > 0
    table = report["results"]["1"]
    best = max(table, key=lambda m: table[m]["accuracy"]["convnet"]["mean"])
    wide = report["wide_best"]["1"]
    assert wide["method"] == best and wide["width"] == WIDE and wide["narrow_width"] == 16  # quick preset
    assert wide["narrow_accuracy"] == table[best]["accuracy"]["convnet"]["values"][0]
    assert 0.0 <= wide["accuracy"] <= 1.0
    assert table["dm"]["iterations"] == 10 and table["random_real"]["iterations"] == 0
    assert table["dm"]["distill_cpu_seconds"]["mean"] > 0

    md = (tmp_path / "report.md").read_text()
    assert f"**{100 * top['accuracy']:.1f}%** test accuracy" in md and "published:" not in md  # digits
    assert "| dm | " in md and " | 10 | " in md  # the iterations column
    # the same report under other dataset names: the matching published figures, none for digits
    report["config"]["dataset"] = "fashion-mnist"
    fashion = markdown(report)
    assert "Published at IPC 1 (Fashion-MNIST" in fashion and "DC 70.5, DSA 70.6, random real 51.4" in fashion
    assert "; published: 93.5." in fashion and "91.7" not in fashion
    report["config"]["dataset"] = "mnist5k"
    mnist = markdown(report)
    assert "DC 91.7, DSA 88.7, DM 89.7" in mnist and "70.5" not in mnist and "published:" not in mnist


def test_fmnist_tuning_resolves_for_every_method_and_ipc(tmp_path) -> None:
    methods = "random_real,herding,dm,gm,mtt"
    argv = ["--preset", "fmnist", "--methods", methods, "--ipc", "1,10,50", "--out", str(tmp_path / "o")]
    cfg, budget, names, ipcs, _, _ = plan(build_parser().parse_args(argv))
    assert cfg.dataset == "fashion-mnist" and cfg.normalisation == "public"  # the fmnist run preset
    assert names == methods.split(",") and ipcs == [1, 10, 50]
    tuning = TUNING["fmnist"]
    assert budget.note == tuning.note
    assert budget.train == run_preset("fmnist").train
    for method in ("dm", "gm", "mtt"):
        for ipc in ipcs:
            want = {**tuning.methods[method], **tuning.per_ipc.get((method, ipc), {})}
            got = budget.config(method, ipc, seed=0, device="cpu")
            assert {k: getattr(got, k) for k in want} == want and got.ipc == ipc
    # flags still win over the tuning's training settings
    cfg, budget, *_ = plan(build_parser().parse_args([*argv, "--set", "train-min-steps=7"]))
    assert budget.train.min_steps == 7
