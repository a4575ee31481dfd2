"""Pieces every method shares: per-class sampling of real data and the initial synthetic set."""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from ddcore.config import DistillConfig
from ddcore.data import Dataset
from ddcore.errors import ConfigError
from ddcore.factorised import Factors, init_hallucinators
from ddcore.summary import Summary


class Schedule:
    """The iterations a method runs: ``cfg.iterations``, or fewer once ``cfg.time_budget`` runs out.

    Iterate it instead of ``range(cfg.iterations)``. The budget is checked before each iteration
    but the first, so a run always makes at least one update and stops at the first iteration
    that would start past the budget (the last one may end up to one iteration late).
    ``meta()`` records what was done, for the summary.
    """

    def __init__(self, cfg: DistillConfig) -> None:
        self.planned = cfg.iterations
        self.budget = cfg.time_budget
        self.done = 0
        self.seconds = 0.0

    def __iter__(self) -> Iterator[int]:
        start = time.perf_counter()
        for it in range(self.planned):
            if it > 0 and self.budget > 0 and time.perf_counter() - start >= self.budget:
                break
            yield it
            self.done = it + 1
            self.seconds = time.perf_counter() - start

    def meta(self) -> dict[str, int | float]:
        """``iterations-done`` and ``distill-seconds`` (the optimisation loop's wall time)."""
        return {"iterations-done": self.done, "distill-seconds": round(self.seconds, 3)}


# The image side the SGD methods' step sizes were tuned on (MNIST, 28x28) and its pixel count.
REFERENCE_PIXELS = 28 * 28


def sgd_image_step(tuned: float, image_shape: tuple[int, int, int]) -> float:
    """The SGD step size on the images for ``image_shape``: ``tuned`` (on 28x28) times H*W / 784.

    A matching loss reaches one pixel through features that average it with its neighbours, so
    its gradient per pixel shrinks as the image grows; the first convolution mixes a pixel's
    channels into the same features, so the count that matters is H*W, not C*H*W. Measured at
    the start of DM and GM (real images, default ConvNet): the RMS gradient per pixel is 11x (DM)
    and 25x (GM) larger on 8x8 digits than on 28x28 MNIST, where H*W is 12x smaller. An SGD step
    moves a pixel by lr times its gradient, so scaling lr with H*W keeps the move per step
    comparable across sizes. On 8x8 digits at IPC 1 (3 seeds; random real images 64.6%) DM went
    from 78.4% (step 1.0) to 83.9% and GM from 69.1% (step 0.1) to 79.1% (before GM's fresh
    network per update on such images, :func:`ddcore.methods.gm.networks_per_update`); on generated 32x32x3
    data the per-pixel gradient is close to MNIST's and the step barely changes (x1.3). The factor
    is exactly 1.0 on 28x28 data, so every MNIST and Fashion-MNIST default is unchanged. Adam (DD,
    MTT, IADD) divides out the gradient's scale and needs no such rule.
    """
    _, height, width = image_shape
    return tuned * ((height * width) / REFERENCE_PIXELS)


class ClassIndex:
    """Positions of each class in a label vector, for seeded per-class sampling."""

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        self.positions = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]

    def count(self, c: int) -> int:
        return int(self.positions[c].numel())

    def present(self) -> list[int]:
        """Classes with at least one example."""
        return [c for c, pos in enumerate(self.positions) if pos.numel() > 0]

    def sample(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """Up to ``n`` distinct positions of class ``c``, drawn with ``generator``."""
        pos = self.positions[c]
        return pos[torch.randperm(pos.numel(), generator=generator)[:n]]


def check_ipc(data: Dataset, ipc: int) -> None:
    """The one ipc rule: ``ipc`` must not exceed the largest class of ``data``.

    Classes with fewer examples than ``ipc`` contribute all of them (:func:`per_class_counts`),
    so a client of a skewed partition still sends what it has; an ipc that no class can fill
    is a mistake. Checked up front for the central data and for every client's partition.
    """
    index = ClassIndex(data.y, data.num_classes)
    if not index.present():
        raise ConfigError(f"{data.name}: no examples to distill")
    largest = max(index.count(c) for c in index.present())
    if ipc > largest:
        raise ConfigError(f"ipc {ipc} is larger than every class of {data.name} (largest: {largest} "
                          f"examples); use --ipc <= {largest}")


def per_class_counts(data: Dataset, ipc: int) -> dict[int, int]:
    """Images to make per present class: ``min(ipc, examples of the class)`` (:func:`check_ipc`)."""
    check_ipc(data, ipc)
    index = ClassIndex(data.y, data.num_classes)
    return {c: min(ipc, index.count(c)) for c in index.present()}


def initial_images(
    data: Dataset, cfg: DistillConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Starting synthetic images and their labels, class by class.

    ``init="real"`` takes distinct random real images of the class; ``init="noise"`` draws
    N(0, 1) in normalised space (no private pixel enters the summary).
    """
    index = ClassIndex(data.y, data.num_classes)
    images, labels = [], []
    for c, k in per_class_counts(data, cfg.ipc).items():
        if cfg.init == "real":
            images.append(data.x[index.sample(c, k, generator)])
        else:
            images.append(torch.randn((k, *data.image_shape), generator=generator))
        labels.append(torch.full((k,), c, dtype=torch.long))
    return torch.cat(images).clone(), torch.cat(labels)


def start(
    data: Dataset, cfg: DistillConfig, init: Summary | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (a leaf tensor to optimise, on ``cfg.device``) and labels to start from."""
    if init is not None:
        images, labels = init.images.detach().clone(), init.hard_labels().clone()
    else:
        images, labels = initial_images(data, cfg, generator)
    return images.to(cfg.device).requires_grad_(True), labels.to(cfg.device)


def make_summary(images: torch.Tensor, labels: torch.Tensor, data: Dataset, cfg: DistillConfig) -> Summary:
    """Wrap the finished tensors with the metadata every summary carries.

    The images are clamped to the values a real pixel can take (``data.pixel_bounds()``): a
    summary is a set of images, and optimisation (noise starts, DP noise) can push values far
    outside, which the server rejects. Clamping is post-processing: no privacy cost.
    """
    return Summary(
        images.detach().cpu().float().clamp(*data.pixel_bounds()).contiguous(),
        labels.detach().cpu(),
        None,
        {"method": cfg.method, "ipc": cfg.ipc, "dataset": data.name, "seed": cfg.seed,
         "num-classes": data.num_classes, "init": cfg.init},
    )


class Synthetic:
    """What a method optimises: the images themselves, or factors decoded into images.

    A method steps ``param_groups(lr)`` and reads ``images()`` (differentiable, recomputed
    after every step) with ``labels``; plain sets return their leaf tensor, factorised ones
    (``cfg.factorised``, :mod:`ddcore.factorised`) decode bases and hallucinators.
    """

    def __init__(self, leaves: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig,
                 hallucinators: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.leaves = leaves  # (n, C, H, W) images, or (b, C, H, W) bases
        self.hallucinators = hallucinators  # weight (h, C, C, k, k) and bias (h, C), leaf tensors
        self.factor_lr = cfg.factor_lr
        h = 1 if hallucinators is None else hallucinators[0].shape[0]
        self.labels = labels.repeat_interleave(h)  # base-major, like the decoded images

    @staticmethod
    def wrap(images: torch.Tensor, labels: torch.Tensor, cfg: DistillConfig,
             generator: torch.Generator) -> Synthetic:
        """``images`` as they are, or as the bases of new hallucinators when ``cfg.factorised``."""
        if not cfg.factorised:
            return Synthetic(images, labels, cfg)
        weight, bias = init_hallucinators(cfg.factor_hallucinators, images.shape[1], generator)
        leaves = (weight.to(images.device).requires_grad_(True), bias.to(images.device).requires_grad_(True))
        return Synthetic(images, labels, cfg, leaves)

    def images(self) -> torch.Tensor:
        """The synthetic images (n, C, H, W), differentiable in the leaves."""
        if self.hallucinators is None:
            return self.leaves
        return Factors(self.leaves, *self.hallucinators).decode()

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser groups: the images or bases at ``lr``, hallucinators at ``lr * factor_lr``."""
        groups = [{"params": [self.leaves], "lr": lr}]
        if self.hallucinators is not None:
            groups.append({"params": list(self.hallucinators), "lr": lr * self.factor_lr})
        return groups

    def summary(self, data: Dataset, cfg: DistillConfig) -> Summary:
        """The finished set as a :class:`Summary` (factorised ones keep their factors)."""
        if self.hallucinators is None:
            return make_summary(self.leaves, self.labels, data, cfg)
        h = self.hallucinators[0].shape[0]
        plain = make_summary(self.leaves, self.labels[::h], data, cfg)  # its images: the clamped bases
        return Summary.from_factors(Factors(plain.images, *self.hallucinators), plain.labels, None,
                                    {**plain.meta, "factorised": True, "factor-hallucinators": h})


def start_synthetic(data: Dataset, cfg: DistillConfig, init: Summary | None,
                    generator: torch.Generator) -> Synthetic:
    """The :class:`Synthetic` set to start from (see :func:`start`); factorised ones resume factors."""
    if not (cfg.factorised and init is not None):
        return Synthetic.wrap(*start(data, cfg, init, generator), cfg, generator)
    if init.factors is None:
        raise ConfigError("factorised distillation resumes only from a factorised summary; "
                          "start without one or drop factorised")
    f = init.factors
    bases, weight, bias = (t.detach().clone().to(cfg.device).requires_grad_(True)
                           for t in (f.bases, f.weight, f.bias))
    return Synthetic(bases, init.hard_labels()[:: f.hallucinators].to(cfg.device), cfg, (weight, bias))
