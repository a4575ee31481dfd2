"""DP-SGD for local training (DP-FedAvg clients): Poisson batches, per-sample clipping, noise."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ddcore.augment import ONE, augment
from ddcore.data import Dataset
from ddcore.frozen import FeatureCache, trained_part
from ddcore.runconfig import RunConfig
from privacy.accounting import ACCOUNTANT, Accountant, DPPlan
from privacy.errors import PrivacyError
from privacy.mechanisms import (
    add_noise,
    clipped_sum,
    grad_sample_module,
    noise_generator,
    per_sample_gradients,
    poisson_mask,
)


@lru_cache(maxsize=256)
def dpsgd_plan(*, num_examples: int, batch_size: int, epochs_per_round: int, rounds: int,
               target_epsilon: float, delta: float, max_grad_norm: float,
               accountant: str = ACCOUNTANT) -> DPPlan:
    """Calibrate sigma so that ``rounds`` rounds of local DP-SGD spend ``target_epsilon`` in total.

    Each round runs ``epochs_per_round * ceil(n / batch_size)`` steps at sample rate
    ``batch_size / n``; the plan covers every step of every round, not one round. A pure
    function of its numbers, remembered: every round of a client asks for the same plan, and
    the search for sigma (~0.1 s) would otherwise repeat in each.
    """
    if num_examples < 1 or batch_size < 1 or epochs_per_round < 1 or rounds < 1:
        raise PrivacyError("DP-SGD needs >= 1 example, batch size, local epoch and round")
    rate = min(1.0, batch_size / num_examples)
    steps = rounds * epochs_per_round * math.ceil(num_examples / batch_size)
    return DPPlan.calibrate(target_epsilon=target_epsilon, delta=delta, max_grad_norm=max_grad_norm,
                            sample_rate=rate, steps=steps, num_examples=num_examples, accountant=accountant)


def fedavg_dpsgd_plan(cfg: RunConfig, num_examples: int) -> DPPlan:
    """The plan of a DP-FedAvg client of ``num_examples``, for the whole run of ``cfg``.

    ``fedavg_rounds`` rounds of :func:`steps_per_round` steps each, at the run's target
    epsilon, delta and clipping norm. Clients, LiRA's shadows and the sweep's inversion audit
    all take their sigma from here.
    """
    dp = cfg.distill.dp
    return dpsgd_plan(num_examples=num_examples, batch_size=cfg.local_batch_size,
                      epochs_per_round=cfg.local_epochs, rounds=max(cfg.fedavg_rounds, 1),
                      target_epsilon=dp.target_epsilon, delta=dp.delta, max_grad_norm=dp.max_grad_norm,
                      accountant=dp.accountant)


def steps_per_round(cfg: RunConfig, num_examples: int) -> int:
    """DP-SGD steps of one DP-FedAvg round: ``local_epochs`` passes in expectation."""
    return cfg.local_epochs * math.ceil(num_examples / cfg.local_batch_size)


def local_dpsgd(model: nn.Module, data: Dataset, cfg: RunConfig, plan: DPPlan, accountant: Accountant, *,
                steps: int, generator: torch.Generator, features: FeatureCache | None = None) -> float:
    """``steps`` DP-SGD steps of the FedAvg local recipe (:meth:`RunConfig.local_training`).

    A model that trains only its head (:func:`ddcore.frozen.trained_part`: model ``scatter``, no
    augmentation) runs the steps on the head over the records' features, embedded once (or taken
    from ``features``, a cache the caller keeps): the same Poisson batches, per-sample clipping,
    noise draws and accounting as the whole model, whose per-sample gradients outside the head
    are zero.
    """
    recipe = cfg.local_training()
    target, x = trained_part(model, data.x, recipe.dsa_strategy, features)
    # the batches, the augmentation and the noise: secret unless secret-noise = false (then the seed
    # comes from ``generator``, as before)
    secret = noise_generator(cfg.distill.dp, int(torch.randint(2**62, (1,), generator=generator)))
    return dpsgd_train(target, x, data.y, plan, accountant, steps=steps, lr=recipe.lr,
                       momentum=recipe.momentum, generator=secret, weight_decay=recipe.weight_decay,
                       dsa_strategy=recipe.dsa_strategy, dsa_mode=recipe.dsa_mode)


def dpsgd_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: DPPlan, accountant: Accountant, *,
                steps: int, lr: float, momentum: float, generator: torch.Generator, weight_decay: float = 0.0,
                dsa_strategy: str = "none", dsa_mode: str = ONE) -> float:
    """Train ``model`` in place for ``steps`` DP-SGD steps on the records (``x``, ``y``); return the mean
    (clipped-batch) loss.

    Every step is recorded in ``accountant`` (which the caller keeps across rounds). Refuses
    to start if these steps would take the accountant past ``plan.steps`` (the budget).
    ``weight_decay`` and per-example augmentation (``dsa_strategy``, as plain training uses)
    do not touch the privacy analysis: the decay is data-independent, and each augmented
    image still belongs to one example, whose whole gradient is clipped.
    """
    if accountant.name != plan.accountant:
        raise PrivacyError(f"sigma was calibrated with the {plan.accountant} accountant but the spend "
                           f"would be recorded by the {accountant.name} one; use "
                           f"Accountant({plan.accountant!r})")
    if accountant.steps + steps > plan.steps:
        raise PrivacyError(f"privacy budget exhausted: {accountant.steps} of {plan.steps} planned DP-SGD "
                           f"steps are spent and {steps} more were asked; raise target-epsilon or plan "
                           "more rounds up front (fedavg-rounds)")
    gsm = grad_sample_module(model)
    params = [p for p in gsm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    device = params[0].device
    n = len(y)
    expected = plan.sample_rate * n  # public normaliser: the noisy sum / expected batch size
    gsm.train()
    losses = []
    for _ in range(steps):
        mask = poisson_mask(n, plan.sample_rate, generator)
        xb, yb = x[mask].to(device), y[mask].to(device)
        if len(yb):
            xb = augment(xb, dsa_strategy, generator, dsa_mode)
            loss = F.cross_entropy(gsm(xb), yb, reduction="sum")
            total = clipped_sum(per_sample_gradients(gsm, loss), plan.max_grad_norm)
            losses.append(float(loss.detach()) / len(yb))
        else:  # an empty Poisson batch still releases noise
            total = [torch.zeros_like(p) for p in params]
        noisy = add_noise(total, plan.noise_multiplier * plan.max_grad_norm, generator)
        for p, g in zip(params, noisy, strict=True):
            p.grad = g / expected
        opt.step()
        opt.zero_grad(set_to_none=True)
        accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    gsm.remove_hooks()
    return sum(losses) / max(len(losses), 1)
