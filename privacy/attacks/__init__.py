"""Leakage audits usable without Flower: membership, memorisation, inversion, one-run canary audits."""

from privacy.attacks.canary import CanaryAuditResult, canary_audit, make_canaries
from privacy.attacks.inversion import InversionResult, invert_gradient, update_to_gradient
from privacy.attacks.membership import AttackResult, lira_attack, loss_threshold_attack
from privacy.attacks.memorisation import MemorisationResult, memorisation

__all__ = [
    "AttackResult", "CanaryAuditResult", "InversionResult", "MemorisationResult", "canary_audit",
    "invert_gradient", "lira_attack", "loss_threshold_attack", "make_canaries", "memorisation",
    "update_to_gradient",
]
