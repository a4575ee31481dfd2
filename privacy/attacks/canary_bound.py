"""The one-run audit's statistics: from (m canaries, r guesses, v correct) to an epsilon lower bound."""

from __future__ import annotations

import numpy as np
from scipy.special import expit
from scipy.stats import binom

from privacy.errors import AuditError

BISECTION_STEPS = 40  # the bound is exact to eps_max / 2**40


def _check(m: int, r: int, v: int, delta: float, beta: float) -> None:
    if m < 1:
        raise AuditError(f"the audit needs at least one canary, got m = {m}; insert m >= 1 canaries")
    if not 0 <= v <= r <= m:
        raise AuditError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m}); guess on at most "
                         f"the m canaries and count only the guesses made")
    if not 0.0 <= delta < 1.0:
        raise AuditError(f"delta must be in [0, 1), got {delta}; use the delta the run was accounted at")
    if not 0.0 < beta < 1.0:
        raise AuditError(f"beta (1 - confidence) must be in (0, 1), got {beta}; e.g. 0.05 for 95% confidence")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Largest probability that an (epsilon, delta)-DP run lets ``r`` guesses get ``v`` or more right.

    Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
    Theorem 5.2 (and the code of their appendix): with each of the ``m`` canaries included
    independently with probability 1/2 and W the number of correct guesses among r,

        P[W >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i,
        f(k) = P[Binomial(r, q) >= k],   q = e^eps / (1 + e^eps).

    ``f(v - i) - f(v)`` is the sum of the Binomial pmf at v - 1, ..., v - i. The result is
    capped at 1. Arguments are not checked here; :func:`epsilon_lower_bound` checks them.
    """
    q = float(expit(epsilon))  # e^eps / (1 + e^eps), without overflow
    tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if v > 0 and delta > 0:
        pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # pmf(v - 1), pmf(v - 2), ..., pmf(0)
        alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, beta: float = 0.05) -> float:
    """The largest epsilon that ``v`` correct out of ``r`` guesses on ``m`` canaries rules out.

    Every epsilon below the returned value has :func:`p_value` < ``beta``: a run that is
    (epsilon, delta)-DP for such an epsilon would produce this many correct guesses with
    probability below ``beta``, so with confidence ``1 - beta`` the run is not
    (epsilon, delta)-DP for any smaller epsilon. Found by bisection on epsilon (as in the
    paper's appendix; the p-value grows with epsilon), returning the end that keeps the
    p-value below ``beta``. 0 when even epsilon = 0 is not rejected (e.g. no guesses).

    Raises
    ------
    AuditError
        ``m < 1``, not ``0 <= v <= r <= m``, ``delta`` outside [0, 1) or ``beta`` outside (0, 1).
    """
    _check(m, r, v, delta, beta)
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0  # invariant: p_value(lo) < beta <= p_value(hi)
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi  # terminates: at q = 1 (eps ~ 40) f(v) = 1 for every v <= r
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def max_certifiable_epsilon(m: int, r: int, delta: float, beta: float = 0.05) -> float:
    """The bound when all ``r`` guesses are right: the most this setting can ever certify.

    With delta = 0 it solves q^r = beta, so ``eps = log(q / (1 - q))`` with ``q = beta^(1/r)``:
    about 3.5 for r = 100 and beta = 0.05.
    """
    return epsilon_lower_bound(m, r, r, delta=delta, beta=beta)

