"""Pictures of summaries: a grid of synthetic images (one row per class) and IADD's importances."""

from __future__ import annotations

from pathlib import Path

from ddcore.data import Dataset
from ddcore.summary import Summary


def plot_summary(summary: Summary, data: Dataset, path: Path, per_class: int = 10) -> None:
    """A grid of up to ``per_class`` images of each class (rows = classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = summary.hard_labels()
    classes = sorted(set(labels.tolist()))
    cols = max(min(per_class, int((labels == c).sum())) for c in classes)
    fig, axes = plt.subplots(len(classes), cols, figsize=(cols * 0.8, len(classes) * 0.8), squeeze=False)
    pixels = data.denormalise(summary.images).clamp(0, 1)
    for r, c in enumerate(classes):
        imgs = pixels[labels == c][:cols]
        for k in range(cols):
            ax = axes[r][k]
            ax.axis("off")
            if k < len(imgs):
                img = imgs[k].permute(1, 2, 0).numpy()
                ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
    fig.tight_layout(pad=0.1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_importances(weights: dict[str, float], path: Path, threshold: float | None = None) -> None:
    """A bar per parameter tensor (network order): the weight IADD's loss gives it; 0 = pruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(weights)
    values = [weights[n] for n in names]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(names) + 1.2))
    ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()  # first layer on top
    ax.axvline(1.0, color="black", lw=0.8, ls=":", label="uniform (MTT)")
    if threshold:
        ax.axvline(threshold, color="tab:red", lw=0.8, ls="--", label=f"prune threshold {threshold:g}")
    for i, v in enumerate(values):
        if v == 0:
            ax.text(0.01, i, "pruned", va="center", fontsize=7, color="tab:gray")
    ax.set_xlabel("weight in the parameter-matching loss (mean 1 over live tensors)")
    ax.set_title("IADD: learned per-tensor importances", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
