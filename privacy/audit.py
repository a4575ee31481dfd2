"""Leakage audits of a finished federated run, built from the attacks in :mod:`privacy.attacks`.

Used by ``simulations.compare`` (leakage columns) and ``simulations.privacy_utility``:

- :func:`membership_audit`: loss-threshold (and optionally LiRA) membership inference on the
  final global model; members are training examples of the clients, non-members held-out
  examples of the same distribution that no client or server ever trained on.
- :func:`memorisation_audit`: near-copies of private images in the pooled summary, and how close
  it sits to private vs held-out images.
- :func:`inversion_audit`: Inverting Gradients against one FedAvg client update of a batch,
  with or without DP-SGD's clipping and noise.
- :func:`canary_columns`: the one-run canary audit (Steinke, Nasr & Jagielski 2023) of the
  canaries :func:`run_canaries` put into the clients' data: an epsilon lower bound, to set
  beside the accountant's epsilon (:func:`bound_exceeds_accounted`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ddcore.data import Dataset, DataSplits
from ddcore.frozen import trained_part
from ddcore.models import build_model
from ddcore.runconfig import RunConfig
from ddcore.summary import Summary
from ddcore.train import train_model
from privacy.attacks.canary import Canaries, canary_audit, distance_scores, loss_scores, make_canaries
from privacy.attacks.inversion import invert_gradient, save_comparison, score_reconstruction
from privacy.attacks.membership import ShadowTrainer, lira_attack, loss_threshold_attack
from privacy.attacks.memorisation import memorisation
from privacy.received import Received


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
            recipe = cfg.local_training(epochs)
            part, x = trained_part(model, data.x, recipe.dsa_strategy)  # a head-only model: embed once
            train_model(part, x, data.y, recipe, generator)
            return model
        from privacy.accounting import Accountant
        from privacy.dpsgd import fedavg_dpsgd_plan, local_dpsgd

        plan = fedavg_dpsgd_plan(cfg, len(data))
        local_dpsgd(model, data, cfg, plan, Accountant(plan.accountant), steps=plan.steps,
                    generator=generator)
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
    """Near-copies of private images (whole training split) and nearest private vs held-out images.

    ``max_reference`` sizes only the equal-sized subsamples of the "closer to private"
    fractions; near-copies and nearest distances always search the whole private set.
    """
    return memorisation(pooled.images, splits.train, splits.test, seed=seed,
                        max_reference=max_reference).to_dict()


CANARY_KIND = "inverted"  # held-out images with pixels inverted and a wrong label: no evaluation image
CANARY_BETA = 0.05  # 1 - confidence of every canary bound


def run_canaries(cfg: RunConfig, splits: DataSplits) -> Canaries | None:
    """The run's ``cfg.canaries`` canaries (None when 0), identical wherever they are rebuilt.

    Made from the held-out split (:data:`CANARY_KIND`: inverted, mislabelled, so none equals a
    test image) with the run's seed; each is included with probability 1/2 and an included
    canary ``i`` goes into the data of simulated client ``i mod num-clients``
    (:meth:`~privacy.attacks.canary.Canaries.inserted`, used by :func:`client.task.local_data`).
    """
    if cfg.canaries == 0:
        return None
    return make_canaries(splits.test, cfg.canaries, kind=CANARY_KIND, seed=cfg.partition.seed)


def canary_columns(canaries: Canaries, model: torch.nn.Module | None, pooled: Summary | None, *,
                   delta: float, beta: float = CANARY_BETA, seed: int = 0,
                   extra_scores: dict[str, torch.Tensor] | None = None) -> dict:
    """The one-run audit of a finished system: an epsilon lower bound from its canaries.

    Scores (higher = "included"): minus each canary's loss under the final global ``model``
    and, when the system released summaries, minus its L2 distance to the nearest image of the
    ``pooled`` summary, plus ``extra_scores`` (name -> (m,) scores: the server-view attacks on
    releases and updates, :func:`privacy.server_audit.canary_scores`). Each available score is audited with
    :func:`~privacy.attacks.canary.canary_audit` at ``beta`` divided by the number of scores,
    so the largest bound (``eps_lower_bound``) holds at confidence ``1 - beta``; its guesses
    and right guesses come with it, and ``canary_max_certifiable`` is the most any of the
    audits could certify (every guess right). All None without a model and a summary.
    """
    scores: dict[str, torch.Tensor] = {}
    if model is not None:
        scores["loss"] = loss_scores(model, canaries)
    if pooled is not None and len(pooled):
        scores["distance"] = distance_scores(canaries, pooled.images)
    scores.update(extra_scores or {})  # the server-view attacks' scores (tracing, update loss change)
    results = {kind: canary_audit(score, canaries.included, delta=delta, beta=beta / len(scores), seed=seed)
               for kind, score in scores.items()}
    best = max(results, key=lambda k: results[k].eps_lower_bound) if results else None
    top = results[best] if best is not None else None
    return {"eps_lower_bound": top.eps_lower_bound if top else None,
            "canary_guesses": top.guesses if top else None, "canary_correct": top.correct if top else None,
            "canary_score": best, "canaries": len(canaries),
            "canaries_included": int(canaries.included.sum()),
            "canary_max_certifiable": max(r.max_certifiable for r in results.values()) if results else None,
            "canary_audits": {k: r.to_dict() for k, r in results.items()}}


def bound_exceeds_accounted(eps_lower_bound: float | None, eps_spent: float | None) -> bool:
    """True when a canary lower bound is above the accountant's (finite) epsilon: a DP bug (or a
    false alarm of probability at most beta); never for a non-DP or a noise-free run."""
    return (eps_lower_bound is not None and eps_spent is not None and math.isfinite(eps_spent)
            and eps_lower_bound > eps_spent)


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
                 lira_shadows: int = 0, memorisation_reference: int = 1000,
                 canaries: Canaries | None = None, received: Received | None = None,
                 epsilons: dict[int, float] | None = None, closest_png: Path | None = None,
                 title: str = "") -> dict:
    """The leakage audits of one finished system (``kind`` "distill" or "fedavg"), as report columns.

    ``mia_*``: loss-threshold membership inference on the final global model; ``lira``: LiRA
    for FedAvg when ``lira_shadows`` > 0 (its shadow recipe, :func:`fedavg_shadow_trainer`, is a
    proxy of FedAvg's; a distillation system's recipe - distil, pool, train - is too costly
    to repeat per shadow here); ``memorisation*``: of the pooled summary (``near_copy_fraction``
    over the whole private set, :func:`privacy.attacks.memorisation.memorisation`; the "closer to
    private" fractions on ``memorisation_reference`` images of each set); with ``canaries``,
    the canary audit's columns (:func:`canary_columns`, at the run's delta). Missing pieces
    (a system whose every round failed, FedAvg's absent summary) are None.

    With ``received`` (what the server got from the clients), the server-view attack that fits it
    (:func:`privacy.server_audit.server_view_audit`: ``server_view``, its headline
    ``server_view_tpr_at_0.1pct_fpr`` and, for images, ``near_copy_fraction``; ``closest_png``: the
    closest received/private pairs) - its scores also feed the canary audit's guesses.
    ``epsilons``: client id -> epsilon spent (DP runs; every ROC point is checked against it).
    """
    mia: dict = {}
    if pooled is not None and len(pooled) == 0:  # a server that built its model without images (ridge head)
        pooled = None
    model = global_model(cfg, final_state, splits.test) if final_state is not None else None
    if model is not None:
        lira = kind == "fedavg" and lira_shadows > 0
        mia = membership_audit(model, members, nonmembers,
                               shadow_trainer=fedavg_shadow_trainer(cfg) if lira else None,
                               shadows=lira_shadows if lira else 0, seed=cfg.partition.seed)
    mem = None
    if pooled is not None:
        mem = memorisation_audit(pooled, splits, seed=cfg.partition.seed,
                                 max_reference=memorisation_reference)
    view = None
    if received is not None and received.kind is not None:
        from privacy.server_audit import server_view_audit

        view = server_view_audit(cfg, received, splits, samples=max(len(members), 1000),
                                 seed=cfg.partition.seed, epsilons=epsilons, closest_png=closest_png,
                                 title=title, extra_private=canaries.data.subset(canaries.included_index)
                                 if canaries is not None else None)
    canary = {}
    if canaries is not None:
        extra = {}
        if received is not None and received.kind in ("statistics", "weights"):
            from privacy.server_audit import canary_scores

            extra = canary_scores(cfg, received, splits, canaries, seed=cfg.partition.seed)
        canary = canary_columns(canaries, model, pooled, delta=cfg.distill.dp.delta, seed=cfg.partition.seed,
                                extra_scores=extra)
    loss = mia.get("loss_threshold", {})
    return {"mia_attack": "loss-threshold", "mia_auc": loss.get("auc"),
            "mia_tpr_at_1pct_fpr": loss.get("tpr_at_1pct_fpr"),
            "mia_tpr_at_0.1pct_fpr": loss.get("tpr_at_0_1pct_fpr"),
            "mia_members": len(members), "mia_nonmembers": len(nonmembers), "lira": mia.get("lira"),
            "memorisation_closer_to_private": (mem or {}).get("closer_to_private_l2"),
            "memorisation_near_copy_fraction": (mem or {}).get("near_copy_fraction"), "memorisation": mem,
            "server_view": view, "server_view_tpr_at_0.1pct_fpr": (view or {}).get("tpr_at_0.1pct_fpr"),
            "near_copy_fraction": (view or {}).get("near_copy_fraction"), **canary}
