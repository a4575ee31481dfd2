"""A device's own data, loaded whole and checked against the run before any distillation.

On a deployed node the private file is the node's training data: all of it is distilled
(no test split: nothing on a node would evaluate one). Before that, every way the file can
disagree with the run is an error naming the mismatch and the fix: image shape, channels,
dtype, pixel range, labels and their range, an empty file. Images are normalised with the
run's mean and std (sent by the server), not with statistics of the private file: the
summary must live in the same normalised space as the server's test set and every other
client's summary.

Accepted ``.npz`` (arrays ``x`` and ``y``; ``x_test``/``y_test`` are ignored on a node):

- ``x``: uint8 pixels in 0..255, or float16/32/64 raw pixels in 0..1 or 0..255 (not normalised);
  shape (N, H, W) for one channel, (N, H, W, C) or (N, C, H, W), matching the run's C x H x W.
- ``y``: integer class indices, shape (N,) (or (N, 1)), each in 0..K-1 for the run's K classes.

An ImageFolder directory works too; its class folders must be named by class index
(``0``, ``1``, ...) so that labels mean the same on every node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddcore.data import Dataset, read_image_folder, read_npz
from ddcore.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSpec:
    """What the run's images look like: the dataset's name, (C, H, W), classes, mean and std."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @staticmethod
    def of(data: Dataset) -> DataSpec:
        """The spec of a loaded dataset split (its normalisation is the training split's)."""
        return DataSpec(data.name, data.image_shape, data.num_classes, tuple(data.mean), tuple(data.std))

    def describe(self) -> str:
        c, h, w = self.image_shape
        return f"the run's dataset {self.name} has {c}x{h}x{w}"


def load_device_data(path: str | Path, spec: DataSpec) -> Dataset:
    """All of a device's ``.npz`` file or ImageFolder as one Dataset, checked against ``spec``.

    Raises
    ------
    DataError
        One line naming the file and the first mismatch with the run, and how to fix it.
    """
    path = Path(path)
    where = f"device data {path}"
    if path.is_dir():
        x, y = _image_folder(path, spec, where)
    elif path.is_file():
        files = read_npz(path)
        if "x_test" in files:
            logger.info("%s: x_test/y_test are not used on a node; x and y are distilled whole", where)
        x, y = files["x"], files["y"]
    else:
        raise DataError(f"{where}: no such file or directory; set the node's data-path to an .npz or an "
                        "ImageFolder")
    pixels = device_pixels(x, spec, where)  # (N, C, H, W) in [0, 1]
    labels = device_labels(y, len(pixels), spec, where)
    m = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    normalised = torch.from_numpy(((pixels - m) / s).astype(np.float32))
    return Dataset(normalised, torch.from_numpy(labels), spec.num_classes, spec.mean, spec.std, path.stem)


def device_pixels(x: np.ndarray, spec: DataSpec, where: str) -> np.ndarray:
    """Images as float32 (N, C, H, W) in [0, 1], or DataError naming how they differ from ``spec``."""
    if x.ndim < 1 or x.shape[0] == 0 or x.size == 0:
        raise DataError(f"{where}: holds no images (x has shape {x.shape}); put the node's images in x")
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: images are {x.dtype}; give uint8 pixels (0..255) or floats "
                        "(0..1 or 0..255), e.g. x.astype(np.uint8)")
    x = _as_nchw(x, spec, where)
    if x.dtype == np.uint8:
        return (x / 255.0).astype(np.float32)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: images contain NaN or Inf values; remove or repair those images")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 255.0:
        raise DataError(f"{where}: pixel values span {lo:.3g}..{hi:.3g}; give raw pixels in 0..1 or 0..255 "
                        "(not normalised: the node normalises with the run's mean and std)")
    return x / 255.0 if hi > 1.0 else x


def _as_nchw(x: np.ndarray, spec: DataSpec, where: str) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) as (N, C, H, W), if it matches ``spec``'s C x H x W."""
    c, h, w = spec.image_shape
    if x.ndim == 3:
        found = (1, *x.shape[1:])
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1:] == (c, h, w):
        return x
    elif x.ndim == 4 and x.shape[1:] == (h, w, c):
        return x.transpose(0, 3, 1, 2)
    elif x.ndim == 4:
        channels_last = x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
        found = (x.shape[3], x.shape[1], x.shape[2]) if channels_last else x.shape[1:]
    else:
        raise DataError(f"{where}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W); got shape {x.shape}")
    if found == (c, h, w):
        return x
    fixes = []
    if found[0] != c:
        fixes.append(f"convert them to {_channels(c)}")
    if found[1:] != (h, w):
        fixes.append(f"resize them to {h}x{w}")
    raise DataError(f"{where}: images are {found[0]}x{found[1]}x{found[2]} but {spec.describe()}; "
                    f"{' and '.join(fixes)}")


def _channels(c: int) -> str:
    return {1: "grayscale (1 channel)", 3: "RGB (3 channels)"}.get(c, f"{c} channels")


def device_labels(y: np.ndarray, n: int, spec: DataSpec, where: str) -> np.ndarray:
    """Labels as int64 (N,), or DataError naming how they differ from ``spec``."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise DataError(f"{where}: labels must be class indices of shape (N,), got shape {y.shape}"
                        + ("; for one-hot labels use y.argmax(axis=1)" if y.ndim == 2 else ""))
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels are {y.dtype}; give integer class indices, e.g. y.astype(np.int64)")
    if len(y) != n:
        raise DataError(f"{where}: {n} images but {len(y)} labels; give one label per image")
    lo, hi, k = int(y.min()), int(y.max()), spec.num_classes
    if lo < 0 or hi >= k:
        raise DataError(f"{where}: labels span {lo}..{hi} but the run's dataset {spec.name} has {k} classes "
                        f"(0..{k - 1}); map the labels to the run's classes")
    return y.astype(np.int64)


def _image_folder(path: Path, spec: DataSpec, where: str) -> tuple[np.ndarray, np.ndarray]:
    """An ImageFolder's images and labels, its class folders read as class indices."""
    images, idx, classes = read_image_folder(path)
    if not all(name.isdigit() for name in classes):
        raise DataError(f"{where}: class folders {classes[:5]} must be named by class index (0, 1, ...) so "
                        "labels mean the same on every node; rename them")
    labels = np.asarray([int(name) for name in classes], np.int64)[idx]
    if spec.image_shape[0] == 1 and images.ndim == 4 and images.shape[-1] == 3 \
            and (images == images[..., :1]).all():
        images = images[..., 0]  # grayscale files: the loader returns them as RGB with equal channels
    return images, labels
