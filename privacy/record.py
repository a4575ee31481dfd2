"""The privacy record of a DP run: one vocabulary for summaries, client replies, the ledger and CLIs.

A DP summary carries the record in its meta (plus ``dp`` and ``accountant``); a DP client
sends it in its reply's MetricRecord (DP distillation and DP-FedAvg alike); the server's
ledger and ``python -m ddcore`` read it back by these keys. Imports nothing heavy (no Opacus).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only; accounting and single_release never import this module
    from privacy.accounting import Accountant, DPPlan
    from privacy.single_release import SingleReleaseAccountant

# epsilon is what the accountant says was spent so far (the whole run), not the target
PRIVACY_KEYS = ("epsilon", "delta", "target-epsilon", "noise-multiplier", "sample-rate", "steps",
                "max-grad-norm")
# A DP summary names its accountant in meta["accountant"] (privacy.accounting.ACCOUNTANT by
# default; "analytic-gaussian" for one-release mechanisms, privacy.single_release).


def privacy_record(plan: DPPlan, accountant: Accountant | SingleReleaseAccountant) -> dict[str, float | int]:
    """The record of ``plan`` as ``accountant`` has composed it so far, keyed by PRIVACY_KEYS."""
    values = (accountant.epsilon(plan.delta), plan.delta, plan.target_epsilon, plan.noise_multiplier,
              plan.sample_rate, accountant.steps, plan.max_grad_norm)
    return dict(zip(PRIVACY_KEYS, values, strict=True))
