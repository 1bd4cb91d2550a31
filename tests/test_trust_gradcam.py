"""Grad-CAM on real PBC cells: maps look at the cell, depend on the trained weights, and beat random maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from wbc_trust import config
from wbc_trust.cli import app
from wbc_trust.evaluate import load_test_images
from wbc_trust.modelfile import load_model
from wbc_trust.models import predict_probs
from wbc_trust.trust.gradcam import (
    compute_cams,
    gradcam_overlay,
    interleave_classes,
    randomised_copy,
    rank_correlations,
    road_scores,
    target_layer_name,
)


@pytest.fixture(scope="module")
def default_and_cells(default_model: Path) -> tuple:
    """The shipped model and 10 of the shipped held-out cells (2 per class), with its predictions."""
    model, meta = load_model(default_model)
    cells = load_test_images(meta, config.SAMPLE_DATA_DIR, max_images=10)
    with torch.no_grad():
        predictions = model(cells.images.float() / 255).argmax(1).tolist()
    return model, cells, predictions


def _cam_by_hand(model: torch.nn.Module, image: torch.Tensor, method: str) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017: channel weights = mean gradient) or Grad-CAM++ (Chattopadhyay et al. 2018:
    weights = Σ α·ReLU(gradient)) of the predicted class, ReLU, scaled to [0, 1], resized to the image."""
    seen: dict[str, torch.Tensor] = {}
    hook = model.feature_layer().register_forward_hook(lambda module, inputs, output: seen.update(a=output))
    try:
        logits = model(image[None].float() / 255)
    finally:
        hook.remove()
    (grads,) = torch.autograd.grad(logits[0, int(logits.argmax())], seen["a"])
    acts, grads = seen["a"].detach().double(), grads.double()
    if method == "gradcam":
        weights = grads.mean((2, 3))
    else:
        alpha = grads**2 / (2 * grads**2 + acts.sum((2, 3), keepdim=True) * grads**3 + 1e-7)
        weights = (grads.clamp_min(0) * torch.where(grads != 0, alpha, 0.0)).sum((2, 3))
    cam = torch.relu((weights[:, :, None, None] * acts).sum(1, keepdim=True))
    cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
    return torch.nn.functional.interpolate(cam, size=image.shape[1:], mode="bilinear")[0, 0].numpy()


def _centre_vs_border(heatmap: np.ndarray) -> tuple[float, float]:
    size = heatmap.shape[0]
    centre = heatmap[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4]
    return float(centre.mean()), float((heatmap.sum() - centre.sum()) / (heatmap.size - centre.size))


@pytest.mark.parametrize("method", ["gradcam++", "gradcam"])
def test_overlay_is_a_map_of_the_cell(default_and_cells: tuple, method: str) -> None:
    """PBC crops centre the white cell: the trained model's map must be hotter there than on the red cells around."""
    model, cells, _ = default_and_cells
    size = cells.images.shape[-1]
    for image in cells.images[:3]:
        heatmap, overlay = gradcam_overlay(model, image, method=method)
        assert heatmap.shape == (size, size) and heatmap.dtype == np.float32
        # the map is Grad-CAM(++) of the predicted class at the model's last convolutional layer, computed by hand
        by_hand = _cam_by_hand(model, image, method)
        assert np.corrcoef(heatmap.ravel(), by_hand.ravel())[0, 1] > 0.999 and abs(heatmap - by_hand).max() < 0.05
        assert overlay.shape == (size, size, 3) and overlay.dtype == np.uint8
        centre, border = _centre_vs_border(heatmap)
        assert centre > 2 * border


def test_target_class_changes_the_map(default_and_cells: tuple) -> None:
    model, cells, predictions = default_and_cells
    own, _ = gradcam_overlay(model, cells.images[0], target=predictions[0], method="gradcam")
    other, _ = gradcam_overlay(model, cells.images[0], target=(predictions[0] + 1) % 5, method="gradcam")
    assert not np.allclose(own, other, atol=0.05)


def test_randomised_model_maps_differ(default_and_cells: tuple) -> None:
    """Adebayo et al.'s sanity check: Grad-CAM of a re-initialised network must not reproduce the trained maps,
    while the trained model reproduces its own maps exactly."""
    model, cells, predictions = default_and_cells
    images, targets = cells.images[::2], predictions[::2]  # one cell per class
    trained = compute_cams(model, images, targets, "gradcam")
    random_model = randomised_copy(model, images)
    with torch.no_grad():
        logits = random_model(images.float() / 255)
    assert logits.std(0).mean() > 1e-3  # a healthy random network, not one whose activations vanished
    assert rank_correlations(trained, compute_cams(random_model, images, targets, "gradcam")).mean() < 0.5
    # the trained model reproduces its own maps: its weights are untouched by the randomisation
    assert rank_correlations(trained, compute_cams(model, images, targets, "gradcam")).min() > 0.999


def test_gradcam_is_more_faithful_than_a_random_map(default_and_cells: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """ROAD: removing the pixels Grad-CAM calls relevant must hurt the prediction more than random pixels do."""
    monkeypatch.setattr(config, "ROAD_PERCENTILES", (50,))
    model, cells, predictions = default_and_cells
    images, targets = cells.images[::4], predictions[::4]
    maps = compute_cams(model, images, targets, "gradcam")
    random_maps = np.random.default_rng(0).random(maps.shape, dtype=np.float32)
    faithful = road_scores(model, images, maps, targets).mean()
    assert faithful > road_scores(model, images, random_maps, targets).mean() + 0.05


def test_cli_writes_galleries_and_checks(
    tiny_run: Path, small_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`wbc trust gradcam` on the poorly trained tiny model (it makes mistakes, so both galleries have images)."""
    monkeypatch.setattr(config, "GRADCAM_CHECK_IMAGES", 3)
    monkeypatch.setattr(config, "ROAD_PERCENTILES", (50,))
    monkeypatch.setattr(config, "GRADCAM_GALLERY", 3)
    model_file = tiny_run / "model.safetensors"
    out = tmp_path / "cam"
    result = CliRunner().invoke(
        app,
        [
            "trust",
            "gradcam",
            "--model",
            str(model_file),
            "--data",
            str(small_tree),
            "--out",
            str(out),
            "--max-images",
            "12",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "gradcam.json").read_text())
    assert summary["arch"] == "cnn" and summary["target_layer"] == target_layer_name(load_model(model_file)[0])
    assert summary["n_check_images"] == 3 and summary["n_images"] == 12
    assert set(summary["faithfulness"]["scores"]) == {"gradcam", "gradcam++", "random map (baseline)"}
    # the randomisation check recomputed: the same 3 check images (every class in turn), the trained model's maps
    # against a re-initialised copy's
    model, meta = load_model(model_file)
    test = load_test_images(meta, small_tree, 12)
    predictions = predict_probs(model, test.images).argmax(1).numpy()
    chosen = torch.as_tensor(interleave_classes(np.arange(len(test.labels)), test.labels)[:3])
    images, targets = test.images[chosen], [int(predictions[i]) for i in chosen]
    random_model = randomised_copy(model, images)
    for method in ("gradcam", "gradcam++"):
        rhos = rank_correlations(
            compute_cams(model, images, targets, method), compute_cams(random_model, images, targets, method)
        )
        assert summary["model_randomisation"]["methods"][method]["spearman_mean"] == pytest.approx(
            rhos.mean(), abs=1e-6
        )
    assert summary["n_wrong"] > 0
    for name in ("gradcam_correct.png", "gradcam_wrong.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.height > 200
