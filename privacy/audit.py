"""Leakage audits of a finished federated run, built from the attacks in :mod:`privacy.attacks`.

Used by ``simulations.compare`` (leakage columns) and ``simulations.privacy_utility``:

- :func:`membership_audit`: loss-threshold (and optionally LiRA) membership inference on the
  final global model; members are training examples of the clients, non-members held-out
  examples of the same distribution that no client or server ever trained on.
- :func:`memorisation_audit`: near-copies of private images in the pooled summary, and how close
  it sits to private vs held-out images.
- :func:`inversion_audit`: Inverting Gradients against one FedAvg client update of a batch,
  with or without DP-SGD's clipping and noise.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from ddcore.data import Dataset, DataSplits
from ddcore.models import build_model
from ddcore.runconfig import RunConfig
from ddcore.summary import Summary
from ddcore.train import train_model
from privacy.attacks.inversion import invert_gradient, save_comparison, score_reconstruction
from privacy.attacks.membership import ShadowTrainer, lira_attack, loss_threshold_attack
from privacy.attacks.memorisation import memorisation


def audit_samples(splits: DataSplits, num: int, seed: int) -> tuple[Dataset, Dataset]:
    """``num`` members (clients' training examples) and ``num`` non-members (held-out test split).

    Both are drawn with the same seed for every system of a run, so audits compare alike.
    """
    g = torch.Generator().manual_seed(seed)
    n = min(num, len(splits.train), len(splits.test))
    members = splits.train.subset(torch.randperm(len(splits.train), generator=g)[:n])
    nonmembers = splits.test.subset(torch.randperm(len(splits.test), generator=g)[:n])
    return members, nonmembers


def global_model(cfg: RunConfig, state: dict[str, torch.Tensor], data: Dataset) -> torch.nn.Module:
    """The global model of a run, rebuilt from its final weights (on the CPU)."""
    model = build_model(cfg.distill.model, data.image_shape, data.num_classes,
                        torch.Generator().manual_seed(0))
    model.load_state_dict(state)
    return model.eval()


def fedavg_shadow_trainer(cfg: RunConfig) -> ShadowTrainer:
    """A centralised proxy of the FedAvg recipe for LiRA's shadow models.

    ``fedavg_rounds x local_epochs`` epochs of the clients' local recipe
    (:meth:`RunConfig.local_training`) on the shadow's data; with DP on, DP-SGD with the plan a
    DP-FedAvg client of that size makes (:func:`privacy.dpsgd.fedavg_dpsgd_plan`), so shadows and
    target carry the same noise. A proxy: the real target averaged non-IID clients.
    """
    epochs = max(cfg.fedavg_rounds, 1) * cfg.local_epochs

    def train(data: Dataset, generator: torch.Generator) -> torch.nn.Module:
        model = build_model(cfg.distill.model, data.image_shape, data.num_classes, generator)
        if not cfg.distill.dp.enabled:
            return train_model(model, data.x, data.y, cfg.local_training(epochs), generator)
        from privacy.accounting import Accountant
        from privacy.dpsgd import fedavg_dpsgd_plan, local_dpsgd

        plan = fedavg_dpsgd_plan(cfg, len(data))
        local_dpsgd(model, data, cfg, plan, Accountant(), steps=plan.steps, generator=generator)
        return model

    return train


def membership_audit(model: torch.nn.Module, members: Dataset, nonmembers: Dataset, *,
                     shadow_trainer: ShadowTrainer | None = None, shadows: int = 0, seed: int = 0) -> dict:
    """Loss-threshold MIA always; LiRA too when a shadow recipe and ``shadows`` > 0 are given."""
    out = {"loss_threshold": loss_threshold_attack(model, members, nonmembers).to_dict()}
    if shadow_trainer is not None and shadows > 0:
        out["lira"] = lira_attack(model, members, nonmembers, shadow_trainer, num_shadow=shadows,
                                  seed=seed).to_dict()
    return out


def memorisation_audit(pooled: Summary, splits: DataSplits, seed: int, max_reference: int = 1000) -> dict:
    """Near-copies of private images (whole training split) and nearest private vs held-out images."""
    return memorisation(pooled.images, splits.train, splits.test, seed=seed,
                        max_reference=max_reference).to_dict()


def client_update_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                           noise_multiplier: float, max_grad_norm: float | None,
                           generator: torch.Generator) -> list[torch.Tensor]:
    """What one client step on batch ``(x, y)`` reveals: its averaged gradient.

    Without DP (``max_grad_norm`` None) the plain mean gradient; with DP the per-sample
    gradients clipped to ``max_grad_norm``, summed, noised with ``N(0, (sigma C)^2)`` and
    divided by the batch size, as :func:`privacy.dpsgd.dpsgd_train` releases it.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if max_grad_norm is None:
        return [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(x), y), params)]
    from privacy.mechanisms import add_noise, clipped_sum, grad_sample_module, per_sample_gradients

    gsm = grad_sample_module(copy.deepcopy(model))  # Opacus hooks go on a copy, not the audited model
    total = clipped_sum(per_sample_gradients(gsm, F.cross_entropy(gsm(x), y, reduction="sum")), max_grad_norm)
    gsm.remove_hooks()
    return [g / len(y) for g in add_noise(total, noise_multiplier * max_grad_norm, generator)]


def inversion_audit(cfg: RunConfig, data: Dataset, *, batch_size: int, noise_multiplier: float = 0.0,
                    max_grad_norm: float | None = None, steps: int = 300, restarts: int = 2, seed: int = 0,
                    png: Path | None = None, title: str = "") -> dict:
    """Invert one client update of ``batch_size`` examples of ``data`` on the initial global model.

    The attacker knows the labels (they leak from the last layer's gradient for distinct
    labels) and the model; it sees the update and inverts it with Inverting Gradients. The
    batch has distinct labels where the data allows. Returns PSNR / SSIM against the truth
    and a random-image reference scored the same way.
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)
    picked, seen = [], set()
    for i in order.tolist():  # distinct labels first, then any
        if int(data.y[i]) not in seen:
            picked.append(i)
            seen.add(int(data.y[i]))
        if len(picked) == batch_size:
            break
    picked += [i for i in order.tolist() if i not in picked][: batch_size - len(picked)]
    x, y = data.x[picked], data.y[picked]
    model = build_model(cfg.distill.model, data.image_shape, data.num_classes,
                        torch.Generator().manual_seed(cfg.partition.seed))
    target = client_update_gradient(model, x, y, noise_multiplier=noise_multiplier,
                                    max_grad_norm=max_grad_norm, generator=g)
    recon = invert_gradient(model, target, y, data.image_shape, steps=steps, restarts=restarts, generator=g)
    result = score_reconstruction(recon, x, data)
    chance = score_reconstruction(torch.randn(x.shape, generator=g), x, data)
    if png is not None:
        save_comparison(x, result.images, data, png, title=title)
    return {"batch_size": len(y), "dp": max_grad_norm is not None,
            "noise_multiplier": noise_multiplier if max_grad_norm is not None else None,
            "max_grad_norm": max_grad_norm, "psnr": result.psnr, "ssim": result.ssim,
            "random_psnr": chance.psnr, "random_ssim": chance.ssim, "steps": steps, "restarts": restarts,
            "png": png.name if png is not None else None}


def audit_system(cfg: RunConfig, kind: str, final_state: dict[str, torch.Tensor] | None,
                 pooled: Summary | None, splits: DataSplits, members: Dataset, nonmembers: Dataset, *,
                 lira_shadows: int = 0) -> dict:
    """The leakage audits of one finished system (``kind`` "distill" or "fedavg"), as report columns.

    ``mia_*``: loss-threshold membership inference on the final global model; ``lira``: LiRA
    for FedAvg when ``lira_shadows`` > 0 (its shadow recipe, :func:`fedavg_shadow_trainer`, is a
    proxy of FedAvg's; a distillation system's recipe - distil, pool, train - is too costly
    to repeat per shadow here); ``memorisation*``: of the pooled summary (``near_copy_fraction``
    over the whole private set, :func:`privacy.attacks.memorisation.memorisation`). Missing pieces
    (a system whose every round failed, FedAvg's absent summary) are None.
    """
    mia: dict = {}
    if final_state is not None:
        model = global_model(cfg, final_state, splits.test)
        lira = kind == "fedavg" and lira_shadows > 0
        mia = membership_audit(model, members, nonmembers,
                               shadow_trainer=fedavg_shadow_trainer(cfg) if lira else None,
                               shadows=lira_shadows if lira else 0, seed=cfg.partition.seed)
    mem = memorisation_audit(pooled, splits, seed=cfg.partition.seed) if pooled is not None else None
    loss = mia.get("loss_threshold", {})
    return {"mia_attack": "loss-threshold", "mia_auc": loss.get("auc"),
            "mia_tpr_at_1pct_fpr": loss.get("tpr_at_1pct_fpr"),
            "mia_tpr_at_0.1pct_fpr": loss.get("tpr_at_0_1pct_fpr"),
            "mia_members": len(members), "mia_nonmembers": len(nonmembers), "lira": mia.get("lira"),
            "memorisation_closer_to_private": (mem or {}).get("closer_to_private_l2"),
            "memorisation_near_copy_fraction": (mem or {}).get("near_copy_fraction"), "memorisation": mem}
