"""What the DP methods share: the up-front plan, a start from noise, the summary's privacy record."""

from __future__ import annotations

import logging
import math

import torch

from ddcore.config import DistillConfig
from ddcore.data import Dataset
from ddcore.models import ModelFactory
from ddcore.summary import Summary
from privacy.accounting import Accountant, DPPlan
from privacy.errors import PrivateInitError
from privacy.mechanisms import check_model
from privacy.record import privacy_record
from privacy.single_release import SingleReleaseAccountant

logger = logging.getLogger(__name__)


def dp_plan(data: Dataset, cfg: DistillConfig, model_factory: ModelFactory) -> DPPlan:
    """Check the model (on a throw-away instance) and calibrate sigma for ``cfg.iterations`` releases.

    The sample rate is ``min(1, batch_real * num_classes / n)``: on balanced data each class's
    expected Poisson batch is ``batch_real`` examples.
    """
    check_model(model_factory(torch.Generator().manual_seed(0)))
    rate = min(1.0, cfg.batch_real * data.num_classes / max(len(data), 1))
    plan = DPPlan.calibrate(target_epsilon=cfg.dp.target_epsilon, delta=cfg.dp.delta,
                            max_grad_norm=cfg.dp.max_grad_norm, sample_rate=rate,
                            steps=cfg.iterations, num_examples=len(data), accountant=cfg.dp.accountant)
    if math.isinf(plan.target_epsilon):
        logger.warning("target epsilon is inf: clipping and sampling without noise - NO privacy")
    logger.info("DP plan: sigma %.4g, q %.4g, %d steps, C %g, delta %g (%s accountant)",
                plan.noise_multiplier, plan.sample_rate, plan.steps, plan.max_grad_norm, plan.delta,
                plan.accountant)
    return plan


def private_start(data: Dataset, cfg: DistillConfig, init: Summary | None,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """N(0, 1) images, ``cfg.ipc`` for every class of the (public) label space.

    Neither the pixels nor which classes a client holds depend on private data, so the summary
    is covered by the accountant alone. Starting from real images, or from a summary that was
    not itself made under DP, is refused.
    """
    if init is not None:
        raise PrivateInitError("DP distillation starts from noise, not from a previous summary; "
                               "run it one-shot (rounds=1) without init")
    if cfg.init != "noise":
        raise PrivateInitError(f"DP distillation must not start from real images (init={cfg.init!r}); "
                               "set init='noise' (--init noise)")
    k = data.num_classes
    images = torch.randn((k * cfg.ipc, *data.image_shape), generator=generator)
    labels = torch.arange(k).repeat_interleave(cfg.ipc)
    return images.to(cfg.device).requires_grad_(True), labels.to(cfg.device)


def privacy_meta(plan: DPPlan, accountant: Accountant | SingleReleaseAccountant
                 ) -> dict[str, float | int | str | bool]:
    """The summary's record of the privacy it spent (epsilon from the accountant, not the target)."""
    return {"dp": True, **privacy_record(plan, accountant), "accountant": accountant.name}
