"""MNIST-format IDX data: exact values, folder layouts, Debian's package, the download, bad files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ddcore import mnistfiles
from ddcore.cli import main
from ddcore.data import DATASETS, load_dataset
from ddcore.errors import DataError
from ddcore.idx import IMAGES_MAGIC, LABELS_MAGIC, read_images

NAMES = mnistfiles.FILE_NAMES  # train images, train labels, test images, test labels
REAL_DOWNLOAD = mnistfiles.torchvision_download


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file: big-endian magic, then one uint32 per dimension, then the uint8 data."""
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_set(folder: Path, gz: bool = False, per_class: tuple[int, int] = (3, 1), size: int = 6,
              seed: int = 0) -> dict[str, np.ndarray]:
    """Write the four files of a tiny 10-class set into ``folder``; return the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for (images, labels), n in zip((NAMES[:2], NAMES[2:]), per_class, strict=True):
        y = rng.permutation(np.repeat(np.arange(10), n)).astype(np.uint8)
        x = rng.integers(0, 256, (len(y), size, size), dtype=np.uint8)
        x[0, 0, 0], x[0, 0, 1] = 0, 255  # both ends of the pixel range
        arrays[images], arrays[labels] = x, y
    for name, array in arrays.items():
        data = idx_bytes(array, IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC)
        path = folder / (f"{name}.gz" if gz else name)
        path.write_bytes(gzip.compress(data) if gz else data)
    return arrays


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path) -> list[tuple[str, Path]]:
    """No network, no dpkg and an empty cache; returns the download calls made."""
    calls: list[tuple[str, Path]] = []

    def no_download(spec: mnistfiles.IdxSet, root: Path) -> None:
        calls.append((spec.name, root))
        raise OSError("offline (test)")

    monkeypatch.setattr(mnistfiles, "torchvision_download", no_download)
    monkeypatch.setattr(mnistfiles, "_dpkg_listing", lambda package: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return calls


@pytest.mark.parametrize("gz", [False, True])
def test_values_round_trip_exactly(tmp_path, gz) -> None:
    arrays = write_set(tmp_path, gz=gz)
    train_x, train_y, test_x, test_y = DATASETS.get("fashion-mnist")(tmp_path, False)
    assert train_x.dtype == np.float32 and train_x.shape == (30, 1, 6, 6) and test_x.shape == (10, 1, 6, 6)
    assert np.array_equal(train_x[:, 0], (arrays[NAMES[0]] / 255.0).astype(np.float32))
    assert np.array_equal(test_x[:, 0], (arrays[NAMES[2]] / 255.0).astype(np.float32))
    assert train_y.dtype == np.int64 and np.array_equal(train_y, arrays[NAMES[1]])
    assert np.array_equal(test_y, arrays[NAMES[3]])
    splits = load_dataset("fashion-mnist", data_dir=tmp_path)  # the files' own split, in file order
    assert splits.train.num_classes == 10 and splits.train.name == "fashion-mnist"
    assert np.array_equal(splits.test.y.numpy(), arrays[NAMES[3]])
    assert splits.train.mean[0] == pytest.approx(arrays[NAMES[0]].mean() / 255, rel=1e-5)


def test_plain_file_wins_over_gz_and_every_pixel_value_is_exact(tmp_path) -> None:
    write_set(tmp_path, gz=True, seed=1)
    every = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    (tmp_path / NAMES[2]).write_bytes(idx_bytes(every, IMAGES_MAGIC))
    (tmp_path / NAMES[3]).write_bytes(idx_bytes(np.arange(4), LABELS_MAGIC))
    (tmp_path / NAMES[0]).write_bytes(idx_bytes(np.repeat(every, 10, axis=0)[:30], IMAGES_MAGIC))
    _, _, test_x, test_y = DATASETS.get("mnist")(tmp_path, False)
    assert np.array_equal(test_x[:, 0], (every / 255.0).astype(np.float32))
    assert test_y.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("name, folder", [("fashion-mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_torchvision_layout(tmp_path, name, folder) -> None:
    arrays = write_set(tmp_path / folder / "raw", gz=name == "mnist")
    splits = load_dataset(name, data_dir=tmp_path, download=False)
    assert splits.train.x.shape == (30, 1, 6, 6)
    assert np.array_equal(splits.train.y.numpy(), arrays[NAMES[1]])


def test_debian_package_found_through_dpkg(tmp_path, monkeypatch, offline) -> None:
    installed = tmp_path / "usr" / "share" / "datasets" / "fashion-mnist"
    arrays = write_set(installed, gz=True)
    listing = "\n".join(["/.", "/usr/share/doc/dataset-fashion-mnist/README.md.gz",
                         *(str(installed / f"{name}.gz") for name in NAMES)])
    asked = []
    monkeypatch.setattr(mnistfiles, "_dpkg_listing", lambda package: asked.append(package) or listing)
    splits = load_dataset("fashion-mnist")
    assert asked == ["dataset-fashion-mnist"] and offline == []
    assert np.array_equal(splits.test.y.numpy(), arrays[NAMES[3]])
    with pytest.raises(DataError, match=r"one of two ways \(no Debian package holds mnist\)"):
        load_dataset("mnist")
    assert asked == ["dataset-fashion-mnist"]


def test_dpkg_query_of_a_package_that_is_not_installed_or_without_dpkg(monkeypatch) -> None:
    assert mnistfiles._dpkg_listing("dataset-feddistill-no-such-package") is None
    assert mnistfiles.debian_folders(None) == []
    monkeypatch.setattr(mnistfiles.shutil, "which", lambda name: None)  # a machine without dpkg
    assert mnistfiles._dpkg_listing("dataset-fashion-mnist") is None


def test_download_goes_to_data_dir_or_the_cache_once(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_download(spec: mnistfiles.IdxSet, root: Path) -> None:
        calls.append(root)
        write_set(root / spec.torchvision_class / "raw", gz=True)

    monkeypatch.setattr(mnistfiles, "torchvision_download", fake_download)
    assert len(load_dataset("fashion-mnist", data_dir=tmp_path / "mine").train) == 30
    assert len(load_dataset("mnist").train) == 30
    assert len(load_dataset("mnist").train) == 30  # read from the cache, not downloaded again
    assert calls == [tmp_path / "mine", tmp_path / "cache" / "feddistill" / "data"]


def test_failed_download_removes_only_the_folders_it_made(tmp_path, monkeypatch) -> None:
    import ddcore.tvcompat

    class Offline:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            raw = Path(root) / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            (raw / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nno network\n")

    fake = SimpleNamespace(datasets=SimpleNamespace(FashionMNIST=Offline))
    monkeypatch.setattr(ddcore.tvcompat, "import_torchvision", lambda: fake)  # offline torchvision
    monkeypatch.setattr(mnistfiles, "torchvision_download", REAL_DOWNLOAD)
    with pytest.raises(DataError, match=r"download failed: RuntimeError: Error downloading \S+ no network"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "new" / "dir")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(DataError):
        load_dataset("fashion-mnist", data_dir=tmp_path / "kept")
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def test_nothing_found_names_all_three_ways_in_one_line(tmp_path, offline) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    cache = tmp_path / "cache" / "feddistill" / "data"
    assert offline == [("fashion-mnist", cache)]
    assert "\n" not in message and "one of three ways" in message
    assert all(name in message for name in NAMES) and "--data-dir DIR" in message
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "package dataset-fashion-mnist not installed" in message
    assert f"download them into --data-dir or {cache}" in message
    assert "download failed: OSError: offline (test)" in message
    with pytest.raises(DataError, match="download turned off"):
        load_dataset("fashion-mnist", download=False)
    assert len(offline) == 1


def bad_file(folder: Path, case: str) -> str:
    """Spoil a tiny set in ``folder`` the way ``case`` says; return the file name the error names."""
    arrays = write_set(folder, gz=case == "corrupt gzip")
    if case == "missing file":
        (folder / NAMES[3]).unlink()
        return f"lacks {NAMES[3]}"
    if case == "truncated":
        data = (folder / NAMES[0]).read_bytes()
        (folder / NAMES[0]).write_bytes(data[:-5])
        return f"{NAMES[0]} is truncated: its header says 30 images of shape (6, 6) (1096 bytes)"
    if case == "truncated header":
        (folder / NAMES[2]).write_bytes(idx_bytes(arrays[NAMES[2]], IMAGES_MAGIC)[:10])
        return f"{NAMES[2]} is truncated: 10 bytes, too few for its 16-byte header"
    if case == "trailing bytes":
        (folder / NAMES[1]).write_bytes((folder / NAMES[1]).read_bytes() + b"\0")
        return f"{NAMES[1]} has trailing bytes"
    if case == "labels given as images":
        (folder / NAMES[0]).write_bytes((folder / NAMES[1]).read_bytes())
        return f"{NAMES[0]} is not an IDX images file: magic 2049 is an IDX labels file"
    if case == "not idx":
        (folder / NAMES[3]).write_bytes(b"<html>not found</html>")
        return f"{NAMES[3]} is not an IDX labels file: first four bytes read 0x3c68746d"
    if case == "count mismatch":
        (folder / NAMES[1]).write_bytes(idx_bytes(arrays[NAMES[1]][:29], LABELS_MAGIC))
        return f"{NAMES[0]} holds 30 images but {folder / NAMES[1]} holds 29 labels"
    if case == "corrupt gzip":
        data = bytearray((folder / f"{NAMES[2]}.gz").read_bytes())
        (folder / f"{NAMES[2]}.gz").write_bytes(bytes(data[: len(data) // 2]))
        return f"{NAMES[2]}.gz is not a valid gzip file"
    if case == "sizes differ":
        (folder / NAMES[2]).write_bytes(idx_bytes(np.zeros((10, 5, 5)), IMAGES_MAGIC))
        return f"holds (6, 6) images but {folder / NAMES[2]} holds (5, 5)"
    raise ValueError(case)


CASES = ["missing file", "truncated", "truncated header", "trailing bytes", "labels given as images",
         "not idx", "count mismatch", "corrupt gzip", "sizes differ"]


@pytest.mark.parametrize("case", CASES)
def test_bad_files_name_the_file_and_the_problem(tmp_path, case) -> None:
    expected = bad_file(tmp_path, case)
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert expected in str(info.value) and str(tmp_path) in str(info.value)


def test_unreadable_idx_path_is_a_data_error(tmp_path) -> None:
    with pytest.raises(DataError, match=r"cannot read .*missing"):
        read_images(tmp_path / "missing")


@pytest.mark.parametrize("case", ["truncated", "labels given as images", "missing file"])
def test_cli_bad_idx_folder_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case) -> None:
    expected = bad_file(tmp_path / "data", case)
    out = tmp_path / "run"
    code = main(["distill", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"),
                 "--method", "random_real", "--ipc", "1", "--preset", "quick", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: ") and expected in err
    assert not out.exists()
