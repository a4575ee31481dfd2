"""Pictures of summaries: a grid of synthetic images, one row per class."""

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
