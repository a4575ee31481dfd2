"""Accounting: calibration hits the target, the reported epsilon is Opacus's and an independent one's."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant

from privacy.accounting import Accountant, DPPlan, calibrate_noise, check_budget
from privacy.errors import DeltaTooLargeError, InvalidPrivacyParameterError, PrivacyError

dp_accounting = pytest.importorskip("dp_accounting")


def google_rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """epsilon from Google's dp-accounting RDP accountant (an independent implementation)."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    acc = dp_accounting.rdp.RdpAccountant(orders)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(event, steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("q, sigma, steps, delta", [
    (0.01, 1.1, 1000, 1e-5),
    (0.25, 3.0, 200, 1e-5),
    (0.05, 0.8, 50, 1e-6),
])
def test_epsilon_is_opacus_rdp_and_agrees_with_dp_accounting(q, sigma, steps, delta) -> None:
    acc = Accountant()
    acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    ours = acc.epsilon(delta)
    reference = RDPAccountant()
    reference.history = [(sigma, q, steps)]
    assert ours == pytest.approx(reference.get_epsilon(delta), rel=1e-12)
    google = google_rdp_epsilon(q, sigma, steps, delta)
    assert abs(ours - google) <= 0.05 * google, (ours, google)


@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibrated_sigma_spends_the_target_and_no_more(target) -> None:
    q, steps, delta = 0.1, 300, 1e-5
    plan = DPPlan.calibrate(target_epsilon=target, delta=delta, max_grad_norm=1.0, sample_rate=q,
                            steps=steps, num_examples=5000)
    acc = Accountant()
    acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=q, num_steps=steps)
    spent = acc.epsilon(delta)
    assert 0.95 * target <= spent <= target
    assert abs(spent - google_rdp_epsilon(q, plan.noise_multiplier, steps, delta)) <= 0.05 * spent
    # more noise is needed for a smaller budget
    assert calibrate_noise(target_epsilon=target / 2, delta=delta, sample_rate=q, steps=steps) > \
        plan.noise_multiplier


def test_state_dict_resumes_accounting_across_rounds() -> None:
    whole = Accountant()
    whole.step(noise_multiplier=1.3, sample_rate=0.02, num_steps=60)
    first = Accountant()
    first.step(noise_multiplier=1.3, sample_rate=0.02, num_steps=30)
    resumed = Accountant()
    resumed.load_state_dict(first.state_dict())
    resumed.step(noise_multiplier=1.3, sample_rate=0.02, num_steps=30)
    assert resumed.steps == 60
    assert resumed.epsilon(1e-5) == pytest.approx(whole.epsilon(1e-5), rel=1e-12)
    assert resumed.epsilon(1e-5) > first.epsilon(1e-5)


def test_infinite_epsilon_means_no_noise_and_is_reported_as_inf() -> None:
    assert calibrate_noise(target_epsilon=math.inf, delta=1e-5, sample_rate=0.1, steps=10) == 0.0
    acc = Accountant()
    acc.step(noise_multiplier=2.0, sample_rate=0.1, num_steps=5)
    acc.step(noise_multiplier=0.0, sample_rate=0.1)
    assert acc.epsilon(1e-5) == math.inf and acc.steps == 6


@pytest.mark.parametrize("kwargs, error, words", [
    ({"target_epsilon": 0.0}, InvalidPrivacyParameterError, "epsilon must be > 0"),
    ({"target_epsilon": -1.0}, InvalidPrivacyParameterError, "epsilon must be > 0"),
    ({"delta": 0.0}, InvalidPrivacyParameterError, "delta must be in (0, 1)"),
    ({"delta": 1.0}, InvalidPrivacyParameterError, "delta must be in (0, 1)"),
    ({"max_grad_norm": 0.0}, InvalidPrivacyParameterError, "max-grad-norm"),
    ({"delta": 0.01, "num_examples": 200}, DeltaTooLargeError, "use delta < 1/n"),
])
def test_bad_budgets_are_refused_with_the_fix(kwargs, error, words) -> None:
    args = {"target_epsilon": 1.0, "delta": 1e-5, "max_grad_norm": 1.0, "num_examples": None, **kwargs}
    with pytest.raises(error, match=None) as info:
        check_budget(**args)
    assert words in str(info.value)
    assert isinstance(info.value, PrivacyError) and isinstance(info.value, ValueError)


def test_unreachable_epsilon_names_the_fix() -> None:
    with pytest.raises(InvalidPrivacyParameterError, match="raise the target epsilon"):
        calibrate_noise(target_epsilon=1e-3, delta=1e-5, sample_rate=0.5, steps=1000)


def google_pld_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """epsilon from dp-accounting's privacy-loss-distribution accountant (tight, independent)."""
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("q, sigma, steps, delta", [
    (0.01, 1.1, 1000, 1e-5),
    (0.25, 3.0, 200, 1e-5),
])
def test_prv_epsilon_agrees_with_dp_accounting_pld_and_is_below_rdp(q, sigma, steps, delta) -> None:
    prv, rdp = Accountant("prv"), Accountant("rdp")
    for acc in (prv, rdp):
        acc.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    pld = google_pld_epsilon(q, sigma, steps, delta)
    assert abs(prv.epsilon(delta) - pld) <= 0.05 * pld, (prv.epsilon(delta), pld)
    assert prv.epsilon(delta) < rdp.epsilon(delta)  # RDP's conversion overstates the spend


def test_prv_calibration_spends_the_target_with_less_noise_and_resumes_from_its_state() -> None:
    q, steps, delta = 0.05, 400, 1e-5
    plans = {kind: DPPlan.calibrate(target_epsilon=2.0, delta=delta, max_grad_norm=1.0, sample_rate=q,
                                    steps=steps, num_examples=5000, accountant=kind)
             for kind in ("rdp", "prv")}
    assert plans["prv"].accountant == "prv" and plans["prv"].noise_multiplier < plans["rdp"].noise_multiplier
    half = Accountant("prv")
    half.step(noise_multiplier=plans["prv"].noise_multiplier, sample_rate=q, num_steps=steps // 2)
    resumed = Accountant("prv")
    resumed.load_state_dict(half.state_dict())
    resumed.step(noise_multiplier=plans["prv"].noise_multiplier, sample_rate=q, num_steps=steps // 2)
    spent = resumed.epsilon(delta)
    assert 0.95 * 2.0 <= spent <= 2.0
    assert abs(spent - google_pld_epsilon(q, plans["prv"].noise_multiplier, steps, delta)) <= 0.05 * spent
    with pytest.raises(InvalidPrivacyParameterError, match="unknown accountant 'gdp'"):
        Accountant("gdp")
