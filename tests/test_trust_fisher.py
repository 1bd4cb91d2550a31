"""Fisher sensitivity on real PBC cells: the batched per-sample gradients are the true gradients, the seed score is
‖softmax − onehot‖², and the written files agree with each other."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from wbc_trust import config
from wbc_trust.cli import app
from wbc_trust.data import image_to_tensor, read_image
from wbc_trust.evaluate import load_test_images
from wbc_trust.modelfile import load_model
from wbc_trust.trust.fisher import el2n_squared, per_sample_grad_norms


def test_vmap_gradients_equal_one_backward_pass_per_image(tiny_run: Path) -> None:
    model, meta = load_model(tiny_run / "model.safetensors")
    cells = load_test_images(meta, config.SAMPLE_DATA_DIR, max_images=5)
    x, y = cells.images[:3].float() / 255, torch.as_tensor(cells.labels[:3])
    batched = per_sample_grad_norms(model, x, y)
    one_by_one = []
    for i in range(3):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [p for p in model.parameters()])
        one_by_one.append(sum(float(g.pow(2).sum()) for g in grads))
    assert torch.allclose(batched, torch.tensor(one_by_one), rtol=1e-3)
    assert len(set(batched.tolist())) == 3  # one value per image, not a batch mean copied three times


def test_seed_score_is_squared_distance_to_onehot() -> None:
    k = len(config.CLASSES)
    labels = torch.tensor([0, 2, 4])
    perfect = nn.functional.one_hot(labels, k).float()
    uniform = torch.full((3, k), 1 / k)
    assert torch.allclose(el2n_squared(perfect, labels), torch.zeros(3))
    assert torch.allclose(el2n_squared(uniform, labels), torch.full((3,), (1 - 1 / k) ** 2 + (k - 1) / k**2))
    assert torch.allclose(el2n_squared(perfect.roll(1, dims=1), labels), torch.full((3,), 2.0))


def test_cli_files_agree(tiny_run: Path, small_tree: Path, tmp_path: Path) -> None:
    """`wbc trust fisher` on the poorly trained tiny model: fisher.csv is sorted, its mean is the Fisher trace in
    fisher.json, and wrong answers score higher than right ones (AUROC above chance)."""
    out = tmp_path / "fisher"
    result = CliRunner().invoke(
        app,
        [
            "trust",
            "fisher",
            "--model",
            str(tiny_run / "model.safetensors"),
            "--data",
            str(small_tree),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    with open(out / "fisher.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "prediction", "el2n_squared", "grad_norm2"]
    grad = np.array([float(r["grad_norm2"]) for r in rows])
    el2n = np.array([float(r["el2n_squared"]) for r in rows])
    assert (np.diff(grad) <= 0).all() and (grad > 0).all() and ((el2n >= 0) & (el2n <= 2)).all()
    # each row's prediction and ‖softmax − onehot‖² recomputed from the model on that row's own image file
    model, meta = load_model(tiny_run / "model.safetensors")
    checked = rows[:4] + rows[-4:]  # the highest and lowest gradient norms
    images = torch.stack([image_to_tensor(read_image(Path(r["path"]), meta["img_size"])) for r in checked])
    with torch.no_grad():
        probs = torch.softmax(model(images.float() / 255), 1)
    labels = torch.tensor([meta["classes"].index(r["label"]) for r in checked])
    assert [meta["classes"][i] for i in probs.argmax(1)] == [r["prediction"] for r in checked]
    expected = (probs - nn.functional.one_hot(labels, len(meta["classes"]))).pow(2).sum(1)
    assert np.allclose([float(r["el2n_squared"]) for r in checked], expected.numpy(), rtol=1e-4, atol=1e-6)
    summary = json.loads((out / "fisher.json").read_text())
    assert summary["n_images"] == len(rows) and summary["arch"] == "cnn"
    assert np.isclose(summary["empirical_fisher_trace"], grad.mean(), rtol=1e-4)
    wrong = sum(r["label"] != r["prediction"] for r in rows)
    assert summary["n_wrong"] == wrong and 0 < wrong < len(rows)
    assert summary["auroc_wrong_vs_right"]["el2n_squared"] > 0.5
    assert summary["auroc_wrong_vs_right"]["grad_norm2"] > 0.5
    for name in ("fisher_scores.png", "fisher_top.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 400
