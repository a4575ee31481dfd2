"""Find and read the four IDX files of MNIST or Fashion-MNIST: a folder, Debian's package or a download."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddcore.errors import DataError
from ddcore.idx import read_images, read_labels

TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
FILE_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)


@dataclass(frozen=True)
class IdxSet:
    """Where one MNIST-format data set can come from.

    Parameters
    ----------
    name : str
        Its registered dataset name (``"fashion-mnist"``).
    torchvision_class : str
        Its torchvision class; torchvision keeps the files in ``<root>/<class>/raw``.
    debian_package : str or None
        The Debian package that installs the four files, if there is one.
    """

    name: str
    torchvision_class: str
    debian_package: str | None = None


MNIST = IdxSet("mnist", "MNIST")  # apt-cache search finds no Debian package of the MNIST digits
FASHION_MNIST = IdxSet("fashion-mnist", "FashionMNIST", "dataset-fashion-mnist")


def load_idx_set(
    spec: IdxSet, data_dir: Path | None, download: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return train images, train labels, test images, test labels (uint8) of ``spec``.

    The files are looked for in ``data_dir`` and ``data_dir/<class>/raw``; without ``data_dir``,
    where ``dpkg-query -L <debian_package>`` says they are installed, then in the download cache
    (`default_cache_dir`). If none holds all four and ``download`` is set, torchvision downloads
    them into ``data_dir`` (or the cache). Otherwise one `DataError` names every way to get them.
    """
    files = locate(spec, data_dir, download)
    train_x, train_y = _read_split(files[TRAIN_IMAGES], files[TRAIN_LABELS])
    test_x, test_y = _read_split(files[TEST_IMAGES], files[TEST_LABELS])
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"{files[TRAIN_IMAGES]} holds {train_x.shape[1:]} images but {files[TEST_IMAGES]} "
                        f"holds {test_x.shape[1:]}; both splits must come from one data set")
    return train_x, train_y, test_x, test_y


def locate(spec: IdxSet, data_dir: Path | None, download: bool) -> dict[str, Path]:
    """Return the path of each of the four files (by `FILE_NAMES`), downloading them if allowed."""
    if data_dir is not None:
        folders, no_package = [data_dir, data_dir / spec.torchvision_class / "raw"], False
    else:
        debian = debian_folders(spec.debian_package)
        no_package = spec.debian_package is not None and not debian
        folders = [*debian, default_cache_dir() / spec.torchvision_class / "raw"]
    found = {folder: files_in(folder) for folder in folders}
    for files in found.values():
        if len(files) == len(FILE_NAMES):
            return files
    root = data_dir if data_dir is not None else default_cache_dir()
    failure = "download turned off"
    if download:
        try:
            torchvision_download(spec, root)
        except Exception as exc:  # network errors come in many types
            failure = f"download failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        else:
            files = files_in(root / spec.torchvision_class / "raw")
            if len(files) == len(FILE_NAMES):
                return files
            failure = "the download did not leave all four files"
    if no_package:
        failure = f"package {spec.debian_package} not installed; {failure}"
    raise DataError(_not_found_message(spec, found, failure))


def files_in(folder: Path) -> dict[str, Path]:
    """The IDX files present in ``folder`` by name, each plain or ``.gz`` (plain first)."""
    files = {}
    for name in FILE_NAMES:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                files[name] = candidate
                break
    return files


def debian_folders(package: str | None) -> list[Path]:
    """Folders where the package manager says ``package`` installed IDX files (none without dpkg)."""
    listing = _dpkg_listing(package) if package is not None else None
    if listing is None:
        return []
    names = {f"{name}{ext}" for name in FILE_NAMES for ext in ("", ".gz")}
    paths = (Path(line.strip()) for line in listing.splitlines())
    return list(dict.fromkeys(path.parent for path in paths if path.name in names))


def _dpkg_listing(package: str) -> str | None:
    """What ``dpkg-query -L package`` prints; None without dpkg or when the package is not installed."""
    if shutil.which("dpkg-query") is None:
        return None
    try:
        done = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True, timeout=60,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def default_cache_dir() -> Path:
    """Where a download goes without ``--data-dir``: ``$XDG_CACHE_HOME/feddistill/data``.

    ``XDG_CACHE_HOME`` defaults to ``~/.cache``.
    """
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "feddistill" / "data"


def torchvision_download(spec: IdxSet, root: Path) -> None:
    """Download the four files with torchvision into ``root/<class>/raw``.

    Folders this call created are removed again if the download fails.
    """
    from ddcore.tvcompat import import_torchvision

    made = None
    folder = root / spec.torchvision_class / "raw"
    while not folder.exists() and folder != folder.parent:
        made, folder = folder, folder.parent
    try:
        getattr(import_torchvision().datasets, spec.torchvision_class)(root=str(root), train=True,
                                                                        download=True)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def _read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one split's images and labels and check that they pair up."""
    images, labels = read_images(images_path), read_labels(labels_path)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
                        "labels; give the images and labels files of the same split")
    return images, labels


def _not_found_message(spec: IdxSet, found: dict[Path, dict[str, Path]], failure: str) -> str:
    """One line: what was looked for where, and the three ways to get the files."""
    seen = []
    for folder, files in found.items():
        if files:
            missing = ", ".join(f"{name}[.gz]" for name in FILE_NAMES if name not in files)
            seen.append(f"{folder} lacks {missing}")
        else:
            seen.append(f"none in {folder}")
    raw = f"DIR/{spec.torchvision_class}/raw"
    ways = [f"--data-dir DIR with {', '.join(FILE_NAMES)} (each may be .gz) in DIR or {raw}"]
    if spec.debian_package is not None:
        ways.append(f"sudo apt-get install {spec.debian_package} (then no --data-dir is needed)")
    ways.append(f"a network connection, for torchvision to download them into --data-dir or "
                f"{default_cache_dir()}")
    count = "three ways" if len(ways) == 3 else f"two ways (no Debian package holds {spec.name})"
    found_where = f"{spec.name} files not found ({'; '.join(seen)}; {failure})"
    return f"{found_where}. Get them one of {count}: " + "; or ".join(ways)
