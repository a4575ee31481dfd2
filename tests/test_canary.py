"""One-run canary audit on known answers: a copying release, the Gaussian mechanism, edge cases."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from ddcore.config import TrainConfig
from ddcore.models import ModelSpec, build_model
from ddcore.train import train_model
from privacy.attacks.canary import (
    canary_audit,
    default_guess_grid,
    distance_scores,
    epsilon_lower_bound,
    guess,
    insert_canaries,
    loss_scores,
    make_canaries,
    max_certifiable_epsilon,
)
from privacy.attacks.canary_bound import p_value
from privacy.errors import AuditError, PrivacyError

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
M = 1000

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon at ``delta`` of the Gaussian mechanism of sensitivity 1 (Balle & Wang 2018, Thm 8)."""

    def gap(eps: float) -> float:
        # delta(eps) = Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma)
        return norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma) \
            - delta

    return brentq(gap, 0.0, 200.0)


def inclusion(seed: int, m: int = M) -> torch.Tensor:
    return torch.rand(m, generator=torch.Generator().manual_seed(seed)) < 0.5


def test_p_value_is_the_papers_formula_on_a_small_case() -> None:
    m, r, v, eps, delta = 50, 10, 8, 1.0, 1e-3
    q = math.exp(eps) / (1 + math.exp(eps))

    def tail(k: int) -> float:  # P[Binomial(r, q) >= k], summed by hand
        return sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(max(k, 0), r + 1))

    alpha = max((tail(v - i) - tail(v)) / i for i in range(1, m + 1))
    assert p_value(m, r, v, eps, 0.0) == pytest.approx(tail(v), rel=1e-9)
    assert p_value(m, r, v, eps, delta) == pytest.approx(tail(v) + 2 * m * delta * alpha, rel=1e-9)


def test_perfect_guesses_certify_what_the_closed_form_says() -> None:
    q = 0.05 ** (1 / 100)  # delta = 0: q^r = beta
    assert max_certifiable_epsilon(100, 100, 0.0, 0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert 3.4 < max_certifiable_epsilon(1000, 100, DELTA, 0.05) < 3.5  # "100 guesses certify ~3.5"
    # more guesses certify more; delta costs a little
    assert max_certifiable_epsilon(1000, 1000, DELTA) > max_certifiable_epsilon(1000, 100, DELTA)
    assert max_certifiable_epsilon(1000, 1000, DELTA) < max_certifiable_epsilon(1000, 1000, 0.0)


def test_a_release_that_copies_its_input_is_caught() -> None:
    included = inclusion(0)
    result = canary_audit(included.float(), included, delta=DELTA)  # score 1 = "in the released set"
    assert result.eps_lower_bound >= 2, result
    assert result.correct == result.guesses and result.grid_size == len(default_guess_grid(M))
    assert result.eps_lower_bound <= result.max_certifiable


def test_a_summary_that_copies_the_canaries_is_caught_by_distance(tiny) -> None:
    canaries = make_canaries(tiny, M, kind="noise", seed=1)
    scores = distance_scores(canaries, canaries.inserted().x)  # the "summary" is the inserted set
    assert torch.all(scores[canaries.included] == 0) and torch.all(scores[~canaries.included] < 0)
    assert canary_audit(scores, canaries.included, delta=DELTA).eps_lower_bound >= 2


def test_the_gaussian_accountant_of_the_test_agrees_with_dp_accounting() -> None:
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.0))
    assert gaussian_epsilon(1.0, DELTA) == pytest.approx(accountant.get_epsilon(DELTA), abs=0.01)


@pytest.mark.parametrize(("sigma", "least"), [(1.0, 0.8), (2.0, 0.1)])
def test_the_gaussian_mechanism_is_never_over_certified(sigma: float, least: float) -> None:
    true_eps = gaussian_epsilon(sigma, DELTA)  # 4.38 for sigma 1, 1.99 for sigma 2
    bounds = []
    for seed in range(20):
        included = inclusion(seed)
        noise = torch.randn(M, generator=torch.Generator().manual_seed(1000 + seed))
        bounds.append(canary_audit(included.float() + sigma * noise, included, delta=DELTA).eps_lower_bound)
    assert max(bounds) < true_eps, (max(bounds), true_eps)
    assert min(bounds) > least, bounds  # the audit sees the signal, not just a valid 0


def test_scores_that_ignore_the_canaries_certify_nothing() -> None:
    # the scores' seed differs from the inclusion's: torch.randn and torch.rand of one seed correlate
    bounds = [canary_audit(torch.randn(M, generator=torch.Generator().manual_seed(1000 + s)), inclusion(s),
                           delta=DELTA).eps_lower_bound for s in range(10)]
    assert max(bounds) < 0.3, bounds


def test_a_model_that_memorised_mislabeled_canaries_is_caught(digits) -> None:
    canaries = make_canaries(digits.test, 200, kind="mislabeled", seed=0)
    train = insert_canaries(digits.train.subset(torch.arange(300)), canaries)
    g = torch.Generator().manual_seed(0)
    cfg = TrainConfig(epochs=100, lr=0.05, momentum=0.9, weight_decay=0.0, batch_size=50,
                      dsa_strategy="none", min_steps=0, lr_decay=False)
    spec = ModelSpec(name="mlp", width=64)
    model = train_model(build_model(spec, train.image_shape, train.num_classes, g), train.x, train.y, cfg, g)
    result = canary_audit(loss_scores(model, canaries), canaries.included, delta=DELTA)
    assert result.eps_lower_bound > 1.0, result


def test_canaries_are_seeded_half_included_and_never_correctly_labeled(digits) -> None:
    source = digits.test
    a, b = make_canaries(source, 300, seed=3), make_canaries(source, 300, seed=3)
    assert torch.equal(a.data.x, b.data.x) and torch.equal(a.included, b.included)
    assert not torch.equal(a.included, make_canaries(source, 300, seed=4).included)
    assert 0.4 < a.included.float().mean() < 0.6
    # each mislabeled canary is a source image under another label
    for x, y in zip(a.data.x[:20], a.data.y[:20], strict=True):
        match = (source.x == x).flatten(1).all(1)
        assert match.any() and torch.all(source.y[match] != y)
    inverted = make_canaries(source, 300, kind="inverted", seed=3)
    assert torch.allclose(source.denormalise(inverted.data.x), 1 - source.denormalise(a.data.x), atol=1e-5)
    noise = make_canaries(source, 50, kind="noise", seed=3)
    pixels = source.denormalise(noise.data.x)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    grown = insert_canaries(digits.train, a)
    assert len(grown) == len(digits.train) + int(a.included.sum())
    assert torch.equal(grown.x[len(digits.train):], a.data.x[a.included])


def test_guess_marks_top_in_bottom_out_and_abstains_between() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7])
    t = guess(scores, 2, 1, torch.Generator().manual_seed(0))
    assert t.tolist() == [-1, 1, 0, 0, 1]


def test_no_guesses_certify_zero() -> None:
    included = inclusion(0)
    result = canary_audit(included.float(), included, delta=DELTA, guesses=[(0, 0)])
    assert result.eps_lower_bound == 0.0 and result.guesses == 0 and result.correct == 0
    assert epsilon_lower_bound(10, 0, 0, delta=DELTA) == 0.0


@pytest.mark.parametrize(("call", "message"), [
    (lambda: epsilon_lower_bound(10, 5, 5, delta=DELTA, beta=0.0), "beta"),
    (lambda: epsilon_lower_bound(10, 5, 5, delta=DELTA, beta=1.0), "beta"),
    (lambda: canary_audit(torch.zeros(4), torch.ones(4), delta=DELTA, beta=1.5), "beta"),
    (lambda: canary_audit(torch.zeros(4), torch.ones(4), delta=DELTA, guesses=[(3, 2)]), "k\\+ \\+ k- <= m"),
    (lambda: epsilon_lower_bound(0, 0, 0, delta=DELTA), "at least one canary"),
    (lambda: canary_audit(torch.zeros(0), torch.ones(0), delta=DELTA), "at least one canary"),
    (lambda: epsilon_lower_bound(10, 5, 6, delta=DELTA), "correct"),
    (lambda: epsilon_lower_bound(10, 5, 5, delta=1.0), "delta"),
    (lambda: canary_audit(torch.tensor([0.0, float("nan")]), torch.ones(2), delta=DELTA), "finite"),
])
def test_bad_arguments_are_audit_errors(call, message) -> None:
    assert issubclass(AuditError, PrivacyError)
    with pytest.raises(AuditError, match=message):
        call()


def test_bad_canary_requests_are_audit_errors(tiny) -> None:
    with pytest.raises(AuditError, match="at least one canary"):
        make_canaries(tiny, 0, seed=0)
    with pytest.raises(AuditError, match="known kinds"):
        make_canaries(tiny, 5, kind="glitter", seed=0)
    with pytest.raises(AuditError, match="held-out split or fewer canaries"):
        make_canaries(tiny, len(tiny) + 1, seed=0)


def test_the_canary_audit_never_imports_flower() -> None:
    code = ("import sys, privacy.attacks.canary, privacy.attacks.memorisation; "
            "assert 'flwr' not in sys.modules, 'flwr imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
