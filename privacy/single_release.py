"""Accounting for one Gaussian release: the analytic Gaussian mechanism (Balle & Wang 2018), exact.

A vector of L2 sensitivity ``C`` released once with ``N(0, (sigma C)^2)`` noise on every entry
(no subsampling, no composition) is (epsilon, delta)-DP exactly when (Theorem 8 of Balle &
Wang, "Improving the Gaussian mechanism for differential privacy", ICML 2018)

    delta(epsilon) = Phi(1 / (2 sigma) - epsilon sigma) - e^epsilon Phi(-1 / (2 sigma) - epsilon sigma)

is at most ``delta``. This curve is the mechanism's true privacy profile, so both directions -
epsilon of a given sigma, and the least sigma for a target epsilon - are tight, unlike RDP's
conversion (about 10% looser in epsilon at sigma ~ 4, delta 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from scipy.special import log_ndtr, ndtr

from privacy.accounting import DPPlan, check_budget
from privacy.errors import InvalidPrivacyParameterError, PrivacyError

NAME = "analytic-gaussian"  # recorded as the summary's ``accountant``
_BISECTIONS = 200  # enough for float precision on any bracket used here


def gaussian_delta(*, epsilon: float, noise_multiplier: float) -> float:
    """The least delta one release with noise multiplier ``sigma`` achieves at ``epsilon``."""
    if not (epsilon >= 0 and noise_multiplier > 0):
        raise InvalidPrivacyParameterError(
            f"need epsilon >= 0 and sigma > 0, got {epsilon}, {noise_multiplier}")
    if math.isinf(epsilon):
        return 0.0
    s = noise_multiplier
    a, b = 1 / (2 * s) - epsilon * s, -1 / (2 * s) - epsilon * s
    return max(0.0, float(ndtr(a)) - math.exp(epsilon + float(log_ndtr(b))))  # e^eps Phi(b) in log space


def gaussian_epsilon(*, noise_multiplier: float, delta: float) -> float:
    """The least epsilon one release with noise multiplier ``sigma`` achieves at ``delta``.

    ``sigma = 0`` (no noise) gives inf.
    """
    if not 0 < delta < 1 or noise_multiplier < 0:
        raise InvalidPrivacyParameterError(
            f"need delta in (0, 1) and sigma >= 0, got {delta}, {noise_multiplier}; e.g. delta 1e-5")
    if noise_multiplier == 0:
        return math.inf
    if gaussian_delta(epsilon=0.0, noise_multiplier=noise_multiplier) <= delta:
        return 0.0
    return _least(lambda eps: gaussian_delta(epsilon=eps, noise_multiplier=noise_multiplier) <= delta)


def calibrate_gaussian(*, target_epsilon: float, delta: float) -> float:
    """The least noise multiplier sigma whose one release is (``target_epsilon``, ``delta``)-DP.

    ``target_epsilon = inf`` gives 0 (no noise). Any epsilon > 0 is reachable.
    """
    if not (target_epsilon > 0 and 0 < delta < 1):
        raise InvalidPrivacyParameterError(
            f"need target epsilon > 0 and delta in (0, 1), got {target_epsilon}, {delta}; e.g. 1 and 1e-5")
    if math.isinf(target_epsilon):
        return 0.0
    return _least(lambda sigma: gaussian_delta(epsilon=target_epsilon, noise_multiplier=sigma) <= delta)


def _least(holds: Callable[[float], bool]) -> float:
    """The least x > 0 (to float precision) where ``holds(x)``, for ``holds`` false below it, true above."""
    lo, hi = 0.0, 1.0
    while not holds(hi):
        lo, hi = hi, 2 * hi
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if holds(mid) else (mid, hi)
    return hi


class SingleReleaseAccountant:
    """The accountant of a mechanism that releases exactly once, without subsampling.

    Same reading interface as :class:`privacy.accounting.Accountant` (``steps``, ``epsilon``,
    ``state_dict``), so :func:`privacy.record.privacy_record` reads either; a second release,
    or a subsampled one, is refused rather than mis-accounted.
    """

    name = NAME

    def __init__(self) -> None:
        self._sigma: float | None = None

    def step(self, *, noise_multiplier: float, sample_rate: float = 1.0, num_steps: int = 1) -> None:
        """Record the one release (noise multiplier ``sigma``, every record in it)."""
        if noise_multiplier < 0 or sample_rate != 1.0 or num_steps != 1:
            raise InvalidPrivacyParameterError(
                f"a single release has sigma >= 0, sample rate 1 and 1 step; got {noise_multiplier}, "
                f"{sample_rate}, {num_steps} - use privacy.accounting.Accountant for repeated releases")
        if self._sigma is not None:
            raise PrivacyError("the release was already made; a second one would need composition - "
                               "release once and post-process, or use privacy.accounting.Accountant")
        self._sigma = float(noise_multiplier)

    @property
    def steps(self) -> int:
        """1 after the release, 0 before."""
        return int(self._sigma is not None)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent at ``delta``: 0 before the release, inf if it had no noise."""
        if self._sigma is None:
            return 0.0
        return gaussian_epsilon(noise_multiplier=self._sigma, delta=delta)

    def state_dict(self) -> dict[str, float | int]:
        """Plain values (fit a Flower ConfigRecord)."""
        return {"released": self.steps, "sigma": self._sigma or 0.0}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._sigma = float(state["sigma"]) if int(state["released"]) else None


def release_plan(*, target_epsilon: float, delta: float, max_norm: float, num_examples: int) -> DPPlan:
    """Check the budget and calibrate sigma for one release (sample rate 1, 1 step).

    Raises
    ------
    InvalidPrivacyParameterError, DeltaTooLargeError
        As :func:`privacy.accounting.check_budget`.
    """
    check_budget(target_epsilon=target_epsilon, delta=delta, max_grad_norm=max_norm,
                 num_examples=num_examples)
    sigma = calibrate_gaussian(target_epsilon=target_epsilon, delta=delta)
    return DPPlan(sigma, max_norm, 1.0, 1, delta, target_epsilon)
