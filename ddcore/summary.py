"""The synthetic summary a client sends: images, labels, optional step sizes and metadata.

In memory a summary is always float32 at full resolution. On the wire (``to_arrays``) it
can be stored compactly - float16, or uint8 quantised between the summary's own min and
max, optionally downsampled - and ``from_arrays`` expands it back. The bytes a transport
counts are those of the arrays ``to_arrays`` returns.

A factorised summary (:mod:`ddcore.factorised`) holds its decoded images in memory but sends
its factors: ``bases`` (compact like images), ``labels`` of the bases (every decoded image
has its base's label), and float32 ``hallucinators`` / ``hallucinator-bias`` (tiny, so never
compacted); the receiver decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddcore.errors import SummaryError
from ddcore.factorised import Factors

STORED_DTYPES = ("float32", "float16", "uint8")
FACTOR_ARRAYS = frozenset({"bases", "hallucinators", "hallucinator-bias"})
WIRE_ARRAYS = frozenset({"images", "labels", "image-range", "lrs"}) | FACTOR_ARRAYS  # what to_arrays makes
MetaValue = str | int | float | bool


@dataclass(frozen=True)
class Summary:
    """A distilled (or sampled) set standing in for a client's private data.

    Attributes
    ----------
    images : torch.Tensor
        float32 (n, C, H, W), normalised like the dataset.
    labels : torch.Tensor
        int64 (n,) hard labels, or float32 (n, K) soft labels (rows are distributions).
    lrs : torch.Tensor | None
        Learned per-step learning rates to train on the summary with, or None.
    meta : dict
        method, ipc, dataset, client-id, epsilon/delta when DP, ... (flat, scalar values).
    factors : Factors | None
        For a factorised summary, what ``images`` were decoded from (and what is sent).
    """

    images: torch.Tensor
    labels: torch.Tensor
    lrs: torch.Tensor | None = None
    meta: dict[str, MetaValue] = field(default_factory=dict)
    factors: Factors | None = None

    @staticmethod
    def from_factors(factors: Factors, base_labels: torch.Tensor, lrs: torch.Tensor | None = None,
                     meta: dict[str, MetaValue] | None = None) -> Summary:
        """A summary of ``factors`` decoded; ``base_labels`` (b,) or (b, K) repeat per hallucinator."""
        factors = factors.detached()
        if base_labels.shape[0] != factors.bases.shape[0]:
            raise SummaryError(f"{factors.bases.shape[0]} bases but {base_labels.shape[0]} labels")
        with torch.no_grad():
            images = factors.decode().contiguous()
        labels = base_labels.detach().cpu().repeat_interleave(factors.hallucinators, dim=0)
        return Summary(images, labels, lrs, dict(meta or {}), factors)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def soft(self) -> bool:
        """True when the labels are (n, K) distributions."""
        return self.labels.dim() == 2

    def hard_labels(self) -> torch.Tensor:
        """int64 (n,) labels (argmax of soft labels)."""
        return self.labels.argmax(1) if self.soft else self.labels

    def with_meta(self, **meta: MetaValue) -> Summary:
        """Return a copy with ``meta`` entries added or replaced."""
        return Summary(self.images, self.labels, self.lrs, {**self.meta, **meta}, self.factors)

    def to_arrays(self, dtype: str = "float32", resolution: int | None = None) -> dict[str, np.ndarray]:
        """Encode for sending: ``images`` in ``dtype`` (and ``resolution`` px), ``labels``, ...

        uint8 stores ``round(255 * (x - lo) / (hi - lo))`` with ``image-range = [lo, hi]``.
        A factorised summary sends ``bases`` (so encoded) and its hallucinators instead of images.
        """
        if dtype not in STORED_DTYPES:
            raise SummaryError(f"unknown summary dtype {dtype!r}; known: {', '.join(STORED_DTYPES)}")
        labels = self.labels.detach().cpu()
        if self.factors is None:
            arrays = _encode_images("images", self.images, dtype, resolution)
        else:
            arrays = _encode_images("bases", self.factors.bases, dtype, resolution)
            arrays["hallucinators"] = self.factors.weight.detach().float().cpu().numpy()
            arrays["hallucinator-bias"] = self.factors.bias.detach().float().cpu().numpy()
            labels = labels[:: self.factors.hallucinators]  # base-major: one label per base
        arrays["labels"] = labels.float().numpy() if self.soft else labels.long().numpy()
        if self.lrs is not None:
            arrays["lrs"] = self.lrs.detach().float().cpu().numpy()
        return arrays

    def wire_meta(self, dtype: str = "float32", resolution: int | None = None) -> dict[str, MetaValue]:
        """Metadata to send beside ``to_arrays(dtype, resolution)``."""
        _, _, h, w = self.images.shape
        return {**self.meta, "stored-dtype": dtype, "stored-resolution": resolution or w,
                "height": h, "width": w}

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray], meta: dict[str, MetaValue]) -> Summary:
        """Decode what ``to_arrays`` produced (expanding dtype and resolution, decoding factors).

        The one strict decoder: it refuses unknown arrays, missing or mixed ones, dtypes and
        shapes that ``to_arrays`` never makes, labels that are not int64 classes or probability
        rows, non-finite factors or labels, and step sizes that are not finite and positive
        (:class:`SummaryError`, naming the problem). What depends on the run - image size,
        channels, class count, caps, value range - is the receiver's policy
        (``server.validation``).
        """
        unknown = set(arrays) - WIRE_ARRAYS
        if unknown:
            raise SummaryError(f"unexpected arrays {sorted(unknown)}")
        factorised = bool(FACTOR_ARRAYS & set(arrays))
        if factorised and "images" in arrays:
            raise SummaryError("a summary sends either images or factors (bases, hallucinators), not both")
        key = "bases" if factorised else "images"
        for needed in (key, "labels"):
            if needed not in arrays:
                raise SummaryError(f"missing the {needed!r} array")
        images = _decode_images(key, arrays[key], arrays.get("image-range"), meta)
        labels = _decode_labels(arrays["labels"], len(images), key)
        lrs = None
        if "lrs" in arrays:
            raw = arrays["lrs"]
            if raw.ndim != 1 or raw.size < 1 or not np.isfinite(raw).all() or (raw <= 0).any():
                raise SummaryError("lrs must be a 1-D array of finite positive step sizes")
            lrs = torch.from_numpy(raw.astype(np.float32))
        if factorised:
            return Summary.from_factors(_factors(images, arrays), labels, lrs, dict(meta))
        return Summary(images.contiguous(), labels, lrs, dict(meta))

    def save(self, path: str | Path) -> None:
        """Write the summary (float32) to ``.pt`` or ``.npz``, metadata included."""
        path = Path(path)
        arrays = self.to_arrays()
        if path.suffix == ".npz":
            meta = np.array([repr(sorted(self.wire_meta().items()))])
            np.savez_compressed(path, **arrays, meta=meta)
        elif path.suffix == ".pt":
            tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
            torch.save({"arrays": tensors, "meta": self.wire_meta()}, path)
        else:
            raise SummaryError(f"summary files end in .pt or .npz, got {path.name}")

    @staticmethod
    def load(path: str | Path) -> Summary:
        """Read a summary written by :meth:`save`."""
        path = Path(path)
        if path.suffix == ".npz":
            import ast

            with np.load(path, allow_pickle=False) as f:
                files = dict(f)
            meta = dict(ast.literal_eval(str(files.pop("meta")[0])))
            return Summary.from_arrays(files, meta)
        if path.suffix == ".pt":
            blob = torch.load(path, weights_only=True)  # tensors and scalars only: no pickle code
            arrays = {k: v.numpy() for k, v in blob["arrays"].items()}
            return Summary.from_arrays(arrays, blob["meta"])
        raise SummaryError(f"summary files end in .pt or .npz, got {path.name}")


def _encode_images(key: str, images: torch.Tensor, dtype: str,
                   resolution: int | None) -> dict[str, np.ndarray]:
    """``{key: images in dtype at resolution}``, plus ``image-range`` for uint8."""
    images = images.detach().float().cpu()
    if resolution is not None and resolution != images.shape[-1]:
        if not 1 <= resolution <= images.shape[-1]:
            raise SummaryError(f"summary resolution must be in [1, {images.shape[-1]}], got {resolution}")
        images = F.interpolate(images, size=(resolution, resolution), mode="area")
    if dtype != "uint8":
        return {key: images.numpy().astype(dtype)}
    lo, hi = float(images.min()), float(images.max())
    scale = (hi - lo) or 1.0
    return {key: ((images - lo) / scale * 255).round().clamp(0, 255).to(torch.uint8).numpy(),
            "image-range": np.array([lo, hi], dtype=np.float32)}


def _decode_images(key: str, raw: np.ndarray, rng: np.ndarray | None,
                   meta: dict[str, MetaValue]) -> torch.Tensor:
    """float32 (n, C, height, width) from what :func:`_encode_images` stored under ``key``."""
    if raw.ndim != 4:
        raise SummaryError(f"{key} must be 4-D (n, C, H, W), got shape {raw.shape}")
    if raw.dtype == np.uint8:
        if rng is None or rng.shape != (2,) or not np.isfinite(rng).all():
            raise SummaryError(f"uint8 {key} need a finite 2-element 'image-range' array")
        lo, hi = float(rng[0]), float(rng[1])
        images = torch.from_numpy(raw.astype(np.float32)) / 255 * ((hi - lo) or 1.0) + lo
    elif raw.dtype in (np.float16, np.float32):
        images = torch.from_numpy(raw.astype(np.float32))
    else:
        raise SummaryError(f"{key} dtype {raw.dtype} is not float32, float16 or uint8")
    height, width = int(meta.get("height", raw.shape[2])), int(meta.get("width", raw.shape[3]))
    if images.shape[-2:] != (height, width) and images.shape[0] > 0:
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False)
    return images.contiguous()


def _decode_labels(raw: np.ndarray, n: int, key: str) -> torch.Tensor:
    """int64 (n,) classes or float32 (n, K) probability rows, one per image (or base)."""
    if raw.ndim < 1 or raw.shape[0] != n:
        raise SummaryError(f"{n} {key} but {raw.shape[0] if raw.ndim else 0} labels")
    if raw.ndim == 1:
        if raw.dtype != np.int64:
            raise SummaryError(f"hard labels must be int64, got {raw.dtype}")
        return torch.from_numpy(raw.copy())
    if raw.ndim != 2:
        raise SummaryError(f"labels must be (n,) or (n, K), got shape {raw.shape}")
    if raw.dtype not in (np.float32, np.float16):
        raise SummaryError(f"soft labels must be float, got {raw.dtype}")
    if not np.isfinite(raw).all():
        raise SummaryError("soft labels contain NaN or Inf")
    if (raw < -1e-6).any() or not np.allclose(raw.sum(1), 1.0, atol=1e-3):
        raise SummaryError("soft labels are not probability distributions (non-negative, summing to 1)")
    return torch.from_numpy(raw.astype(np.float32))


def _factors(bases: torch.Tensor, arrays: dict[str, np.ndarray]) -> Factors:
    """Factors from decoded ``bases`` and the float32 hallucinator arrays (shapes checked)."""
    for key in ("hallucinators", "hallucinator-bias"):
        if key not in arrays:
            raise SummaryError(f"a factorised summary needs the {key!r} array")
        if arrays[key].dtype != np.float32:
            raise SummaryError(f"{key} must be float32, got {arrays[key].dtype}")
        if not np.isfinite(arrays[key]).all():
            raise SummaryError(f"{key} contain NaN or Inf")
    weight, bias = arrays["hallucinators"], arrays["hallucinator-bias"]
    c = bases.shape[1]
    h = weight.shape[0] if weight.ndim == 5 else 0
    if h < 1 or weight.shape[1:3] != (c, c) or weight.shape[3] != weight.shape[4] or weight.shape[3] % 2 == 0:
        raise SummaryError(f"hallucinators must be (h, {c}, {c}, k, k) with h >= 1 and an odd kernel k, "
                           f"got {weight.shape}")
    if bias.shape != (h, c):
        raise SummaryError(f"hallucinator-bias must be ({h}, {c}), got {bias.shape}")
    return Factors(bases, torch.from_numpy(weight.copy()), torch.from_numpy(bias.copy()))


def concat(summaries: list[Summary], num_classes: int) -> Summary:
    """Pool summaries into one; hard and soft labels mix by promoting hard ones to one-hot."""
    if not summaries:
        raise SummaryError("cannot pool an empty list of summaries")
    images = torch.cat([s.images for s in summaries])
    if any(s.soft for s in summaries):
        labels = torch.cat(
            [s.labels if s.soft else F.one_hot(s.labels, num_classes).float() for s in summaries]
        )
    else:
        labels = torch.cat([s.labels for s in summaries])
    return Summary(images, labels, None, {"pooled-from": len(summaries)})
