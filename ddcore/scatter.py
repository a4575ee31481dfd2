"""ScatterNet features: a fixed, data-independent wavelet feature map with a strong linear ceiling.

The 2-D scattering transform (Mallat 2012; Oyallon & Mallat 2015), J = 2 scales and L = 8
angles, as in Tramer & Boneh (ICLR 2021, "Differentially private learning needs better
features"): a 28x28 image becomes 81 maps of 7x7 (order 0, 16 of order 1, 64 of order 2;
computed by ``kymatio``). Nothing in it is learned, so anyone rebuilds it from its public
parameters, and a linear classifier on it reaches about 90% on Fashion-MNIST.

:class:`ScatterLinear` (model ``scatter``) puts a linear head on it:

    x -> scattering -> every map standardised on its own (per image: data independent)
      -> fixed random projection to ``width`` dims (drawn from the model's generator, frozen)
      -> unit norm -> linear classifier

``embed`` stops before the classifier, so the feature of every record has norm exactly 1 - the
clipping a DP release of sums or second moments needs (:mod:`privacy.class_release`). The
per-map standardisation makes the model blind to any per-channel affine normalisation of its
input (order 1 and 2 scale with it, order 0 shifts and scales), so data normalised with the
training split's constants or with the public ones give the same features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddcore.errors import ConfigError

SCALES = 2  # J
ANGLES = 8  # L


def scattering(shape: tuple[int, int]):
    """kymatio's 2-D scattering for images of ``shape`` (H, W), J = 2, L = 8, on the CPU.

    Imported from its 2-D front end: ``kymatio.torch`` also loads the 3-D transform, whose
    ``scipy.special.sph_harm`` import fails on SciPy >= 1.15.
    """
    try:
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
    except ImportError as exc:  # pragma: no cover - kymatio is a dependency
        raise ConfigError("model 'scatter' needs kymatio (pip install kymatio)") from exc
    height, width = shape
    if min(height, width) < 2 ** SCALES * 2:
        raise ConfigError(f"model 'scatter' needs images of at least {2 ** SCALES * 2}x{2 ** SCALES * 2}, "
                          f"got {height}x{width}")
    return ScatteringTorch2D(J=SCALES, shape=(height, width), L=ANGLES)


def scatter_maps(image_shape: tuple[int, int, int]) -> int:
    """Length of one image's flattened scattering: C (1 + J L + L^2 J (J - 1) / 2) (H / 2^J) (W / 2^J)."""
    channels, height, width = image_shape
    paths = 1 + SCALES * ANGLES + ANGLES ** 2 * SCALES * (SCALES - 1) // 2
    return channels * paths * (height // 2 ** SCALES) * (width // 2 ** SCALES)


class ScatterLinear(nn.Module):
    """ScatterNet, per-map standardisation, a frozen random projection, unit norm, a linear head.

    ``spec.width`` is the projection's dimension (the feature length D); ``depth`` and
    ``norm`` do not apply. The projection is an ``nn.Linear`` without bias, so
    :func:`ddcore.models.reset_parameters` draws it from the model's generator (i.i.d. uniform
    entries: a Johnson-Lindenstrauss map) - two models built from the same seed project alike -
    and it is frozen (``requires_grad`` False): only the classifier learns. The scattering's
    filters are not registered (they are rebuilt from J, L and the shape), so the state dict
    holds the projection and the classifier alone.
    """

    def __init__(self, spec, image_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        _, height, width = image_shape
        self._transform = (scattering((height, width)),)  # a tuple: not a registered submodule
        self.project = nn.Linear(scatter_maps(image_shape), spec.width, bias=False).requires_grad_(False)
        self.classifier = nn.Linear(spec.width, num_classes)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) -> (n, C * 81, H/4 * W/4): every map standardised per image."""
        transform = self._transform[0]
        if transform.tensor0.device != x.device:
            transform.to(x.device)
        s = transform(x.float()).flatten(1, 2).flatten(2)  # (n, C * 81, h * w)
        return (s - s.mean(2, keepdim=True)) / (s.std(2, keepdim=True) + 1e-5)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The unit-norm feature (n, width)."""
        return F.normalize(self.project(self.scatter(x).flatten(1)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
