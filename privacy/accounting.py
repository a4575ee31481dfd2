"""Privacy accounting: noise calibration up front and an accountant that spans a whole run.

Two of Opacus's accountants for repeated Poisson-subsampled Gaussian releases: ``rdp`` (Renyi
DP, the default; an upper bound that overstates epsilon by a few percent to ~10%) and ``prv``
(privacy random variables, Gopi et al. 2021: the privacy-loss distribution composed numerically,
tight to ``eps_error``). Sigma is calibrated with the same accountant that reports the spend,
and every record names it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from ddcore.config import ACCOUNTANTS, DPConfig
from ddcore.errors import ConfigError
from privacy.errors import DeltaTooLargeError, InvalidPrivacyParameterError

# the default accountant of repeated (subsampled) releases - DP-GM, DP-SGD - is Opacus's RDP
# accountant ("prv" on request, DPConfig.accountant); one-release mechanisms (DP-DM, statistics)
# are accounted exactly ("analytic-gaussian", privacy.single_release).
ACCOUNTANT = "rdp"
PRV_EPS_ERROR = 0.01  # the PRV accountant's epsilon is an upper bound within this of the true one


def check_budget(*, target_epsilon: float, delta: float, max_grad_norm: float,
                 num_examples: int | None = None) -> None:
    """Refuse a privacy budget that is out of range; ``num_examples`` also bounds delta.

    Raises
    ------
    InvalidPrivacyParameterError
        epsilon <= 0, delta outside (0, 1), clip norm <= 0 or not finite.
    DeltaTooLargeError
        delta >= 1/n for a dataset of n examples (refused, not just warned about).
    """
    try:  # the same checks, and messages, as every DP setting gets (ddcore.config.DPConfig)
        DPConfig(enabled=True, target_epsilon=target_epsilon, delta=delta, max_grad_norm=max_grad_norm)
    except ConfigError as exc:
        raise InvalidPrivacyParameterError(str(exc)) from None
    if num_examples is not None and delta >= 1.0 / max(num_examples, 1):
        raise DeltaTooLargeError(
            f"delta {delta:g} >= 1/n = {1.0 / max(num_examples, 1):.3g} for a client of {num_examples} "
            f"examples: such a delta allows publishing whole records; use delta < 1/n, e.g. "
            f"{_suggest_delta(num_examples):g}")


def _suggest_delta(n: int) -> float:
    return 10.0 ** math.floor(math.log10(0.1 / max(n, 1)))


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = ACCOUNTANT) -> float:
    """The smallest noise multiplier sigma (Opacus's search, with ``accountant``) that spends
    ``target_epsilon``.

    ``target_epsilon = inf`` gives 0 (no noise); 0 steps need no noise either.
    """
    _check_kind(accountant)
    if not 0 < sample_rate <= 1:
        raise InvalidPrivacyParameterError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps < 0:
        raise InvalidPrivacyParameterError(f"steps must be >= 0, got {steps}")
    if math.isinf(target_epsilon) or steps == 0:
        return 0.0
    floor = epsilon_floor(delta) if accountant == "rdp" else 0.0
    if target_epsilon <= floor:
        raise InvalidPrivacyParameterError(
            f"epsilon {target_epsilon:g} is below {floor:.3g}, the least the RDP accountant can certify "
            f"at delta {delta:g} even with infinite noise; raise the target epsilon or delta")
    try:
        with warnings.catch_warnings():  # the search probes huge sigmas, where the largest order wins
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            extra = {"eps_error": PRV_EPS_ERROR} if accountant == "prv" else {}
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=accountant,
                                              **extra))
    except ValueError as exc:  # Opacus gives up past its largest sigma
        raise InvalidPrivacyParameterError(
            f"no noise level reaches epsilon {target_epsilon:g} at delta {delta:g} with {steps} steps at "
            f"sample rate {sample_rate:.3g} ({exc}); raise the target epsilon or use fewer steps"
        ) from None


def _check_kind(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise InvalidPrivacyParameterError(f"unknown accountant {accountant!r}; "
                                           f"known: {', '.join(ACCOUNTANTS)}")


def epsilon_floor(delta: float) -> float:
    """The epsilon Opacus's RDP-to-(epsilon, delta) conversion gives for zero RDP (sigma -> inf)."""
    return min(math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
               for a in RDPAccountant.DEFAULT_ALPHAS)


@dataclass(frozen=True)
class DPPlan:
    """The mechanism's parameters, fixed before any private data is touched."""

    noise_multiplier: float  # sigma: noise std is sigma * max_grad_norm
    max_grad_norm: float  # per-sample clipping norm C
    sample_rate: float  # Poisson sampling probability q of each example per step
    steps: int  # releases of a noisy sum over the whole run
    delta: float
    target_epsilon: float
    accountant: str = ACCOUNTANT  # which accountant calibrated sigma (and must report the spend)

    @staticmethod
    def calibrate(*, target_epsilon: float, delta: float, max_grad_norm: float, sample_rate: float,
                  steps: int, num_examples: int, accountant: str = ACCOUNTANT) -> DPPlan:
        """Check the budget and choose sigma so that ``steps`` steps spend ``target_epsilon``."""
        check_budget(target_epsilon=target_epsilon, delta=delta, max_grad_norm=max_grad_norm,
                     num_examples=num_examples)
        sigma = calibrate_noise(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                                steps=steps, accountant=accountant)
        return DPPlan(sigma, max_grad_norm, sample_rate, steps, delta, target_epsilon, accountant)


class Accountant:
    """Opacus's RDP or PRV accountant with the zero-noise case (epsilon = inf) and saveable state."""

    def __init__(self, kind: str = ACCOUNTANT) -> None:
        _check_kind(kind)
        self.name = kind  # recorded as a summary's ``accountant``
        self._opacus = RDPAccountant() if kind == "rdp" else PRVAccountant()
        self._noiseless_steps = 0

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` releases of a Poisson-subsampled Gaussian mechanism."""
        if noise_multiplier < 0 or not 0 < sample_rate <= 1 or num_steps < 0:
            raise InvalidPrivacyParameterError(
                f"bad accountant step: sigma {noise_multiplier}, q {sample_rate}, steps {num_steps}")
        if noise_multiplier == 0:
            self._noiseless_steps += num_steps
            return
        for _ in range(num_steps):
            self._opacus.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    @property
    def steps(self) -> int:
        """All steps recorded so far."""
        return self._noiseless_steps + sum(int(n) for _, _, n in self._opacus.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (inf after any step without noise, 0 before any step)."""
        if self._noiseless_steps:
            return math.inf
        if not self._opacus.history:
            return 0.0
        if self.name == "prv":
            return float(self._opacus.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
        return float(self._opacus.get_epsilon(delta=delta))

    def state_dict(self) -> dict[str, list[float] | int]:
        """Plain lists and ints (fits a Flower ConfigRecord) to resume accounting later."""
        history = self._opacus.history
        return {"sigmas": [float(s) for s, _, _ in history],
                "sample-rates": [float(q) for _, q, _ in history],
                "counts": [int(n) for _, _, n in history],
                "noiseless-steps": self._noiseless_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (replacing the current history)."""
        sigmas, rates, counts = state["sigmas"], state["sample-rates"], state["counts"]
        if not len(sigmas) == len(rates) == len(counts):
            raise InvalidPrivacyParameterError("accountant state lists have different lengths")
        self._opacus.history = [(float(s), float(q), int(n)) for s, q, n in zip(sigmas, rates, counts,
                                                                              strict=True)]
        self._noiseless_steps = int(state["noiseless-steps"])
