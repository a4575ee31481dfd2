"""Models that train only their head: embed the records once, then train the head on the features.

A model whose every layer before ``classifier`` is frozen (ScatterNet + linear,
:class:`ddcore.scatter.ScatterLinear`) computes the same features of a record in every epoch of
every round. :func:`trained_part` hands back its classifier and the features of the records,
computed once (no autograd graph, in chunks), so the SGD or DP-SGD steps run on the head alone.
The head is the model's own submodule: training it trains the model, with the same batches,
clipping and noise draws as training the whole model would take. :class:`FeatureCache`, kept by
the caller (a node across rounds, a driver across runs), spares recomputing the features while
neither the records nor the frozen weights change.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

import torch
from torch import nn

from ddcore.models import embed_frozen

logger = logging.getLogger(__name__)

HEAD = "classifier"
CHUNK = 256  # images per no-grad pass of the frozen front


def trainable_head(model: nn.Module) -> nn.Module | None:
    """``model.classifier`` when it is the only part of ``model`` that trains, else None.

    The test is generic: the model has ``embed`` and ``classifier`` (every registered model
    with both computes ``classifier(embed(x))``), the classifier has a trainable parameter, no
    parameter outside it requires a gradient, and no layer outside it behaves differently in
    training (BatchNorm's batch statistics, dropout), so the features of a record are fixed.
    """
    head = getattr(model, HEAD, None)
    if not callable(getattr(model, "embed", None)) or not isinstance(head, nn.Module):
        return None
    if not any(p.requires_grad for p in head.parameters()):
        return None
    inside = {id(p) for p in head.parameters()}
    if any(p.requires_grad for p in model.parameters() if id(p) not in inside):
        return None
    inside_modules = {id(m) for m in head.modules()}
    moded = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    if any(isinstance(m, moded) for m in model.modules() if id(m) not in inside_modules):
        return None
    return head


def frozen_key(model: nn.Module, x: torch.Tensor) -> str:
    """A digest of what the features of ``x`` under ``model`` depend on: the model's type, every state
    entry outside its head (the frozen weights) and the records ``x`` themselves."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}".encode())

    def add(name: str, t: torch.Tensor) -> None:
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())

    for name, t in model.state_dict().items():
        if not name.startswith(HEAD + "."):
            add(name, t)
    add("records", x)
    return digest.hexdigest()


class FeatureCache:
    """The features of the last ``capacity`` (records, frozen weights) pairs, keyed by :func:`frozen_key`.

    The caller keeps it across calls: a DP-FedAvg node across rounds (the frozen weights come
    back unchanged in every global model), the tuning driver across grid points.
    """

    def __init__(self, capacity: int = 1) -> None:
        if capacity < 1:
            raise ValueError(f"a feature cache holds at least 1 entry, got capacity {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        """The features stored under ``key`` (now the most recently used), or None."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: str, features: torch.Tensor) -> None:
        """Store ``features`` under ``key``, dropping the least recently used entry beyond capacity."""
        self._entries[key] = features
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def latest(self) -> tuple[str, torch.Tensor] | None:
        """The most recently used (key, features), or None when empty (what a node keeps)."""
        return next(reversed(self._entries.items()), None)


def features_of(model: nn.Module, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
    """``model.embed(x)`` (n, D) in float32, without autograd, from ``cache`` when it holds it."""
    key = frozen_key(model, x) if cache is not None else ""
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        return cached
    device = next(model.parameters()).device
    features = embed_frozen(model, x.to(device), CHUNK, None)
    if cache is not None:
        cache.put(key, features)
    return features


def trained_part(model: nn.Module, x: torch.Tensor, augmentation: str,
                 cache: FeatureCache | None = None) -> tuple[nn.Module, torch.Tensor]:
    """What to train on what: (head, features of ``x``) when ``model`` trains only its head, else
    (``model``, ``x``).

    ``augmentation`` is the training's DSA strategy: augmented images have other features in
    every epoch, so with any strategy but "none" the whole model trains (and a frozen front
    logs a warning saying what that costs).
    """
    head = trainable_head(model)
    if head is None:
        return model, x
    if augmentation and augmentation != "none":
        logger.warning("only the head of %s trains, but augmentation %r changes its inputs in every "
                       "epoch: training the whole model, which recomputes the frozen front at every "
                       "step; set local-dsa-strategy=none to embed the records once",
                       type(model).__name__, augmentation)
        return model, x
    return head, features_of(model, x, cache)
