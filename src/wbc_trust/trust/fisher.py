"""Fisher sensitivity: which images the model is most sensitive to, in output space and in parameter space.

- ``el2n_squared`` = ‖softmax(x) − onehot(y)‖², the seed project's score: the square of the EL2N score of Paul et
  al. 2021 ("Deep Learning on a Data Diet"), which ranks examples by how hard they are to learn.
- ``grad_norm2`` = ‖∇_θ L(x, y)‖², the squared norm of the per-sample gradient of the cross-entropy over all weights,
  computed with torch.func (``vmap`` over ``grad`` of a ``functional_call``): one backward pass per image, batched.
- The empirical Fisher information is F = (1/N) Σ g_i g_iᵀ, so its trace is the mean of ``grad_norm2``.

Each score is judged by how well it separates the model's wrong predictions from its right ones (AUROC, sklearn).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm import tqdm

from wbc_trust import config, plots
from wbc_trust.data import to_unit
from wbc_trust.evaluate import load_test_images
from wbc_trust.io import write_csv, write_json
from wbc_trust.modelfile import load_model
from wbc_trust.models import WbcClassifier

_BATCH = 16  # per-sample gradients hold one copy of the weights per image: 16 × 3.4 M floats for EfficientNet-Lite0


def el2n_squared(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """‖softmax − onehot‖² per image: the squared EL2N score (Paul et al. 2021)."""
    onehot = nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).pow(2).sum(1)


def per_sample_grad_norms(model: WbcClassifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """‖∇_θ cross-entropy‖² over all parameters, per image, for float images N×3×S×S in [0, 1] (eval mode)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (weights, buffers), (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, images, labels)
    return sum(g.pow(2).flatten(1).sum(1) for g in grads.values())


def sensitivity_scores(model: WbcClassifier, images: torch.Tensor, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Probabilities, squared EL2N and gradient norm² of every image (uint8 N×3×S×S), in batches with progress."""
    model.eval()
    probs, el2n, grad_norm2 = [], [], []
    for start in tqdm(range(0, len(images), _BATCH), desc="Fisher sensitivity", unit="batch"):
        x = to_unit(images[start : start + _BATCH])
        y = torch.as_tensor(labels[start : start + _BATCH])
        with torch.no_grad():
            p = torch.softmax(model(x), dim=1)
        probs.append(p)
        el2n.append(el2n_squared(p, y))
        grad_norm2.append(per_sample_grad_norms(model, x, y))
    return {
        "probs": torch.cat(probs).numpy(),
        "el2n_squared": torch.cat(el2n).numpy(),
        "grad_norm2": torch.cat(grad_norm2).numpy(),
    }


def wrong_vs_right_auroc(scores: np.ndarray, wrong: np.ndarray) -> float | None:
    """AUROC of a score at ranking wrong predictions above right ones; None when one of the two groups is empty."""
    if wrong.all() or not wrong.any():
        return None
    return float(roc_auc_score(wrong, scores))


def write_fisher_csv(
    path: Path,
    records: list,
    labels: np.ndarray,
    predictions: np.ndarray,
    el2n: np.ndarray,
    grad_norm2: np.ndarray,
    classes: list[str],
) -> None:
    """fisher.csv: path,label,prediction,el2n_squared,grad_norm2 (sorted by grad_norm2, highest first)."""
    write_csv(
        path,
        (
            [records[i].path, classes[labels[i]], classes[predictions[i]], f"{el2n[i]:.6g}", f"{grad_norm2[i]:.6g}"]
            for i in np.argsort(-grad_norm2, kind="stable")
        ),
        ["path", "label", "prediction", "el2n_squared", "grad_norm2"],
    )


def run_fisher(model_path: Path | None, data: Path, out: Path, max_images: int | None = None) -> dict:
    """Score every image of the labelled folder ``data``; write ``fisher.csv``, ``fisher.json`` (AUROCs, empirical
    Fisher trace), ``fisher_scores.png`` (distributions, right vs wrong) and ``fisher_top.png`` (highest scores)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = load_model(model_path)
    classes = meta["classes"]
    test = load_test_images(meta, data, max_images)
    print(test.description)
    scores = sensitivity_scores(model, test.images, test.labels)
    predictions = scores["probs"].argmax(1)
    wrong = predictions != test.labels
    el2n, grad_norm2 = scores["el2n_squared"], scores["grad_norm2"]
    write_fisher_csv(out / "fisher.csv", test.records, test.labels, predictions, el2n, grad_norm2, classes)
    named = {"el2n_squared": el2n, "grad_norm2": grad_norm2, "1 - confidence (baseline)": 1 - scores["probs"].max(1)}
    summary = {
        "model": str(model_path) if model_path else "default",
        "arch": meta["arch"],
        "data": test.description,
        "n_images": len(test.labels),
        "n_wrong": int(wrong.sum()),
        "scores": {
            "el2n_squared": "||softmax - onehot(label)||^2: squared EL2N (Paul et al. 2021), the seed project's score",
            "grad_norm2": "||grad_theta cross-entropy(x, label)||^2 over all weights (torch.func vmap + grad)",
            "note": "both need the true label: they rank hard or mislabelled images, they cannot flag an unlabelled "
            "one; '1 - confidence' is the label-free baseline",
        },
        "empirical_fisher_trace": float(grad_norm2.mean()),
        "auroc_wrong_vs_right": {name: wrong_vs_right_auroc(s, wrong) for name, s in named.items()},
        "spearman_el2n_vs_grad": float(spearmanr(el2n, grad_norm2).statistic),
        "mean": {"el2n_squared": float(el2n.mean()), "grad_norm2": float(grad_norm2.mean())},
    }
    write_json(out / "fisher.json", summary)
    auroc = summary["auroc_wrong_vs_right"]
    plots.score_distributions(
        [
            ("squared EL2N ‖softmax − onehot‖²", el2n, auroc["el2n_squared"]),
            ("gradient norm² ‖∇θ L‖²", grad_norm2, auroc["grad_norm2"]),
        ],
        wrong,
        out / "fisher_scores.png",
    )
    top = np.argsort(-grad_norm2, kind="stable")[: config.FISHER_GALLERY]
    plots.image_gallery(
        [test.images[i].permute(1, 2, 0).numpy() for i in top],
        [
            f"{classes[test.labels[i]]} → {classes[predictions[i]]}\n‖∇‖² {grad_norm2[i]:.3g}, EL2N² {el2n[i]:.2f}"
            for i in top
        ],
        out / "fisher_top.png",
        title="Highest Fisher sensitivity (true → predicted class)",
    )
    return summary
