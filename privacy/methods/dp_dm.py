"""DP distribution matching with one release: noisy class means under a seeded bank, then matching."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ddcore.config import DistillConfig
from ddcore.data import Dataset
from ddcore.mean_matching import match_class_means
from ddcore.methods import register_method
from ddcore.methods.base import Synthetic
from ddcore.models import ModelFactory
from ddcore.summary import Summary
from ddcore.train import Progress
from privacy.mechanisms import noise_generator
from privacy.methods.base import private_start
from privacy.record import PRIVACY_KEYS
from privacy.statistics import LR_IMAGES, bank_meta, bank_of, in_normalisation, public_view, release

logger = logging.getLogger(__name__)

@register_method("dp-dm", factorised=True)
def distill(
    data: Dataset,
    model_factory: ModelFactory,
    cfg: DistillConfig,
    init: Summary | None = None,
    progress: Progress | None = None,
) -> Summary:
    """One Gaussian release of per-class bank statistics, then images matched to them.

    1. The real images are re-expressed with the public normalisation constants
       (:func:`ddcore.data.public_constants`), so nothing below depends on statistics of the
       private data, whatever normalisation ``data`` came with.
    2. Every record is embedded once by the bank (``cfg.bank_size`` random networks from
       ``cfg.bank_seed``, ``cfg.bank_augment`` extra fixed views); the per-class sums and
       counts are released once with Gaussian noise calibrated exactly for
       ``cfg.dp.target_epsilon`` (:mod:`privacy.class_release`, :mod:`privacy.single_release`).
    3. Synthetic images, started from noise, are optimised for ``cfg.iterations`` Adam steps
       towards the noisy class means, kept inside the pixel range after every step -
       post-processing, no further privacy cost.

    The summary is returned in ``data``'s normalisation (identity when ``data`` already uses
    the public constants, as every DP front end loads it); meta records the accountant,
    the bank and the normalisation.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    public = public_view(data)
    bank = bank_of(model_factory, cfg, data.image_shape)
    images, labels = private_start(public, cfg, init, generator)  # refuses real starts before any release
    stats, record = release(data, bank, replace(cfg, dp=replace(cfg.dp, enabled=True)),
                            noise_generator(cfg.dp, cfg.seed + 1))
    logger.info("DP-DM release: sigma %.4g (%s), C %g, epsilon %.4g at delta %g", record["noise-multiplier"],
                record["accountant"], record["max-grad-norm"], record["epsilon"], record["delta"])
    synthetic = Synthetic.wrap(images, labels, cfg, generator)
    match_class_means(stats.means(), bank, synthetic, iterations=cfg.iterations, lr=cfg.lr_or(LR_IMAGES),
                      bounds=public.pixel_bounds(), progress=progress)
    summary = in_normalisation(synthetic.summary(public, cfg), public, data)
    privacy = {k: record[k] for k in ("dp", "accountant", *PRIVACY_KEYS)}
    return summary.with_meta(method="dp-dm", **privacy,
                             normalisation="public" if public.mean == data.mean and public.std == data.std
                             else "public, mapped to the data's", **bank_meta(cfg))
