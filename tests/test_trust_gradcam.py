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
from wbc_trust.modelfile import load_model
from wbc_trust.trust.gradcam import (
    compute_cams,
    gradcam_overlay,
    randomised_copy,
    rank_correlations,
    road_scores,
    target_layer_name,
)
from wbc_trust.evaluate import load_test_images


@pytest.fixture(scope="module")
def default_and_cells(default_model: Path) -> tuple:
    """The shipped model and 10 of the shipped held-out cells (2 per class), with its predictions."""
    model, meta = load_model(default_model)
    cells = load_test_images(meta, config.SAMPLE_DATA_DIR, max_images=10)
    with torch.no_grad():
        predictions = model(cells.images.float() / 255).argmax(1).tolist()
    return model, cells, predictions


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
        assert 0 <= heatmap.min() and heatmap.max() <= 1 and heatmap.max() > 0.9
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


def test_gradcam_is_more_faithful_than_a_random_map(default_and_cells: tuple,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """ROAD: removing the pixels Grad-CAM calls relevant must hurt the prediction more than random pixels do."""
    monkeypatch.setattr(config, "ROAD_PERCENTILES", (50,))
    model, cells, predictions = default_and_cells
    images, targets = cells.images[::4], predictions[::4]
    maps = compute_cams(model, images, targets, "gradcam")
    random_maps = np.random.default_rng(0).random(maps.shape, dtype=np.float32)
    faithful = road_scores(model, images, maps, targets).mean()
    assert faithful > road_scores(model, images, random_maps, targets).mean() + 0.05


def test_cli_writes_galleries_and_checks(tiny_run: Path, small_tree: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`wbc trust gradcam` on the poorly trained tiny model (it makes mistakes, so both galleries have images)."""
    monkeypatch.setattr(config, "GRADCAM_CHECK_IMAGES", 3)
    monkeypatch.setattr(config, "ROAD_PERCENTILES", (50,))
    monkeypatch.setattr(config, "GRADCAM_GALLERY", 3)
    model_file = tiny_run / "model.safetensors"
    out = tmp_path / "cam"
    result = CliRunner().invoke(app, ["trust", "gradcam", "--model", str(model_file), "--data", str(small_tree),
                                      "--out", str(out), "--max-images", "12"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "gradcam.json").read_text())
    assert summary["arch"] == "cnn" and summary["target_layer"] == target_layer_name(load_model(model_file)[0])
    assert summary["n_check_images"] == 3 and summary["n_images"] == 12
    assert set(summary["faithfulness"]["scores"]) == {"gradcam", "gradcam++", "random map (baseline)"}
    for method in ("gradcam", "gradcam++"):
        assert -1 <= summary["model_randomisation"]["methods"][method]["spearman_mean"] <= 1
    assert summary["n_wrong"] > 0
    for name in ("gradcam_correct.png", "gradcam_wrong.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.height > 200
