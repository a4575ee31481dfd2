"""One Gaussian release of per-class sums of bank features and per-class counts.

The released vector, one row per class ``c`` of the label space,

    R_c = [a * S_c, b * n_c],   S_c = sum of phi(x) over the records of class c,  n_c their number,

gets N(0, (sigma C)^2) noise on every entry, once. ``phi`` is the bank's feature map
(:class:`ddcore.bank.EmbeddingBank`), of norm <= 1 per record (re-clipped here against rounding).

Sensitivity. Adding or removing one record (x, y) changes row y alone, by ``[a phi(x), b]``,
whose L2 norm is ``sqrt(a^2 |phi(x)|^2 + b^2) <= sqrt(a^2 + b^2) = C``; no other entry moves,
however many views of x the bank averages. So the release is one Gaussian mechanism of L2
sensitivity C and noise multiplier sigma (add/remove adjacency, as Opacus's accounting;
replacing a record moves two rows and doubles it), accounted by
:mod:`privacy.single_release`.

The split of C between the sums and the count (:func:`norm_split`): the mean estimate
``(a S + z) / a / ((b n + z') / b)`` errs by about ``sigma C sqrt(D) / (a n)`` (norm) through
the sums' noise and by a relative ``sigma C / (b n)`` through the count's, on a mean of norm
``r <= 1``; the total ``D / a^2 + r^2 / b^2`` is least, under ``a^2 + b^2 = C^2``, at
``b^2 / a^2 = r / sqrt(D)``; with ``r = 1`` (its bound), ``b / a = D^(-1/4)``. For D = 2,880
that is a = 0.991 C, b = 0.135 C: the sums' noise is 1.40x smaller than with an even split
(a = b = C / sqrt 2), at the price of a count noise that stays below 1% of 6,000 records.

Second moments (``statistics-head = "ridge"``). The release may also carry the upper triangle
of sum_x phi(x) phi(x)^T (off-diagonal entries times sqrt 2, :func:`upper_triangle`), scaled by
``m``: one record moves it by ``m svec(phi phi^T)``, of norm exactly ``m |phi|^2 <= m``, so with
``a^2 + b^2 + m^2 = C^2`` the whole release still has sensitivity C and stays one Gaussian
mechanism (:func:`norm_split` takes ``m = MOMENT_WEIGHT * a``).

Sums and counts are returned apart (:class:`ClassStatistics`), so clients' releases can be
added by a server before anything is divided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddcore.bank import EmbeddingBank
from ddcore.data import Dataset
from privacy.errors import InvalidPrivacyParameterError
from privacy.mechanisms import add_noise, clip_rows


@dataclass(frozen=True)
class ClassStatistics:
    """Noisy per-class feature sums (K, D) and counts (K,), in feature units (a record: |phi| <= 1, 1).

    ``moments``, when released: the upper triangle (:func:`upper_triangle`, D (D + 1) / 2 entries)
    of the second-moment matrix sum_x phi(x) phi(x)^T over every record of every class - with the
    sums, the sufficient statistics of a ridge classifier on phi (:func:`privacy.statistics.ridge_head`).
    ``noise_std``: the std of the Gaussian noise on every entry of ``moments`` (0: exact); it adds
    up in quadrature over clients and lets the server set its ridge penalty above the noise.
    """

    sums: torch.Tensor
    counts: torch.Tensor
    moments: torch.Tensor | None = None
    noise_std: float = 0.0

    @staticmethod
    def total(releases: list[ClassStatistics]) -> ClassStatistics:
        """The sum of ``releases``, added in float64 (so the order they arrive in does not move it)."""
        with_moments = [r.moments is not None for r in releases]
        if any(with_moments) and not all(with_moments):
            raise ValueError("cannot add releases with and without second moments")
        moments = sum(r.moments.double() for r in releases).float() if all(with_moments) else None
        return ClassStatistics(sum(r.sums.double() for r in releases).float(),
                               sum(r.counts.double() for r in releases).float(), moments,
                               math.sqrt(sum(r.noise_std ** 2 for r in releases)))

    def __add__(self, other: ClassStatistics) -> ClassStatistics:
        """The statistics of two disjoint datasets together (what a server would aggregate)."""
        return ClassStatistics.total([self, other])

    def means(self) -> torch.Tensor:
        """Class means (K, D): noisy sum / noisy count, the count floored at 1 (post-processing)."""
        return self.sums / self.counts.clamp(min=1.0)[:, None]


def triangle_size(dim: int) -> int:
    """Entries of the upper triangle of a D x D matrix (diagonal included)."""
    return dim * (dim + 1) // 2


def upper_triangle(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle (row-major) of a symmetric ``matrix`` as a vector, off-diagonal entries
    times sqrt 2 ("svec"): its norm is the matrix's Frobenius norm, so a release spends all of
    its sensitivity on the matrix (``|svec(phi phi^T)| = |phi|^2``)."""
    rows, cols = torch.triu_indices(matrix.shape[0], matrix.shape[1], device=matrix.device)
    return matrix[rows, cols] * torch.where(rows == cols, 1.0, math.sqrt(2.0)).to(matrix.dtype)


def symmetric(triangle: torch.Tensor, dim: int) -> torch.Tensor:
    """The symmetric D x D matrix of ``triangle`` (inverse of :func:`upper_triangle`)."""
    if triangle.numel() != triangle_size(dim):
        raise ValueError(f"a {dim}x{dim} triangle has {triangle_size(dim)} entries, got {triangle.numel()}")
    rows, cols = torch.triu_indices(dim, dim, device=triangle.device)
    values = triangle / torch.where(rows == cols, 1.0, math.sqrt(2.0)).to(triangle.dtype)
    out = torch.zeros((dim, dim), dtype=triangle.dtype, device=triangle.device)
    out[rows, cols] = values
    out[cols, rows] = values
    return out


MOMENT_WEIGHT = 1.0  # m / a: the second moments' share of C against the sums' (simulations.statistics_choice)


def norm_split(max_norm: float, dim: int, moments: bool = False,
               moment_weight: float = MOMENT_WEIGHT) -> tuple[float, float, float]:
    """``(a, b, m)``: features scaled to norm ``a``, count entry ``b``, second moments scaled by ``m``.

    ``a^2 + b^2 + m^2 = C^2`` and ``b/a = D^-1/4`` (see the module docstring); with ``moments``
    the triangle gets ``m = moment_weight * a`` (a record's ``phi phi^T`` has Frobenius norm
    ``|phi|^2 <= 1``, its upper triangle no more), without them ``m = 0``.
    """
    ratio = dim ** -0.25
    w = moment_weight if moments else 0.0
    a = max_norm / math.sqrt(1 + ratio * ratio + w * w)
    return a, a * ratio, a * w


def _check_noise(max_norm: float, noise_multiplier: float) -> None:
    if not (max_norm > 0 and math.isfinite(max_norm)) or noise_multiplier < 0:
        raise InvalidPrivacyParameterError(f"need a finite max_norm > 0 and noise_multiplier >= 0, got "
                                           f"{max_norm}, {noise_multiplier}")


def exact_statistics(bank: EmbeddingBank, data: Dataset, batch_size: int = 256,
                     moments: bool = False) -> ClassStatistics:
    """The exact per-class feature sums (K, D) and counts (K,) of ``data`` (float64): no noise.

    Every record is embedded once (``phi`` re-clipped to norm <= 1 against rounding); the K
    rows span ``data.num_classes``, the label space, so which classes a client holds stays
    private once :func:`noisy_release` has added the noise. With ``moments``, also the upper
    triangle of sum_x phi(x) phi(x)^T. Never send these.
    """
    sums: torch.Tensor | None = None
    second: torch.Tensor | None = None
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            x = data.x[start:start + batch_size].to(bank.device)
            y = data.y[start:start + batch_size].to(bank.device)
            phi = record_features(bank, x).double()  # (n, D)
            if sums is None:
                sums = torch.zeros((data.num_classes, phi.shape[1]), dtype=torch.float64, device=phi.device)
                second = torch.zeros((phi.shape[1],) * 2, dtype=torch.float64, device=phi.device)
            sums.index_add_(0, y, phi)
            if moments:
                second += phi.T @ phi
    if sums is None or second is None:
        raise InvalidPrivacyParameterError("no records to release; a client needs at least one example")
    counts = torch.bincount(data.y, minlength=data.num_classes).to(sums)
    return ClassStatistics(sums, counts, upper_triangle(second) if moments else None)


def class_sums(bank: EmbeddingBank, data: Dataset,
               batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact per-class feature sums (K, D) (float64) and counts (K,) of ``data`` (no moments)."""
    exact = exact_statistics(bank, data, batch_size)
    return exact.sums, exact.counts


def record_features(bank: EmbeddingBank, x: torch.Tensor) -> torch.Tensor:
    """phi of every image of ``x`` (n, D), re-clipped to norm <= 1 exactly (guards rounding)."""
    return clip_rows(bank.features(x), 1.0)


def noisy_release(sums: torch.Tensor, counts: torch.Tensor, *, max_norm: float, noise_multiplier: float,
                  generator: torch.Generator, moments: torch.Tensor | None = None,
                  moment_weight: float = MOMENT_WEIGHT) -> ClassStatistics:
    """The one Gaussian release of exact ``sums``, ``counts`` (and ``moments``; see the module docstring)."""
    _check_noise(max_norm, noise_multiplier)
    a, b, m = norm_split(max_norm, sums.shape[1], moments is not None, moment_weight)
    release = torch.cat([a * sums, b * counts[:, None]], dim=1)  # (K, D + 1)
    parts = [release] if moments is None else [release, m * moments]  # together: sensitivity C
    noisy = add_noise(parts, noise_multiplier * max_norm, generator)  # the one release
    stats = ClassStatistics((noisy[0][:, :-1] / a).float(), (noisy[0][:, -1] / b).float())
    if moments is None:
        return stats
    return ClassStatistics(stats.sums, stats.counts, (noisy[1] / m).float(), noise_multiplier * max_norm / m)


def release_class_statistics(
    bank: EmbeddingBank,
    data: Dataset,
    *,
    max_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
    batch_size: int = 256,
) -> ClassStatistics:
    """Embed every record of ``data`` once, sum per class with counts, add the noise once.

    Parameters
    ----------
    bank, data
        The feature map and the private records (``data.num_classes`` rows: the label space,
        so which classes a client holds stays private).
    max_norm
        C, the L2 sensitivity of the whole release (see the module docstring).
    noise_multiplier
        sigma: every entry of the scaled release gets N(0, (sigma C)^2); 0 = no noise.
    generator
        The noise's only source.
    """
    _check_noise(max_norm, noise_multiplier)  # before any embedding
    sums, counts = class_sums(bank, data, batch_size)
    return noisy_release(sums, counts, max_norm=max_norm, noise_multiplier=noise_multiplier,
                         generator=generator)
