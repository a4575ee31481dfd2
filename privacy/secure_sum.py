"""Secure summation of per-client float arrays through Flower's SecAgg+, and distributed DP on it.

What SecAgg+ does to the numbers (flwr 1.42: ``client/mod/secure_aggregation/secaggplus_mod.py``,
``server/workflow/secure_aggregation/secaggplus_workflow.py``,
``common/secure_aggregation/quantization.py``). A client of weight ``w`` (its ``num_examples``)
sends, for every entry ``x`` of its vector, ``q = round_s((clip(r x, -c, c) + c) T / (2c))`` with
``r = round(w / max_weight * T) / T``, ``round_s`` stochastic rounding (up with probability the
fractional part) and ``q`` masked modulo ``M``; the server adds the masked vectors, removes the
masks and returns ``sum(r_i x_i) / sum(r_i)`` - a weighted *mean*. Here every client reports
``w = 1 = max_weight`` (so ``r = 1``, no scaling) and the server multiplies the mean by the number
of vectors in the sum: the sum, exact up to the quantisation.

The quantisation error (:func:`quantisation_error`). Stochastic rounding moves each client's entry
by less than one step ``2c / T`` (unbiased; variance at most ``(2c / T)^2 / 4``), so the sum of
``n`` clients errs by less than ``n * 2c / T`` per entry (std at most ``sqrt(n) c / T``); float64
rounding adds ~1e-11 at these sizes. The integer sum must not wrap: ``n T < M``
(:meth:`Quantisation.check_clients`). Defaults ``c = 2^14``, ``T = 2^22``, ``M = 2^32``: a step of
2^-7 (0.0078) per client and entry, at most 1,023 clients, and for 10 clients an error below 0.078
(std below 0.013) on class sums of thousands of records - below any DP noise (sigma C ~ 0.5 or more
at epsilon <= 10, C = 1). Values beyond ``+-c`` (a class of more than 16,384 records) would be
clipped silently: :func:`check_release` refuses them instead (see there).

The masks. ``common/secure_aggregation/secaggplus_utils.py::pseudo_rand_gen`` expands every mask
(each client's private one and every pairwise one) with NumPy's ``RandomState`` (Mersenne Twister)
seeded with a 32-bit integer, the XOR of the 32-byte secret's 4-byte words. That is not a
cryptographic generator, and 32 bits of seed are within reach of exhaustive search: SecAgg+'s
proofs assume a cryptographic PRG, so read the masking as protection against an honest-but-curious
server, not a determined one.

Distributed DP (:func:`distributed_noise_std`, :func:`share_config`). Each client adds
``N(0, s^2)`` to every entry with ``s = total_std / sqrt(t)``, ``t`` the SecAgg+ reconstruction
threshold: the protocol finishes only with at least ``t`` clients' vectors in the sum (every node
needs ``t`` live neighbours at every stage; the server also refuses a smaller sum), and ``m >= t``
shares carry std ``sqrt(m) s >= total_std``. A record lives in one client, so the sum is one
Gaussian mechanism of sensitivity ``C`` and noise multiplier at least ``total_std / C``, accounted
by :mod:`privacy.single_release` (:func:`aggregate_epsilon`, :func:`aggregate_meta`).

What this assumes, said plainly: the server neither colludes with clients (a coalition revealing
its noise removes its shares) nor sees a single unmasked share (one share alone has noise
multiplier ``sigma / sqrt(t)``: :func:`share_epsilon`), and it announces the true threshold (the
clients read ``t`` from the protocol's setup message); each share is clipped and quantised after
its noise, and the accounting treats the sum as the continuous Gaussian mechanism (the discrete
distributed Gaussian of Kairouz, Liu and Steinke, ICML 2021, is what makes such a sum exactly
DP); and the share noise must come from a source the server cannot reproduce (the client draws
it from an OS-seeded generator, never from the run's public seed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from ddcore.config import DistillConfig
from privacy.errors import InvalidPrivacyParameterError, PrivacyError

# privacy.single_release (through privacy.accounting: Opacus, ~3 s) loads inside the DP functions only:
# every client app imports this module for the secure sum's constants and checks

Scalar = str | int | float | bool
CLIPPING_RANGE = 2.0**14  # c: every sent entry must lie in [-c, c] (a class of up to 16,384 records)
QUANTIZATION_RANGE = 2**22  # T: an entry becomes an integer in [0, T]; step 2c / T = 2^-7
MODULUS_RANGE = 2**32  # M: the masks' modulus (flwr's largest); n T < M: up to 1,023 clients
MAX_WEIGHT = 1.0  # every client reports num_examples 1 = max_weight: an unweighted sum
SPEC_KEY = "secagg-spec"  # the clear metric carrying a vector's layout (FlatSpec.to_json)


class SecureSumError(PrivacyError):
    """A vector cannot go through the secure sum as it is (range, finiteness, layout, client count)."""


@dataclass(frozen=True)
class FlatSpec:
    """The layout of a flattened dict of arrays: names (sorted) and shapes, in vector order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        """Length of the flat vector."""
        return sum(math.prod(s) for s in self.shapes)

    def to_json(self) -> str:
        """The spec as one string (a Flower metric value: public, sent in the clear)."""
        return json.dumps({"names": list(self.names), "shapes": [list(s) for s in self.shapes]})

    @staticmethod
    def from_json(text: str) -> FlatSpec:
        """The spec :meth:`to_json` wrote; :class:`SecureSumError` if ``text`` is not one."""
        try:
            raw = json.loads(text)
            return FlatSpec(tuple(str(n) for n in raw["names"]),
                            tuple(tuple(int(d) for d in s) for s in raw["shapes"]))
        except (TypeError, ValueError, KeyError) as exc:
            raise SecureSumError(f"not a flat-vector spec: {text!r} ({exc})") from None


def flatten(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, FlatSpec]:
    """One float64 vector of ``arrays`` (in name order) and the spec that undoes it."""
    if not arrays:
        raise SecureSumError("nothing to sum: the release has no arrays")
    names = tuple(sorted(arrays))
    for name in names:
        dtype = np.asarray(arrays[name]).dtype
        if dtype.kind != "f":
            raise SecureSumError(f"{name!r} is {dtype}; the secure sum adds float arrays")
    vector = np.concatenate([np.asarray(arrays[n], dtype=np.float64).ravel() for n in names])
    return vector, FlatSpec(names, tuple(tuple(np.shape(arrays[n])) for n in names))


def unflatten(vector: np.ndarray, spec: FlatSpec) -> dict[str, np.ndarray]:
    """The dict of arrays ``spec`` describes, cut from ``vector`` (float64)."""
    if vector.ndim != 1 or vector.size != spec.size:
        raise SecureSumError(f"a vector of shape {vector.shape} does not hold {spec.size} entries of {spec}")
    out, start = {}, 0
    for name, shape in zip(spec.names, spec.shapes, strict=True):
        stop = start + math.prod(shape)
        out[name] = vector[start:stop].reshape(shape)
        start = stop
    return out


def quantisation_error(clipping_range: float, quantization_range: int, clients: int) -> float:
    """Bound on the per-entry error of a SecAgg+ sum of ``clients`` vectors (module docstring).

    Each client's entry moves by less than one step ``2c / T``; the bound adds them up and allows
    for float64 rounding (``4 n c 2^-52``, ~1e-11 for the defaults). The error's std is far smaller:
    ``sqrt(n) c / T``.
    """
    return clients * (2 * clipping_range / quantization_range + 4 * clipping_range * 2.0**-52)


@dataclass(frozen=True)
class Quantisation:
    """SecAgg+'s quantisation settings: clipping range c, quantisation range T, modulus M."""

    clipping_range: float = CLIPPING_RANGE
    quantization_range: int = QUANTIZATION_RANGE
    modulus_range: int = MODULUS_RANGE

    def __post_init__(self) -> None:
        c, t, m = self.clipping_range, self.quantization_range, self.modulus_range
        if not (c > 0 and math.isfinite(c)):
            raise SecureSumError(f"the clipping range must be a finite number > 0, got {c}")
        if not 0 < t < 2**31:  # flwr rounds into int32
            raise SecureSumError(f"the quantisation range must be in (0, 2^31), got {t}")
        if m <= t or m > 2**32 or m & (m - 1):
            raise SecureSumError(f"the modulus must be a power of 2 in (T, 2^32], got {m} (T = {t})")

    @property
    def max_clients(self) -> int:
        """The most vectors whose quantised sum stays below the modulus (``n T < M``)."""
        return (self.modulus_range - 1) // self.quantization_range

    def check_clients(self, clients: int) -> None:
        """Raise :class:`SecureSumError` when ``clients`` vectors could wrap the modulus."""
        if clients > self.max_clients:
            raise SecureSumError(f"{clients} clients could wrap the modulus {self.modulus_range} (n T < M "
                                 f"allows {self.max_clients}); sample fewer clients per round")

    def error(self, clients: int) -> float:
        """:func:`quantisation_error` of a sum of ``clients`` vectors under these settings."""
        return quantisation_error(self.clipping_range, self.quantization_range, clients)


def check_release(arrays: Mapping[str, np.ndarray], clipping_range: float) -> None:
    """Raise :class:`SecureSumError` if SecAgg+ would alter ``arrays``: a NaN/Inf, or a value beyond ``+-c``.

    SecAgg+ clips silently to ``[-c, c]`` and a NaN becomes an arbitrary integer that wraps the
    whole sum, so such a release is refused, never sent wrong. Why not scale by a public factor
    instead: every client of a sum must use the same factor, fixed before anyone releases - which
    is what the clipping range already is (``secagg-clipping-range``). The refusal is one bit about
    the client's noisy share, seen by the server (under DP, post-processing of that share, whose
    noise is the share's, not the aggregate's); a clipping range with headroom keeps it from ever
    firing on honest data.
    """
    for name in sorted(arrays):
        values = np.asarray(arrays[name])
        if not np.isfinite(values).all():
            raise SecureSumError(f"{name!r} holds NaN or Inf; SecAgg+ would wrap the whole sum")
        worst = float(np.abs(values).max(initial=0.0))
        if worst > clipping_range:
            raise SecureSumError(f"{name!r} reaches {worst:.6g}, beyond the clipping range "
                                 f"{clipping_range:g}; SecAgg+ would clip it - raise "
                                 f"secagg-clipping-range above {worst:.6g}")


def protocol_threshold(clients: int, fraction: float) -> int:
    """The SecAgg+ reconstruction threshold ``t`` for ``clients`` (all of them share with all).

    ``ceil(fraction * clients)``, at least 2 and below ``clients`` (flwr's rule for integer
    thresholds); with ``fraction > 1/2`` it is a strict majority, so no server can collect both a
    live client's mask seed and its key (SecAgg's condition against a malicious server).
    """
    if clients < 3:
        raise SecureSumError(f"secure aggregation needs at least 3 clients, got {clients}: with 2, each "
                             "one learns the other's vector from the sum")
    if not 0.5 < fraction < 1:
        raise SecureSumError(f"secagg-threshold must be in (0.5, 1), got {fraction}")
    return min(max(2, math.ceil(fraction * clients)), clients - 1)


def distributed_noise_std(total_std: float, threshold: int) -> float:
    """The std each client adds so that the sum of any ``threshold`` or more clients has ``total_std``."""
    if not (total_std >= 0 and math.isfinite(total_std)) or threshold < 1:
        raise InvalidPrivacyParameterError(f"need a finite total std >= 0 and a threshold >= 1, got "
                                           f"{total_std}, {threshold}")
    return total_std / math.sqrt(threshold)


def aggregate_epsilon(*, total_std: float, sensitivity: float, delta: float) -> float:
    """Epsilon at ``delta`` of the sum: one Gaussian mechanism of multiplier ``total_std / sensitivity``."""
    from privacy.single_release import SingleReleaseAccountant

    if not (sensitivity > 0 and math.isfinite(sensitivity)):
        raise InvalidPrivacyParameterError(f"need a finite sensitivity > 0, got {sensitivity}")
    accountant = SingleReleaseAccountant()
    accountant.step(noise_multiplier=total_std / sensitivity)
    return accountant.epsilon(delta)


def share_epsilon(*, total_std: float, sensitivity: float, delta: float, threshold: int) -> float:
    """Epsilon of one client's share seen alone (multiplier ``total_std / sensitivity / sqrt(t)``)."""
    return aggregate_epsilon(total_std=distributed_noise_std(total_std, threshold), sensitivity=sensitivity,
                             delta=delta)


def share_config(cfg: DistillConfig, threshold: int) -> DistillConfig:
    """``cfg`` re-targeted so that one client's release is its *share* of the aggregate noise.

    :func:`privacy.statistics.release` calibrates sigma for ``cfg.dp.target_epsilon``; the share
    needs ``sigma / sqrt(threshold)`` (:func:`distributed_noise_std`), which is the multiplier of a
    higher epsilon (:func:`share_epsilon`): the returned config asks for that epsilon (lowered by a
    relative 1e-9, so the calibration's rounding can only add noise). Whatever arrays a release
    holds, it stays one Gaussian mechanism, now with the share's multiplier. Without DP, or at
    ``target-epsilon = inf``, ``cfg`` itself.
    """
    from privacy.single_release import calibrate_gaussian, gaussian_epsilon

    dp = cfg.dp
    if not dp.enabled or math.isinf(dp.target_epsilon):
        return cfg
    sigma = calibrate_gaussian(target_epsilon=dp.target_epsilon, delta=dp.delta)
    share = distributed_noise_std(sigma, threshold) * (1 + 1e-9)
    epsilon = gaussian_epsilon(noise_multiplier=share, delta=dp.delta)
    if not epsilon > 0:
        raise InvalidPrivacyParameterError(f"a share of sigma {share:.4g} is (0, {dp.delta})-DP on its "
                                           f"own; raise target-epsilon above {dp.target_epsilon}")
    return replace(cfg, dp=replace(dp, target_epsilon=epsilon))


def aggregate_meta(meta: Mapping[str, Scalar], cfg: DistillConfig, threshold: int) -> dict[str, Scalar]:
    """The meta of a share made with :func:`share_config`, its privacy record made the aggregate's.

    The record a client reports is what the server sees: the sum of at least ``threshold``
    shares, noise multiplier ``sqrt(threshold)`` times the share's (``noise-multiplier``, ``epsilon``
    from :func:`aggregate_epsilon`, ``target-epsilon`` the run's); the share's own values stay beside
    it (``share-noise-multiplier``, ``share-epsilon``). Raises :class:`SecureSumError` when the share
    carries less noise than the aggregate needs.
    """
    from privacy.single_release import calibrate_gaussian

    out = {**meta, "secure-aggregation": True, "secagg-threshold": threshold}
    if not meta.get("dp") or math.isinf(cfg.dp.target_epsilon):
        return out
    share = float(meta["noise-multiplier"])
    sigma = calibrate_gaussian(target_epsilon=cfg.dp.target_epsilon, delta=cfg.dp.delta)
    total = share * math.sqrt(threshold)
    if total < sigma * (1 - 1e-12):
        raise SecureSumError(f"{threshold} shares of sigma {share:.6g} carry {total:.6g}, below the "
                             f"{sigma:.6g} that target-epsilon {cfg.dp.target_epsilon} needs")
    epsilon = aggregate_epsilon(total_std=total, sensitivity=1.0, delta=cfg.dp.delta)
    return {**out, "share-noise-multiplier": share, "share-epsilon": float(meta["epsilon"]),
            "noise-multiplier": total, "epsilon": epsilon, "target-epsilon": cfg.dp.target_epsilon}
