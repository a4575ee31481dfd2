"""Differentiable SGD on the synthetic set (functional forward): the core of DD, MTT and IADD."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ddcore.augment import ONE, augment

Params = dict[str, torch.Tensor]


def params_of(net: nn.Module) -> Params:
    """Detached copies of ``net``'s parameters, by name."""
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def unroll(
    net: nn.Module,
    params: Params,
    images: torch.Tensor,
    labels: torch.Tensor,
    lrs: torch.Tensor,
    strategy: str,
    generator: torch.Generator,
    mode: str = ONE,
) -> Params:
    """Train ``params`` of ``net``'s architecture with one SGD step per entry of ``lrs``.

    Each step is full-batch on ``images`` (n, C, H, W), augmented with ``strategy``; the
    returned parameters keep the graph to ``images``, ``labels`` (if soft) and ``lrs`` (steps,).
    """
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    for lr in lrs:
        logits = functional_call(net, params, (augment(images, strategy, generator, mode),))  # (n, K)
        grads = torch.autograd.grad(F.cross_entropy(logits, labels), list(params.values()), create_graph=True)
        params = {k: p - lr * g for (k, p), g in zip(params.items(), grads, strict=True)}
    return params


def tensor_distances(student: Params, start: Params, target: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor squared distances (T,): student to target, and start to target (MTT's normaliser)."""
    num = torch.stack([((student[k] - target[k]) ** 2).sum() for k in target])
    den = torch.stack([((start[k] - target[k]) ** 2).sum() for k in target])
    return num, den
