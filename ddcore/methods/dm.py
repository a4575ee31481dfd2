"""Distribution matching (DM, Zhao & Bilen 2023): match class-mean embeddings of random nets."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddcore.augment import apply, sample_params
from ddcore.config import DistillConfig
from ddcore.data import Dataset
from ddcore.methods import register_method
from ddcore.methods.base import ClassIndex, Schedule, sgd_image_step, start_synthetic
from ddcore.methods.options import ImageOptions, real_dtype
from ddcore.models import ModelFactory, embed_frozen
from ddcore.summary import Summary
from ddcore.train import Progress

# SGD step on 1x28x28 images when lr_images is unset; other sizes scale it (sgd_image_step). Images
# started from noise (init="noise", the federated default) take LR_IMAGES_NOISE: on a validation split
# of mnist5k (800 images), 10 Dirichlet-0.5 clients, 200 updates, steps 1 / 3 / 10 / 30 gave 90.5 /
# 92.4 / 93.9 / 92.6% (`python -m simulations.main_job_choice`, docs/results/main_job_choice); real
# starts keep the reference code's 1
LR_IMAGES = 1.0
LR_IMAGES_NOISE = 10.0
# a term added to every update's loss: (per-class synthetic images, their classes, the run's generator)
ExtraTerm = Callable[[list[torch.Tensor], list[int], torch.Generator], torch.Tensor]


def embed_pair(
    net: torch.nn.Module,
    real: list[torch.Tensor],
    syn: list[torch.Tensor],
    strategy: str,
    generator: torch.Generator,
    chunk: int = 64,
    real_dtype: torch.dtype | None = None,
    mode: str = "all",
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Embed per-class real and synthetic batches under one shared (siamese) augmentation each.

    Returns the real embeddings (no graph; ``chunk`` images per pass, autocast to ``real_dtype``
    when given) and the synthetic ones (differentiable), per class. ``mode`` is the augmentation
    mode (:func:`ddcore.augment.sample_params`).
    """
    params = [sample_params(strategy, 1, generator, mode, tuple(r.shape)) for r in real]
    with torch.no_grad():
        augmented = torch.cat([apply(r, p) for r, p in zip(real, params, strict=True)])
    real_emb = embed_frozen(net, augmented, chunk, real_dtype)
    syn_emb = net.embed(torch.cat([apply(s, p) for s, p in zip(syn, params, strict=True)]))
    real_sizes = [r.shape[0] for r in real]
    syn_sizes = [s.shape[0] for s in syn]
    return list(real_emb.split(real_sizes)), list(syn_emb.split(syn_sizes))


def dm_loss(real_emb: list[torch.Tensor], syn_emb: list[torch.Tensor]) -> torch.Tensor:
    """Sum over classes of the squared distance between mean embeddings."""
    return sum(((r.float().mean(0) - s.float().mean(0)) ** 2).sum()  # float: exact under autocast
               for r, s in zip(real_emb, syn_emb, strict=True))


@register_method("dm", factorised=True)
def distill(
    data: Dataset,
    model_factory: ModelFactory,
    cfg: DistillConfig,
    init: Summary | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Optimise the synthetic images so every class's mean embedding matches the real one."""
    return match(data, model_factory, cfg, init, progress)


def match(
    data: Dataset,
    model_factory: ModelFactory,
    cfg: DistillConfig,
    init: Summary | None = None,
    progress: Progress | None = None,
    extra: ExtraTerm | None = None,
) -> Summary:
    """DM's loop; ``extra`` (None = plain DM) adds its term to every update's loss.

    ``extra(syn, classes, generator)`` gets the synthetic images of each class in ``classes``
    (differentiable) and the run's generator (:mod:`ddcore.methods.collab` matches them to a
    global model's class means this way).
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    index = ClassIndex(data.y, data.num_classes)
    synthetic = start_synthetic(data, cfg, init, generator)
    options = ImageOptions(synthetic, data, cfg, generator)  # before the optimiser: may resize the leaves
    labels = synthetic.labels
    classes = sorted(set(labels.tolist()))
    lr = cfg.lr_or(sgd_image_step(LR_IMAGES if cfg.init == "real" else LR_IMAGES_NOISE, data.image_shape))
    opt = torch.optim.SGD(synthetic.param_groups(lr), momentum=0.5)
    dtype, schedule = real_dtype(cfg), Schedule(cfg)
    for it in schedule:
        net = model_factory(generator).train()
        net.requires_grad_(False)  # only the images learn; skips parameter gradients
        real = [data.x[index.sample(c, cfg.batch_real, generator)].to(cfg.device) for c in classes]
        images = options.images()
        syn = [images[labels == c] for c in classes]
        with options.autocast():
            loss = dm_loss(*embed_pair(net, real, syn, cfg.dsa_strategy, generator, cfg.embed_chunk, dtype,
                                       cfg.dsa_mode))
            if extra is not None:
                loss = loss + extra(syn, classes, generator)
        options.step(loss, opt)
        if progress is not None:
            progress(it + 1, cfg.iterations, {"loss": float(loss.detach())})
    return synthetic.summary(data, cfg).with_meta(**schedule.meta())
