"""FedProx and FedAvgM beside FedAvg: the proximal term, the settings, the strategy each run gets."""

from __future__ import annotations

import pytest
import torch

from ddcore.config import TrainConfig
from ddcore.errors import ConfigError
from ddcore.models import ModelSpec, build_model
from ddcore.runconfig import from_flat, run_preset
from ddcore.train import train_model
from server.ledger import Ledger
from server.strategy import CountingFedAvg, CountingFedAvgM, CountingFedProx, weight_strategy
from simulations.compare import FEDAVGM_MOMENTUM, FEDPROX_MU, plan_systems

SHAPE, CLASSES = (1, 8, 8), 3


def drift_after_training(mu: float) -> float:
    """Squared distance from its start of a small ConvNet trained 30 steps with proximal ``mu``."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn((48, *SHAPE), generator=g), torch.randint(0, CLASSES, (48,), generator=g)
    model = build_model(ModelSpec(width=8, depth=2), SHAPE, CLASSES, torch.Generator().manual_seed(1))
    start = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(epochs=0, min_steps=30, lr=0.1, batch_size=16, dsa_strategy="none", lr_decay=False)
    train_model(model, x, y, cfg, torch.Generator().manual_seed(2), proximal_mu=mu)
    return sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(model.parameters(), start, strict=True))


def test_the_proximal_term_holds_local_weights_near_the_global_model() -> None:
    free, mild, strong = drift_after_training(0.0), drift_after_training(0.1), drift_after_training(10.0)
    assert free > mild > strong > 0, (free, mild, strong)
    assert strong < 0.2 * free, (free, strong)  # mu = 10 with lr 0.1: a strong pull back each step
    with pytest.raises(ValueError, match="proximal_mu"):
        drift_after_training(-1.0)


def test_each_weight_system_gets_its_own_flower_strategy_and_only_its_own_setting() -> None:
    cfg = from_flat({"fedavg-rounds": 2}, base=run_preset("quick"))
    systems = {s.name: s.cfg for s in plan_systems(cfg, ["fedavg", "fedprox", "fedavgm"])}
    assert (systems["fedavg"].proximal_mu, systems["fedavg"].server_momentum) == (0.0, 0.0)
    assert (systems["fedprox"].proximal_mu, systems["fedprox"].server_momentum) == (FEDPROX_MU, 0.0)
    assert (systems["fedavgm"].proximal_mu, systems["fedavgm"].server_momentum) == (0.0, FEDAVGM_MOMENTUM)
    kinds = {name: type(weight_strategy(c, Ledger())) for name, c in systems.items()}
    assert kinds == {"fedavg": CountingFedAvg, "fedprox": CountingFedProx, "fedavgm": CountingFedAvgM}
    prox = weight_strategy(systems["fedprox"], Ledger())
    assert prox.proximal_mu == FEDPROX_MU  # Flower's FedProx sends it to the clients as proximal-mu
    assert weight_strategy(systems["fedavgm"], Ledger()).server_momentum == FEDAVGM_MOMENTUM
    # a value the user gives wins over the tuned default; no weight system without rounds
    mine = {s.name: s.cfg for s in plan_systems(from_flat({"proximal-mu": 0.3, "server-momentum": 0.7},
                                                          base=cfg), ["fedprox", "fedavgm"])}
    assert (mine["fedprox"].proximal_mu, mine["fedavgm"].server_momentum) == (0.3, 0.7)
    assert plan_systems(from_flat({"fedavg-rounds": 0}, base=cfg), ["fedprox", "fedavgm"]) == []


def test_bad_weight_settings_are_refused_with_the_key_named() -> None:
    quick = run_preset("quick")
    for bad in ({"proximal-mu": -0.1}, {"server-momentum": 1.0}, {"server-momentum": -0.5}):
        with pytest.raises(ConfigError, match="proximal-mu must be >= 0 and server-momentum"):
            from_flat(bad, base=quick)
    with pytest.raises(ConfigError, match="DP-FedAvg runs plain FedAvg"):
        from_flat({"dp": True, "target-epsilon": 4.0, "proximal-mu": 0.01}, base=quick)
    with pytest.raises(ConfigError, match="two different strategies"):
        weight_strategy(from_flat({"proximal-mu": 0.01, "server-momentum": 0.5}, base=quick), Ledger())


def test_the_in_process_recipe_steps_with_server_momentum_as_flowers_fedavgm() -> None:
    from simulations.recipes import ServerMomentum

    w0, means = torch.tensor([1.0, 2.0]), [torch.tensor([0.5, 2.5]), torch.tensor([0.0, 3.0])]
    server = ServerMomentum(0.5)
    w1 = server.step({"w": w0}, {"w": means[0]})["w"]
    assert torch.allclose(w1, means[0])  # round 1: the velocity starts at the update, so the plain mean
    w2 = server.step({"w": w1}, {"w": means[1]})["w"]
    v2 = 0.5 * (w0 - means[0]) + (w1 - means[1])  # Flower's FedAvgM: v = beta v + (old - new); w -= v
    assert torch.allclose(w2, w1 - v2) and not torch.allclose(w2, means[1])
