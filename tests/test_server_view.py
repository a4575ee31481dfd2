"""The server-view attacks on generated data, where the answer is known."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from ddcore.data import Dataset
from ddcore.errors import ConfigError
from ddcore.runconfig import from_flat
from ddcore.summary import Summary
from privacy.attacks.server_view import (
    class_reference,
    dp_bound_check,
    image_view,
    membership_summary,
    tracing_scores,
    update_scores,
)


def pixels(n: int, seed: int, size: int = 8) -> Dataset:
    """``n`` random images in [0, 1] (mean 0.5 / std 0.25 normalisation), 4 classes."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand((n, 1, size, size), generator=g) - 0.5) / 0.25
    return Dataset(x, torch.arange(n) % 4, 4, (0.5,), (0.25,), f"pixels{seed}")


def test_image_view_finds_exactly_the_copied_share_and_its_members() -> None:
    private, heldout = pixels(400, 0), pixels(400, 1)
    g = torch.Generator().manual_seed(2)
    copied = torch.randperm(400, generator=g)[:30]
    copies = private.x[copied] + 1e-3 * torch.randn((30, 1, 8, 8), generator=g)  # moved a little: copies
    fresh = pixels(70, 3).x  # images of no record
    received = torch.cat([copies, fresh])
    # the data's own threshold (1st percentile of records' nearest-neighbour distances) finds every copy;
    # a fresh image may sit that close to a record by chance (about 1 in 100 do, by its definition)
    assert 30 <= image_view(received, private, heldout)["near_copies"] <= 33
    view = image_view(received, private, heldout, threshold=0.05)  # copies sit ~0.002 from their record
    assert view["near_copies"] == 30 and view["near_copy_fraction"] == pytest.approx(0.3)
    assert view["received_images"] == 100
    # the 30 copied records score ~0 (distance 0), above every held-out record: found at no false positive
    assert view["tpr_at_0.1pct_fpr"] == pytest.approx(30 / 400)
    assert view["sent_share"] == pytest.approx(30 / 400)
    clean = image_view(fresh, private, heldout, threshold=0.05)
    assert clean["near_copies"] == 0 and clean["tpr_at_0.1pct_fpr"] < 0.02 and 0.4 < clean["auc"] < 0.6


def gaussian_release(n: int, dim: int, sigma: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tracing scores of ``n`` members and 2,000 non-members (unit-norm features of one class) against
    the mean of the members' sum released with N(0, sigma^2) noise per coordinate."""
    g = torch.Generator().manual_seed(seed)

    def records(k: int) -> torch.Tensor:
        f = torch.randn((k, dim), generator=g)
        return f / f.norm(dim=1, keepdim=True)

    members, nonmembers, reference = records(n), records(2000), records(2000)
    released = (members.sum(0) + sigma * torch.randn(dim, generator=g)) / n
    zeros = torch.zeros(n + 2000, dtype=torch.long)
    scores = tracing_scores(torch.cat([members, nonmembers]), zeros, released[None],
                            class_reference(reference, zeros[:2000], 1))
    return scores[:n], scores[n:]


def test_tracing_attack_traces_an_exact_release_and_dp_keeps_it_under_the_bound() -> None:
    from privacy.single_release import release_plan

    # exact sums of 50 records in 2,000 dimensions: every member stands out (Dwork et al.'s regime)
    member, nonmember = gaussian_release(50, 2000, sigma=0.0, seed=0)
    exact = membership_summary(member, nonmember)
    assert exact["auc"] > 0.99 and exact["tpr_at_0.1pct_fpr"] > 0.9
    check = dp_bound_check(member, nonmember, epsilon=1.0, delta=1e-5)
    assert not check["holds"] and check["violations"] > 0  # the check can fail: a non-DP release breaks it
    # the same release under the Gaussian mechanism calibrated for epsilon 1 (sensitivity 1 per record)
    plan = release_plan(target_epsilon=1.0, delta=1e-5, max_norm=1.0, num_examples=50)
    member, nonmember = gaussian_release(50, 2000, sigma=plan.noise_multiplier, seed=0)
    noisy = dp_bound_check(member, nonmember, epsilon=1.0, delta=1e-5)
    assert noisy["holds"] and noisy["violations"] == 0
    assert membership_summary(member, nonmember)["auc"] < exact["auc"]


def test_dp_bound_check_on_scores_of_known_privacy() -> None:
    g = torch.Generator().manual_seed(0)
    # Gaussian scores shifted by mu are mu-GDP; mu = 0.2 is (1, ~1e-8)-DP, mu = 3 is not (1, 1e-5)-DP
    out = torch.randn(20_000, generator=g)
    for mu, holds in ((0.2, True), (3.0, False)):
        member = mu + torch.randn(20_000, generator=g)
        check = dp_bound_check(member, out, epsilon=1.0, delta=1e-5)
        assert check["holds"] is holds, (mu, check)
    assert dp_bound_check(3 + out, out, epsilon=math.inf, delta=1e-5)["holds"]


def test_update_attack_sees_the_records_a_client_trained_on() -> None:
    from ddcore.config import TrainConfig
    from ddcore.models import ModelSpec, build_model
    from ddcore.train import train_model
    from tests.conftest import blobs

    data = blobs(n_per_class=40, num_classes=4, seed=0)
    members, nonmembers = data.subset(torch.arange(0, 160, 2)), data.subset(torch.arange(1, 160, 2))
    # labels the members alone carry (shuffled): only training on them lowers their loss
    def shuffled(d: Dataset, seed: int) -> Dataset:
        return replace(d, y=d.y[torch.randperm(len(d), generator=torch.Generator().manual_seed(seed))])

    members, nonmembers = shuffled(members, 1), shuffled(nonmembers, 2)
    spec = ModelSpec(width=8)
    before = build_model(spec, data.image_shape, 4, torch.Generator().manual_seed(0))
    after = build_model(spec, data.image_shape, 4, torch.Generator().manual_seed(0))
    recipe = TrainConfig(epochs=60, lr=0.05, dsa_strategy="none", min_steps=0, batch_size=16)
    train_model(after, members.x, members.y, recipe, torch.Generator().manual_seed(3))
    result = membership_summary(update_scores(before, after, members),
                                update_scores(before, after, nonmembers))
    assert result["auc"] > 0.75  # 0.5 = guessing; the update gives its records away


def test_client_guard_drops_exactly_the_images_near_its_records() -> None:
    from client.task import drop_near_copies

    private = pixels(200, 0)
    fresh = pixels(6, 5)
    images = torch.cat([private.x[:4] + 1e-3, fresh.x])
    summary = Summary(images, torch.arange(10) % 4, None, {"method": "dm"})
    kept = drop_near_copies(summary, private)
    assert len(kept) == 6 and kept.meta["near-copies-dropped"] == 4
    assert torch.equal(kept.images, fresh.x)
    assert drop_near_copies(Summary(fresh.x, torch.arange(6) % 4), private).meta["near-copies-dropped"] == 0


@pytest.mark.parametrize("flat, says", [
    ({"init": "real"}, "init='real' starts every image from a private record"),
    ({"method": "random_real"}, "method 'random_real' sends real records"),
    ({"method": "herding"}, "method 'herding' sends real records"),
    ({"residual-alpha": 0.5}, "residual mixing"),
])
def test_runs_that_would_send_private_records_need_the_flag(flat, says) -> None:
    with pytest.raises(ConfigError, match=says):
        from_flat(flat).check_sends_no_record()
    from_flat({**flat, "allow-near-copies": True}).check_sends_no_record()
    from_flat({**flat, "summary-kind": "statistics"}).check_sends_no_record()  # sends no image


def test_default_compare_systems_send_no_private_record_unless_they_exist_to() -> None:
    from ddcore.runconfig import run_preset
    from simulations.compare import SYSTEMS, plan_systems

    for preset in ("default", "fmnist", "quick"):
        cfg = replace(run_preset(preset), fedavg_rounds=1)
        allowed = {s.name for s in plan_systems(cfg, list(SYSTEMS)) if s.cfg.allow_near_copies}
        assert allowed == {"random_real", "distill_real"}, preset
        assert run_preset(preset).distill.init == "noise"


def test_per_client_attacks_compare_class_matched_records() -> None:
    """A client's label mix alone must not read as membership: an update trained on classes 0 and 1
    lowers the loss of *unseen* records of those classes too, and only class matching tells."""
    from ddcore.config import TrainConfig
    from ddcore.models import ModelSpec, build_model
    from ddcore.train import train_model
    from privacy.server_audit import matched
    from tests.conftest import blobs

    data = blobs(n_per_class=60, num_classes=4, seed=0)
    two = (data.y < 2).nonzero().flatten()
    trained, unseen = data.subset(two[::2]), data.subset(two[1::2])  # unseen: same classes, not trained on
    heldout = blobs(n_per_class=60, num_classes=4, seed=1)  # every class
    before = build_model(ModelSpec(width=8), data.image_shape, 4, torch.Generator().manual_seed(0))
    after = build_model(ModelSpec(width=8), data.image_shape, 4, torch.Generator().manual_seed(0))
    recipe = TrainConfig(epochs=20, lr=0.05, dsa_strategy="none", min_steps=0, batch_size=16)
    train_model(after, trained.x, trained.y, recipe, torch.Generator().manual_seed(3))
    naive = membership_summary(update_scores(before, after, unseen), update_scores(before, after, heldout))
    assert naive["auc"] > 0.7  # the class mix alone looks like membership
    a, b = matched(unseen, heldout, 1000, torch.Generator().manual_seed(4))
    assert torch.equal(torch.bincount(a.y, minlength=4), torch.bincount(b.y, minlength=4))
    fair = membership_summary(update_scores(before, after, a), update_scores(before, after, b))
    assert abs(fair["auc"] - 0.5) < 0.15  # no member among them: matched, the attack is near guessing


def test_under_secure_aggregation_the_sum_alone_is_attacked_and_its_dp_bound_checked() -> None:
    """The server of a SecAgg+ run holds the sum: tracing runs on it with every client's records."""
    from ddcore.models import model_factory
    from ddcore.runconfig import run_preset, run_splits
    from privacy.class_release import noisy_release
    from privacy.received import Received
    from privacy.server_audit import statistics_view
    from privacy.single_release import calibrate_gaussian
    from privacy.statistics import bank_of, public_sums

    cfg = from_flat({"dataset": "digits", "summary-kind": "statistics", "bank-size": 2},
                    base=run_preset("quick"))
    splits = run_splits(cfg)
    bank = bank_of(model_factory(cfg.distill.model, splits.train.image_shape, 10), cfg.distill,
                   splits.train.image_shape)
    exact = public_sums(splits.train, bank)
    sigma = calibrate_gaussian(target_epsilon=1.0, delta=1e-5)
    noisy = noisy_release(exact.sums, exact.counts, max_norm=1.0, noise_multiplier=sigma,
                          generator=torch.Generator().manual_seed(0))
    view = statistics_view(cfg, Received(total=noisy), splits, samples=300,
                           generator=torch.Generator().manual_seed(1), epsilons={0: 1.0}, delta=1e-5)
    assert view["per_client"] == [] and "secure sum" in view["attack"]
    total = view["total"]
    assert total["members"] == total["nonmembers"] >= 150 and total["dp_bound"]["epsilon"] == 1.0
    assert view["dp_bound_holds"] and view["auc"] == view["total"]["auc"]
    # without noise the sum of every client's records is attacked, and no bound is claimed
    plain = statistics_view(cfg, Received(total=exact), splits, samples=300,
                            generator=torch.Generator().manual_seed(1), epsilons={}, delta=1e-5)
    assert plain["total"]["dp_bound"] is None and 0.0 <= plain["auc"] <= 1.0
