"""DP distribution matching with one release: noisy class means under a seeded bank, then matching."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ddcore.bank import EmbeddingBank
from ddcore.config import DistillConfig
from ddcore.data import Dataset, renormalise
from ddcore.factorised import Factors
from ddcore.mean_matching import match_class_means
from ddcore.methods import register_method
from ddcore.methods.base import Synthetic
from ddcore.models import ModelFactory
from ddcore.summary import Summary
from ddcore.train import Progress
from privacy.mechanisms import check_model
from privacy.methods.base import private_start
from privacy.record import PRIVACY_KEYS
from privacy.statistics import bank_meta, public_view, release

logger = logging.getLogger(__name__)

LR_IMAGES = 0.3  # Adam step on the images (pixels in [-1, 1]); measured, see the README


def bank_of(model_factory: ModelFactory, cfg: DistillConfig, shape: tuple[int, int, int]) -> EmbeddingBank:
    """The DP-checked bank of ``cfg`` (size, seed, views) for images of ``shape``: public values,
    rebuilt identically anywhere."""
    bank = EmbeddingBank(model_factory, size=cfg.bank_size, seed=cfg.bank_seed, augment=cfg.bank_augment,
                         strategy=cfg.dsa_strategy, shape=shape)
    for net in bank.nets:  # no layer may mix records (BatchNorm): each record's feature is its own
        check_model(net)
    return bank


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
    stats, record = release(data, bank, replace(cfg, dp=replace(cfg.dp, enabled=True)), generator)
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


def in_normalisation(summary: Summary, source: Dataset, target: Dataset) -> Summary:
    """``summary`` (normalised like ``source``) re-expressed in ``target``'s normalisation.

    A per-channel affine map (post-processing). A factorised summary folds it into its
    hallucinators (``alpha * decode(w, b) + beta = decode(alpha w, alpha b + beta)``); its
    bases stay as they are.
    """
    if source.mean == target.mean and source.std == target.std:
        return summary
    if summary.factors is None:
        images = renormalise(summary.images, source.mean, source.std, target.mean, target.std)
        return Summary(images, summary.labels, summary.lrs, summary.meta)
    f = summary.factors
    alpha = torch.tensor(source.std) / torch.tensor(target.std)  # (C,)
    beta = (torch.tensor(source.mean) - torch.tensor(target.mean)) / torch.tensor(target.std)
    factors = Factors(f.bases, f.weight * alpha.view(1, -1, 1, 1, 1), f.bias * alpha + beta)
    h = f.hallucinators
    return Summary.from_factors(factors, summary.labels[::h], summary.lrs, summary.meta)
