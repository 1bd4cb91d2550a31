"""Every figure wbc-trust draws (matplotlib, headless), each saved atomically as PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from wbc_trust.io import atomic_write  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Render to PNG in memory, then write atomically; closes the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(Path(path), lambda f: f.write(buffer.getvalue()))


def training_curves(history: Sequence[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train vs validation."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def confusion_matrix_figure(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> None:
    """Counts per (true, predicted) class, rows = truth."""
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ConfusionMatrixDisplay(matrix, display_labels=list(classes)).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=30
    )
    ax.set_title(title)
    save_figure(fig, path)


def image_gallery(
    images: Sequence[np.ndarray], captions: Sequence[str], path: Path, columns: int = 5, title: str = ""
) -> None:
    """A grid of RGB images (H×W×3, uint8 or float in [0, 1]) with a caption under each."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image)
        ax.set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def robustness_curves(results: Sequence[dict], path: Path) -> None:
    """Accuracy against corruption severity and attack budget: one panel per corruption/attack, one line per model
    (``results`` = the per-model entries of robustness.json)."""
    first = results[0]
    panels = [(name, "severity", c["severity"]) for name, c in first["corruptions"].items()]
    panels += [
        (name, "ε (grey levels of 255)", [e * 255 for e in a["epsilon"]]) for name, a in first["attacks"].items()
    ]
    columns = 5
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.1 * columns, 2.7 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (name, xlabel, xs) in zip(axes.flat, panels):
        for result in results:
            ys = (result["corruptions"].get(name) or result["attacks"][name])["accuracy"]
            ax.plot(xs, ys, "o-", ms=3, label=f"{result['model']} ({result['arch']})")
        title = name.replace("_", " ") + (" attack" if name in first["attacks"] else "")
        ax.set(title=title, xlabel=xlabel, ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    axes.flat[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Accuracy under corruptions and attacks ({first['n_images']} images)")
    fig.tight_layout()
    save_figure(fig, path)


def class_balance_figure(counts: dict[str, int], path: Path, title: str = "") -> None:
    """Images per class as bars, with the count written on each bar (the audit's class balance)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    bars = ax.bar(list(counts), list(counts.values()), color="tab:blue")
    ax.bar_label(bars)
    ax.set(ylabel="images", title=title)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def influence_curve(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "") -> None:
    """Fraction of the flagged training images found against the fraction inspected, one line per ranking; the
    diagonal is inspecting in random order."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (inspected, found) in curves.items():
        ax.plot(inspected, found, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="random order")
    ax.set(
        xlabel="fraction of training images inspected (highest score first)",
        ylabel="fraction of flagged images found",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path)


def reliability_diagram(
    confidences: dict[str, np.ndarray], correct: np.ndarray, path: Path, n_bins: int = 15, title: str = ""
) -> None:
    """Accuracy against top-class confidence in equal-width bins (scikit-learn's ``calibration_curve``), one line per
    set of confidences (before/after temperature scaling); the diagonal is perfect calibration. Below: how many
    images fall in each bin, which says where the gaps matter."""
    from sklearn.calibration import calibration_curve

    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(6, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    edges = np.linspace(0, 1, n_bins + 1)
    for name, confidence in confidences.items():
        accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=n_bins, strategy="uniform")
        ax.plot(mean_confidence, accuracy, "o-", ms=4, label=name)
        ax_count.hist(confidence, bins=edges, histtype="step", lw=1.5, label=name)
    ax.set(ylabel="accuracy", title=title or "Reliability diagram", xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax_count.set(xlabel="confidence (top-class probability)", ylabel="images", yscale="log")
    ax_count.grid(alpha=0.3)
    save_figure(fig, path)


def ood_histogram(in_scores: np.ndarray, out_scores: np.ndarray, threshold: float, path: Path, title: str = "") -> None:
    """Out-of-distribution scores of white cells and of other images (log-spaced bins), with the flag threshold."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    positive = np.concatenate([in_scores, out_scores, [threshold]])
    positive = positive[positive > 0]
    bins = np.geomspace(positive.min(), positive.max(), 50)
    ax.hist(in_scores, bins=bins, alpha=0.6, density=True, label=f"white cells ({len(in_scores)})")
    ax.hist(out_scores, bins=bins, alpha=0.6, density=True, label=f"not white cells ({len(out_scores)})")
    ax.axvline(threshold, color="k", ls="--", label="threshold (flag above)")
    ax.set(
        xscale="log",
        xlabel="out-of-distribution score (higher = more unusual)",
        ylabel="density",
        title=title or "Out-of-distribution scores",
    )
    ax.legend(fontsize=8)
    save_figure(fig, path)


def set_size_histogram(
    sizes: dict[str, np.ndarray], wrong: np.ndarray, n_classes: int, path: Path, title: str = ""
) -> None:
    """Share of images per prediction-set size (0 to n_classes), one group of bars per coverage; hatched: the images
    whose top-1 answer is wrong, which a useful set puts in the sizes of two or more."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.8 / max(len(sizes), 1)
    positions = np.arange(n_classes + 1)
    for i, (name, size) in enumerate(sizes.items()):
        x = positions - 0.4 + (i + 0.5) * width
        ax.bar(x, np.bincount(size, minlength=n_classes + 1) / len(size), width, color=f"C{i}", alpha=0.7, label=name)
        ax.bar(
            x,
            np.bincount(size[wrong], minlength=n_classes + 1) / len(size),
            width,
            color="none",
            edgecolor="k",
            hatch="//",
            label=f"{name}: wrong top-1 ({int(wrong.sum())})",
        )
    ax.set(
        xticks=positions,
        xlabel="classes in the prediction set",
        ylabel="share of images (log)",
        yscale="log",
        title=title or "Prediction-set sizes",
    )
    ax.legend(fontsize=8)
    save_figure(fig, path)


def score_distributions(panels: Sequence[tuple[str, np.ndarray, float | None]], wrong: np.ndarray, path: Path) -> None:
    """Per score (title, values per image, AUROC or None): histograms of right vs wrong predictions on a log axis
    (the scores span orders of magnitude), with a tick under the axis for every wrong prediction."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, values, auroc) in zip(axes.flat, panels):
        positive = values[values > 0]
        low = positive.min() if positive.size else 1e-12
        bins = np.geomspace(low, max(values.max(), low * 10), 40)
        clipped = np.clip(values, low, None)
        for group, style in (
            (~wrong, {"histtype": "stepfilled", "alpha": 0.5, "label": "right"}),
            (wrong, {"histtype": "step", "lw": 2, "color": "C3", "label": "wrong"}),
        ):
            if group.any():  # weights: each group's bars sum to 1, so groups of any size compare
                style["label"] += f" ({group.sum()})"
                ax.hist(clipped[group], bins=bins, weights=np.full(group.sum(), 1 / group.sum()), **style)
        if wrong.any():
            ax.plot(clipped[wrong], np.zeros(wrong.sum()), "|", color="C3", ms=14, mew=2, clip_on=False)
        ax.set_xscale("log")
        auroc_text = (
            f"AUROC wrong vs right {auroc:.3f}" if auroc is not None else "AUROC undefined (no wrong or no right)"
        )
        ax.set(title=f"{title}\n{auroc_text}", xlabel="score (log scale)", ylabel="share of the group's images")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
