"""Leakage audits usable without Flower: membership inference, memorisation, gradient inversion."""

from privacy.attacks.inversion import InversionResult, invert_gradient, update_to_gradient
from privacy.attacks.membership import AttackResult, lira_attack, loss_threshold_attack
from privacy.attacks.memorisation import MemorisationResult, memorisation

__all__ = [
    "AttackResult", "InversionResult", "MemorisationResult", "invert_gradient", "lira_attack",
    "loss_threshold_attack", "memorisation", "update_to_gradient",
]
