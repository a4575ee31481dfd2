"""A federated system's whole recipe in one process, so an attacker can repeat it per shadow model.

LiRA (:mod:`privacy.attacks.membership`) needs shadow models trained *the way the target was*.
For a distillation system that is: split the data among the clients, let every client distill
its part (:func:`client.task.distill_local`, the code a Flower client runs), pool the summaries
and train a fresh global model on them (the server's training, ``cfg.train``). For FedAvg it is
``fedavg_rounds`` rounds of every client's local update (:func:`client.task.fedavg_local`, or
:func:`client.task.dp_fedavg_local` with DP) averaged with weights proportional to the clients'
example counts - what Flower's ``FedAvg`` strategy does with the same replies. Nothing here
talks to Flower: the per-client and per-server steps are the ones the Flower apps call, run in
order in this process, so one shadow costs one system run and no simulation start-up.

Clients get an IID random split (:func:`split_clients`); every client takes part in every round.
It lives in ``simulations`` because it runs the client's steps (:mod:`client.task`) beside the
server's: ``privacy`` sits below ``client`` and never imports it (the import-linter contracts in
pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ddcore.data import Dataset
from ddcore.errors import ConfigError
from ddcore.frozen import FeatureCache
from ddcore.models import build_model
from ddcore.runconfig import RunConfig
from ddcore.summary import Summary, concat
from ddcore.train import train_model

KINDS = ("distill", "fedavg")


@dataclass(frozen=True)
class RecipeOutput:
    """What one run of a system leaves behind: the global model, the pooled summary (distillation
    only) and the largest epsilon any client's accountant spent (None without DP)."""

    model: nn.Module
    pooled: Summary | None
    eps_spent: float | None


# (one client's data per client, generator) -> the run's output
Recipe = Callable[[list[Dataset], torch.Generator], RecipeOutput]


def split_clients(data: Dataset, num_clients: int, generator: torch.Generator) -> list[Dataset]:
    """``data`` shuffled with ``generator`` and cut into ``num_clients`` parts of near-equal size."""
    if not 1 <= num_clients <= len(data):
        raise ConfigError(f"cannot split {len(data)} examples among {num_clients} clients")
    order = torch.randperm(len(data), generator=generator)
    return [data.subset(part) for part in torch.tensor_split(order, num_clients)]


def _seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def distill_recipe(cfg: RunConfig) -> Recipe:
    """Every client distills its part with ``cfg.distill``; the server pools and trains on the summaries."""
    from client.task import distill_local

    def run(clients: list[Dataset], generator: torch.Generator) -> RecipeOutput:
        num_classes = clients[0].num_classes
        summaries = [distill_local(part, cfg, num_classes, seed=_seed(generator))[0] for part in clients]
        pooled = concat(summaries, num_classes)
        model = build_model(
            cfg.distill.model, clients[0].image_shape, num_classes, generator, cfg.distill.device
        )
        train_model(model, pooled.images, pooled.labels, cfg.train, generator)
        eps = [float(s.meta["epsilon"]) for s in summaries if "epsilon" in s.meta]
        return RecipeOutput(model.cpu().eval(), pooled, max(eps) if eps else None)

    return run


def average(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """The example-weighted mean of client weights, as Flower's FedAvg aggregates them."""
    total = float(sum(weights))
    return {
        k: sum(s[k].double() * (w / total) for s, w in zip(states, weights, strict=True)).to(
            states[0][k].dtype
        )
        for k in states[0]
    }


class ServerMomentum:
    """FedAvgM's server step as Flower's ``FedAvgM`` takes it (server learning rate 1):
    ``v = beta v + (w - mean)``, ``w = w - v`` (``v`` starts at the first round's update)."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.velocity: dict[str, torch.Tensor] | None = None

    def step(self, state: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        update = {k: state[k].double() - mean[k].double() for k in state}
        if self.velocity is not None:
            update = {k: self.beta * self.velocity[k] + update[k] for k in update}
        self.velocity = update
        return {k: (state[k].double() - update[k]).to(state[k].dtype) for k in state}


def fedavg_recipe(cfg: RunConfig, features: FeatureCache | None = None) -> Recipe:
    """``cfg.fedavg_rounds`` FedAvg rounds over all clients (DP-FedAvg when ``cfg.distill.dp.enabled``;
    FedProx when ``proximal-mu`` > 0, in the clients' update; FedAvgM when ``server-momentum`` > 0).

    A model that trains only its head (model ``scatter``) has every client's records embedded once
    per run, kept in ``features`` (pass one cache to several runs on the same clients, as the
    tuning driver does, and they embed them once in all; ``None``: a cache for this run).
    """
    from client.task import dp_fedavg_local, fedavg_local

    dp = cfg.distill.dp.enabled

    def run(clients: list[Dataset], generator: torch.Generator) -> RecipeOutput:
        cache = features if features is not None else FeatureCache(capacity=len(clients))
        num_classes = clients[0].num_classes
        model = build_model(cfg.distill.model, clients[0].image_shape, num_classes, generator)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        accountants = []
        momentum = ServerMomentum(cfg.server_momentum) if cfg.server_momentum > 0 else None
        if dp:
            from privacy.accounting import Accountant

            accountants = [Accountant(cfg.distill.dp.accountant) for _ in clients]
        for _ in range(cfg.fedavg_rounds):
            states = []
            for i, part in enumerate(clients):
                if dp:
                    new, *_ = dp_fedavg_local(part, cfg, num_classes, state, _seed(generator), accountants[i],
                                              features=cache)
                else:
                    new, *_ = fedavg_local(part, cfg, num_classes, state, _seed(generator), features=cache)
                states.append(new)
            mean = average(states, [len(part) for part in clients])
            state = momentum.step(state, mean) if momentum else mean
        model.load_state_dict(state)
        eps = max(a.epsilon(cfg.distill.dp.delta) for a in accountants) if accountants else None
        return RecipeOutput(model.eval(), None, eps)

    return run


def recipe(kind: str, cfg: RunConfig) -> Recipe:
    """The in-process recipe of a system of ``kind`` (``distill`` or ``fedavg``)."""
    if kind == "distill":
        return distill_recipe(cfg)
    if kind == "fedavg":
        return fedavg_recipe(cfg)
    raise ConfigError(f"unknown system kind {kind!r}; known: {', '.join(KINDS)}")


def shadow_trainer(
    kind: str, cfg: RunConfig, num_clients: int
) -> Callable[[Dataset, torch.Generator], nn.Module]:
    """LiRA's shadow recipe: the data split among ``num_clients`` clients, then the system's recipe."""
    run = recipe(kind, cfg)

    def train(data: Dataset, generator: torch.Generator) -> nn.Module:
        return run(split_clients(data, num_clients, generator), generator).model

    return train

