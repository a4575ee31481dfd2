"""Wall time and peak memory of a block of work (RSS sampled on Linux; CUDA peak on GPU)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """Resident set size of this process in MiB (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return 0.0


@dataclass
class Measurement:
    """Filled in when the ``measure()`` block ends."""

    seconds: float = 0.0
    peak_rss_mb: float = 0.0  # highest RSS seen while the block ran (sampled every 20 ms)
    peak_cuda_mb: float = 0.0


@contextmanager
def _sampled(read: Callable[[], float], interval: float) -> Iterator[Measurement]:
    """Time the block; a background thread keeps the peak of ``read()`` every ``interval`` s."""
    result = Measurement(peak_rss_mb=read())
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            result.peak_rss_mb = max(result.peak_rss_mb, read())

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result.seconds = time.perf_counter() - start
        result.peak_rss_mb = max(result.peak_rss_mb, read())


@contextmanager
def measure(device: str = "cpu", interval: float = 0.02) -> Iterator[Measurement]:
    """Time the block and sample the process RSS in a background thread (and the CUDA peak)."""
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with _sampled(rss_mb, interval) as result:
        yield result
    if cuda:
        result.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20


def tree_rss_mb(root: int | None = None) -> float:
    """Summed RSS in MiB of process ``root`` (default: this one) and all its descendants.

    Flower's simulation runs clients in Ray worker processes below the driver, so this is
    the memory of the whole simulation. Linux only (0 elsewhere); shared pages count once
    per process, so the figure is an upper bound.
    """
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(pid)  # fields[1] = ppid
            rss[pid] = int(fields[21])  # resident pages
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total * _PAGE / 2**20


@contextmanager
def measure_tree(interval: float = 0.5) -> Iterator[Measurement]:
    """Like :func:`measure`, but the peak is of this process plus all its descendants."""
    with _sampled(tree_rss_mb, interval) as result:
        yield result
