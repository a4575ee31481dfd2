"""Models: the distillation ConvNet, an MLP, LeNet, a small ResNet, the DP-SGD CNN and ScatterNet + linear
(:mod:`ddcore.scatter`), built from a seeded generator."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ddcore.errors import ConfigError
from ddcore.registry import Registry
from ddcore.scatter import ScatterLinear

NORMS = ("instance", "group", "none", "batch")


@dataclass(frozen=True)
class ModelSpec:
    """Which network to build and its size."""

    name: str = "convnet"  # convnet | mlp | lenet | resnet | dpcnn | scatter
    # channels of each ConvNet block / of the ResNet stem / hidden units of the MLP / scatter's projection
    width: int = 32
    depth: int = 3  # ConvNet blocks / ResNet residual blocks (each halves the resolution)
    norm: str = "instance"  # instance | group | none | batch (batch is not DP-compatible)

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 1:
            raise ConfigError(f"model width and depth must be >= 1, got {self.width}, {self.depth}")
        if self.norm not in NORMS:
            raise ConfigError(f"unknown norm {self.norm!r}; known: {', '.join(NORMS)}")


ModelBuilder = Callable[[ModelSpec, tuple[int, int, int], int], nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "instance":  # instance norm with affine terms, as GroupNorm(C, C): faster on CPU
        return nn.GroupNorm(channels, channels)
    if norm == "group":
        return nn.GroupNorm(min(4, channels), channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class ConvNet(nn.Module):
    """The ConvNet of the dataset-distillation literature: depth x [conv3x3, norm, ReLU, avgpool2].

    A block pools only while the feature map stays at least 2x2, so small images (8x8) keep
    spatial features in their last blocks instead of being averaged down to one pixel.
    """

    def __init__(self, spec: ModelSpec, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = image_shape
        layers: list[nn.Module] = []
        for _ in range(spec.depth):
            layers += [
                nn.Conv2d(channels, spec.width, kernel_size=3, padding=1),
                _norm_layer(spec.norm, spec.width),
                nn.ReLU(inplace=True),
            ]
            channels = spec.width
            if height >= 4 and width >= 4:  # pool while the result stays >= 2x2 (small images)
                layers.append(nn.AvgPool2d(2))
                height, width = height // 2, width // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * height * width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features before the classifier: (n, C, H, W) -> (n, D)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class MLP(nn.Module):
    """A two-hidden-layer perceptron on flattened pixels."""

    def __init__(self, spec: ModelSpec, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        hidden = max(spec.width, 16) * 2
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(image_shape), hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(hidden, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


class LeNet(nn.Module):
    """LeNet-5 style: two conv/pool stages and three fully connected layers."""

    def __init__(self, spec: ModelSpec, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = image_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * (height // 4) * (width // 4), 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ResidualBlock(nn.Module):
    """Two conv3x3 + norm layers around a shortcut; the first conv may stride and widen."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"  # a norm layer's shift makes a conv bias redundant
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias),
            _norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=bias),
            _norm_layer(norm, out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:  # project the input to the body's shape
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=bias),
                _norm_layer(norm, out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet (ResNet-8 at depth 3): a conv3x3 stem, ``depth`` residual blocks, global pool.

    Each block halves the resolution while it is >= 4 (instance norm needs more than one pixel)
    and doubles the channels, from ``width`` up to at most ``4 * width``; a linear head reads the
    globally pooled features.
    """

    def __init__(self, spec: ModelSpec, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = image_shape
        self.stem = nn.Sequential(
            nn.Conv2d(channels, spec.width, kernel_size=3, padding=1, bias=spec.norm == "none"),
            _norm_layer(spec.norm, spec.width),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        channels = spec.width
        for i in range(spec.depth):
            out = spec.width * 2 ** min(i, 2)
            stride = 2 if min(height, width) >= 4 else 1
            blocks.append(ResidualBlock(channels, out, stride, spec.norm))
            channels, height, width = out, -(-height // stride), -(-width // stride)  # ceil: padding 1
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features of the last block: (n, C, H, W) -> (n, D)."""
        return self.pool(self.blocks(self.stem(x))).flatten(1)  # (n, C', h, w) -> (n, C')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class DPCNN(nn.Module):
    """The CNN of the DP-SGD literature, with tanh ("tempered sigmoid") activations and no norm layers.

    Papernot et al. (AAAI 2021) and Tramer & Boneh (ICLR 2021, their end-to-end Fashion-MNIST
    baseline: 86.0% at epsilon 3) train it with DP-SGD: conv 8x8 stride 2 (``width / 2``
    channels), max-pool 2 stride 1, conv 4x4 stride 2 (``width`` channels), max-pool 2 stride 1,
    a hidden layer of ``width`` units and the classifier; the default width 32 is their network
    (26k parameters on 28x28). Bounded activations keep clipped per-example gradients informative,
    and without norm layers each example's gradient is its own. ``depth`` and ``norm`` do not apply.
    """

    def __init__(self, spec: ModelSpec, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        channels, height, width = image_shape
        if min(height, width) < 16:
            raise ConfigError(f"model dpcnn needs images of at least 16x16, got {height}x{width}")
        half = max(spec.width // 2, 1)
        # side after conv 8x8/2 pad 3 (s // 2), pool (-1), conv 4x4/2 ((s - 4) // 2 + 1), pool (-1)
        side = [((s // 2 - 1) - 4) // 2 for s in (height, width)]
        self.features = nn.Sequential(
            nn.Conv2d(channels, half, kernel_size=8, stride=2, padding=3),
            nn.Tanh(),
            nn.MaxPool2d(2, stride=1),
            nn.Conv2d(half, spec.width, kernel_size=4, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(2, stride=1),
            nn.Flatten(),
            nn.Linear(spec.width * side[0] * side[1], spec.width),
            nn.Tanh(),
        )
        self.classifier = nn.Linear(spec.width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS.register("convnet")(ConvNet)
MODELS.register("mlp")(MLP)
MODELS.register("lenet")(LeNet)
MODELS.register("resnet")(ResNet)
MODELS.register("dpcnn")(DPCNN)
MODELS.register("scatter")(ScatterLinear)


def embed_frozen(net: nn.Module, x: torch.Tensor, chunk: int, dtype: torch.dtype | None) -> torch.Tensor:
    """``net.embed(x)`` with no autograd graph, ``chunk`` images per pass, as float32 (n, D).

    ``dtype`` (e.g. ``torch.bfloat16``) runs the passes under autocast; ``None`` keeps float32.
    Small chunks keep each layer's activations in cache: on a 2-core CPU, 2,560 Fashion-MNIST
    images through ConvNet-128 take about 2.5x less time in chunks of 64 under bf16 than in one
    fp32 batch (``python -m simulations.speed``).
    """
    enabled = dtype is not None
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
        return torch.cat([net.embed(part).float() for part in x.split(chunk)])


def reset_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise every layer like PyTorch's defaults, drawing from ``generator`` only."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.GroupNorm | nn.BatchNorm2d) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def build_model(
    spec: ModelSpec,
    image_shape: tuple[int, int, int],
    num_classes: int,
    generator: torch.Generator,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build the network ``spec`` names, initialised from ``generator``, on ``device``."""
    model = MODELS.get(spec.name)(spec, image_shape, num_classes)
    return reset_parameters(model, generator).to(device)


ModelFactory = Callable[[torch.Generator], nn.Module]


def model_factory(
    spec: ModelSpec,
    image_shape: tuple[int, int, int],
    num_classes: int,
    device: str | torch.device = "cpu",
) -> ModelFactory:
    """Return ``generator -> fresh model``, the factory every method and trainer takes."""
    MODELS.get(spec.name)  # fail early on an unknown name

    def make(generator: torch.Generator) -> nn.Module:
        return build_model(spec, image_shape, num_classes, generator, device)

    return make
