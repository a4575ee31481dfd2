"""Statistic summaries: each client releases its per-class bank statistics once; the server adds them.

A client embeds every private record with the bank of random networks that ``cfg`` names
(:func:`bank_of`: built from ``bank-seed``, so the server rebuilds the
same feature map without any weights on the wire) and sends the per-class sums of the
features and the per-class counts - with Gaussian noise under DP, as one Gaussian mechanism
(:mod:`privacy.class_release`: sensitivity C under add/remove of one record, accounted exactly
by :mod:`privacy.single_release`). The server sums the releases of all clients
(:class:`~privacy.class_release.ClassStatistics` adds up), divides once, and optimises the
global summary - ``ipc`` images per class for the whole federation - against those class
means (:func:`synthesise`). Everything after the release is post-processing.

Why this is what a server can truly aggregate: sums are linear, so N clients' releases add to
the statistics of the pooled data plus N independent noises. Each client's noise has std
sigma*C, the total's sqrt(N)*sigma*C, over N times the records: the noise in the global mean
shrinks like 1/sqrt(N) where pooling N noisy image summaries would not.

Both sides work in the public normalisation (:func:`ddcore.data.public_constants`): the
release never depends on the private data's mean and std, and the server maps the finished
images into the run's normalisation before it trains on them.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ddcore.bank import EmbeddingBank
from ddcore.config import DistillConfig
from ddcore.data import Dataset, public_constants, renormalise
from ddcore.devicedata import DataSpec
from ddcore.errors import SummaryError
from ddcore.factorised import Factors
from ddcore.mean_matching import match_class_means
from ddcore.methods.base import Synthetic
from ddcore.models import ModelFactory
from ddcore.summary import Summary
from ddcore.train import Progress
from privacy.class_release import (
    ClassStatistics,
    exact_statistics,
    noisy_release,
    norm_split,
    symmetric,
    triangle_size,
)
from privacy.mechanisms import check_model
from privacy.record import privacy_record
from privacy.single_release import SingleReleaseAccountant, release_plan

logger = logging.getLogger(__name__)

LR_IMAGES = 0.3  # the server's Adam step on the images (pixels in [-1, 1]); measured, see the README
KIND = "statistics"  # meta "kind" of a statistics reply
MAX_ABS = 1e12  # a sent sum or count beyond this (in feature units) is rejected as absurd
BANK_KEYS = ("bank-size", "bank-seed", "bank-augment")


def bank_meta(cfg: DistillConfig) -> dict[str, int]:
    """The public values that define the bank (sent with a release, checked by the server)."""
    return {"bank-size": cfg.bank_size, "bank-seed": cfg.bank_seed, "bank-augment": cfg.bank_augment}


def feature_dim(bank: EmbeddingBank, shape: tuple[int, int, int]) -> int:
    """D, the length of the bank's feature of one image of ``shape``."""
    with torch.no_grad():
        return int(bank.features(torch.zeros((1, *shape), device=bank.device)).shape[1])


def public_view(data: Dataset) -> Dataset:
    """``data`` re-expressed in the public normalisation constants."""
    mean, std = public_constants(data.image_shape[0])
    return data.renormalised(mean, std)


def release(data: Dataset, bank: EmbeddingBank, cfg: DistillConfig, generator: torch.Generator,
            exact: ClassStatistics | tuple[torch.Tensor, torch.Tensor] | None = None,
            moments: bool = False) -> tuple[ClassStatistics, dict]:
    """This client's one release of its per-class statistics, and the meta that goes with it.

    ``data`` in any normalisation (it is re-expressed in the public one first); ``exact``: its
    noise-free :func:`public_sums` under ``bank`` when already computed (a client that is
    asked again, e.g. at another epsilon in a sweep, need not embed its data again). With
    ``moments`` the release also carries the upper triangle of the second-moment matrix of the
    features (``statistics-head = "ridge"``), under the same one Gaussian mechanism. With
    ``cfg.dp.enabled`` sigma is calibrated exactly for ``cfg.dp.target_epsilon`` at
    ``cfg.dp.delta`` (one Gaussian release, sensitivity ``cfg.dp.max_grad_norm``) and the meta
    carries the privacy record (epsilon from the accountant); otherwise the statistics are
    released exactly (sigma 0) and the meta says ``dp`` False.
    """
    meta: dict = {"kind": KIND, **bank_meta(cfg), "normalisation": "public", "moments": moments}
    dp = cfg.dp
    plan = None
    if dp.enabled:  # the budget is checked before any record is embedded
        plan = release_plan(target_epsilon=dp.target_epsilon, delta=dp.delta, max_norm=dp.max_grad_norm,
                            num_examples=len(data))
        if math.isinf(plan.target_epsilon):
            logger.warning("target epsilon is inf: releasing the class statistics without noise - NO privacy")
    if isinstance(exact, tuple):
        exact = ClassStatistics(*exact)
    if exact is None or (moments and exact.moments is None):
        exact = public_sums(data, bank, moments)
    stats = noisy_release(exact.sums, exact.counts, max_norm=dp.max_grad_norm,
                          noise_multiplier=plan.noise_multiplier if plan else 0.0, generator=generator,
                          moments=exact.moments if moments else None)
    if plan is None:
        return stats, {**meta, "dp": False}
    accountant = SingleReleaseAccountant()
    accountant.step(noise_multiplier=plan.noise_multiplier)
    return stats, {**meta, "dp": True, "accountant": accountant.name, **privacy_record(plan, accountant)}


def public_sums(data: Dataset, bank: EmbeddingBank, moments: bool = False) -> ClassStatistics:
    """The exact per-class sums and counts (and second moments) of ``data`` in the public
    normalisation (never sent)."""
    return exact_statistics(bank, public_view(data), moments=moments)


def to_arrays(stats: ClassStatistics) -> dict[str, np.ndarray]:
    """The wire form: ``sums`` (K, D) and ``counts`` (K,), and ``moments`` (D (D + 1) / 2,) when
    released; float32."""
    arrays = {"sums": stats.sums.detach().cpu().float().numpy(),
              "counts": stats.counts.detach().cpu().float().numpy()}
    if stats.moments is not None:
        arrays["moments"] = stats.moments.detach().cpu().float().numpy()
    return arrays


def read_statistics(arrays: dict[str, np.ndarray], meta: dict, cfg: DistillConfig, *, num_classes: int,
                    dim: int, moments: bool = False) -> ClassStatistics:
    """A received release, checked against the run; :class:`SummaryError` names what is wrong.

    The server never trusts a reply: the kind and the bank must be the run's, ``sums`` must be
    (num_classes, dim) and ``counts`` (num_classes,) - plus ``moments`` (dim (dim + 1) / 2,)
    exactly when the run asks for them - float, finite and of sane magnitude.
    The values themselves are noisy under DP (a count may be negative), so nothing tighter
    can be asked of them. The moments' noise std is read from the release's privacy record
    (it only sets the server's ridge penalty).
    """
    if meta.get("kind") != KIND:
        raise SummaryError(f"expected a statistics release (meta kind {KIND!r}), "
                           f"got kind {meta.get('kind')!r}")
    expected = bank_meta(cfg)
    sent = {k: meta.get(k) for k in BANK_KEYS}
    if any(sent[k] is None or int(sent[k]) != v for k, v in expected.items()):
        raise SummaryError(f"the release was made with bank {sent}, the run's is {expected}")
    names = {"sums", "counts", "moments"} if moments else {"sums", "counts"}
    missing = sorted(names - set(arrays))
    extra = sorted(set(arrays) - names)
    if missing or extra:
        raise SummaryError(f"a statistics release has exactly {sorted(names)}; missing {missing}, "
                           f"unexpected {extra}")
    shapes = {"sums": (num_classes, dim), "counts": (num_classes,), "moments": (triangle_size(dim),)}
    for name in sorted(names):
        values = arrays[name]
        if values.shape != shapes[name]:
            raise SummaryError(f"{name} {tuple(values.shape)}: expected {shapes[name]}")
        if values.dtype.kind != "f":
            raise SummaryError(f"{name} must be floating point, got {values.dtype}")
        if not np.isfinite(values).all():
            raise SummaryError(f"{name} contain NaN or Inf")
        if np.abs(values).max(initial=0.0) > MAX_ABS:
            raise SummaryError(f"{name} reach {np.abs(values).max():.3g}, beyond {MAX_ABS:g}")
    noise_std = 0.0
    if moments and meta.get("dp"):
        c = float(meta.get("max-grad-norm", 0.0))
        sigma = float(meta.get("noise-multiplier", 0.0))
        noise_std = sigma * c / norm_split(c, dim, True)[2] if c > 0 else 0.0
    tensors = {k: torch.from_numpy(arrays[k].astype(np.float32)) for k in names}
    return ClassStatistics(tensors["sums"], tensors["counts"], tensors.get("moments"), noise_std)


NOISE_PENALTY = 1.5  # the ridge penalty's noise term, in units of noise_std sqrt(D) (statistics_choice)


def ridge_head(total: ClassStatistics, ridge_lambda: float,
               noise_penalty: float = NOISE_PENALTY) -> torch.Tensor:
    """The ridge classifier's weights (K, D) from summed statistics: ``(G + lam I)^-1 S^T``, transposed.

    ``G`` is the (noisy) second-moment matrix of the features and ``S`` the per-class sums: the
    least-squares fit of one-hot labels from the features, ``argmin_W |Phi W - Y|^2 + lam |W|^2``,
    needs no more (``Phi^T Phi = G``, ``Phi^T Y = S^T``). ``lam = ridge_lambda * n / D`` (n the
    summed count) plus ``noise_penalty * noise_std * sqrt(D)``: a D x D symmetric matrix of the
    moments' Gaussian noise (std ``noise_std`` on the diagonal, ``noise_std / sqrt 2`` off it) has
    spectral norm about ``sqrt(2) noise_std sqrt(D)``, and the penalty must exceed it for the
    penalised matrix to stay positive definite under DP. Post-processing.
    """
    if total.moments is None:
        raise SummaryError("a ridge head needs the second moments; the releases carry none "
                           "(statistics-head = 'ridge' makes clients send them)")
    dim = total.sums.shape[1]
    second = symmetric(total.moments.double(), dim)
    n = float(total.counts.double().sum().clamp(min=1.0))
    penalty = ridge_lambda * n / dim + noise_penalty * total.noise_std * math.sqrt(dim)
    eye = torch.eye(dim, dtype=torch.float64, device=second.device)
    return torch.linalg.solve(second + penalty * eye, total.sums.double().T).T.float()  # (K, D)


def ridge_model(total: ClassStatistics, model_factory: ModelFactory, cfg: DistillConfig,
                ridge_lambda: float) -> torch.nn.Module:
    """The global model of ``statistics-head = "ridge"``: the bank's network (one of it) with the
    ridge classifier of :func:`ridge_head` as its head.

    The bank must be one network with an ``embed`` and a linear ``classifier`` whose input is the
    embedding (``model = "scatter"``: ScatterNet, frozen projection, linear head); it is rebuilt
    from the bank's seed, so its features are the ones the clients summed.
    """
    if cfg.bank_size != 1:
        raise SummaryError(f"a ridge head uses one network's features; got bank-size {cfg.bank_size} "
                           "(use bank-size 1, e.g. with model 'scatter')")
    model = model_factory(torch.Generator().manual_seed(cfg.bank_seed))
    head = getattr(model, "classifier", None)
    weights = ridge_head(total, ridge_lambda)
    if not isinstance(head, torch.nn.Linear) or head.weight.shape != weights.shape:
        raise SummaryError(f"model {type(model).__name__} has no linear classifier on its "
                           f"{weights.shape[1]}-dim embedding to take the ridge head")
    with torch.no_grad():
        head.weight.copy_(weights.to(head.weight.device))
        head.bias.zero_()
    return model


def synthesise(total: ClassStatistics, bank: EmbeddingBank, cfg: DistillConfig, public: Dataset,
               generator: torch.Generator, lr: float, progress: Progress | None = None) -> Summary:
    """``cfg.ipc`` images for every class whose (noisy) count is at least 1, matched to its mean.

    ``public`` gives the label space, image shape and (public) normalisation; its records are
    not used (the server has none). The images start from N(0, 1) noise and take
    ``cfg.iterations`` Adam steps of size ``lr`` towards the class means, projected into the
    pixel range after every step (:func:`ddcore.mean_matching.match_class_means`).
    """
    classes = [c for c in range(public.num_classes) if float(total.counts[c]) >= 1.0]
    if not classes:
        raise SummaryError("the aggregated statistics hold no class with a count of at least 1")
    images = torch.randn((len(classes) * cfg.ipc, *public.image_shape), generator=generator)
    labels = torch.tensor(classes).repeat_interleave(cfg.ipc)
    synthetic = Synthetic.wrap(images.to(cfg.device).requires_grad_(True), labels.to(cfg.device), cfg,
                               generator)
    match_class_means(total.means(), bank, synthetic, iterations=cfg.iterations, lr=lr,
                      bounds=public.pixel_bounds(), progress=progress)
    return synthetic.summary(public, cfg)


def bank_of(model_factory: ModelFactory, cfg: DistillConfig, shape: tuple[int, int, int]) -> EmbeddingBank:
    """The DP-checked bank of ``cfg`` (size, seed, views) for images of ``shape``: public values,
    rebuilt identically anywhere."""
    bank = EmbeddingBank(model_factory, size=cfg.bank_size, seed=cfg.bank_seed, augment=cfg.bank_augment,
                         strategy=cfg.dsa_strategy, shape=shape)
    for net in bank.nets:  # no layer may mix records (BatchNorm): each record's feature is its own
        check_model(net)
    return bank


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


def global_summary(total: ClassStatistics, bank: EmbeddingBank, cfg: DistillConfig, spec: DataSpec, *,
                   seed: int, progress: Progress | None = None) -> Summary:
    """The server's global summary from the summed releases ``total``, in the run's normalisation.

    :func:`synthesise` in the public normalisation (the server holds no record; ``spec`` gives the
    label space and image shape), then the per-channel map into the run's (``spec``'s mean and
    std), so the global model trains on it like on any pooled summary.
    """
    c, h, w = spec.image_shape
    mean, std = public_constants(c)
    empty, no_labels = torch.empty((0, c, h, w)), torch.empty(0, dtype=torch.long)
    public = Dataset(empty, no_labels, spec.num_classes, mean, std, spec.name)
    run = Dataset(empty, no_labels, spec.num_classes, spec.mean, spec.std, spec.name)
    summary = synthesise(total, bank, cfg, public, torch.Generator().manual_seed(seed),
                         lr=cfg.lr_or(LR_IMAGES), progress=progress)
    return in_normalisation(summary, public, run).with_meta(method="statistics", **bank_meta(cfg))
