"""`wbc trust report`: one self-contained HTML file with every figure, table and the model's metadata."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from wbc_trust import config
from wbc_trust.cli import app

SEED_FIGURES = (
    "robustness_accuracy.png",
    "gradcam_correct.png",
    "gradcam_wrong.png",
    "fisher_scores.png",
    "influence_curve.png",
    "reliability_diagram.png",
)


def test_report_is_self_contained(
    tiny_run: Path, small_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fewer levels and checks than the defaults: the point here is the report, not the numbers
    monkeypatch.setattr(config, "CORRUPTIONS", {"gaussian_noise": config.CORRUPTIONS["gaussian_noise"]})
    monkeypatch.setattr(config, "ATTACK_EPSILONS", (1 / 255,))
    monkeypatch.setattr(config, "PGD_STEPS", 1)
    monkeypatch.setattr(config, "GRADCAM_CHECK_IMAGES", 2)
    monkeypatch.setattr(config, "ROAD_PERCENTILES", (50,))
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "trust",
            "report",
            "--model",
            str(tiny_run / "model.safetensors"),
            "--data",
            str(small_tree),
            "--train-data",
            str(small_tree),
            "--out",
            str(out),
            "--max-images",
            "6",
        ],
    )
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    for name in SEED_FIGURES:
        assert (out / name).is_file(), name
        assert f'alt="{name}"' in page, name
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) >= len(SEED_FIGURES)
    for data in embedded:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.format == "PNG"
    # opens offline: nothing to fetch, nothing to run
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page
    # the tables of numbers and the model's metadata
    for text in (
        "Robustness",
        "Grad-CAM",
        "Fisher sensitivity",
        "Influence",
        "Calibration",
        "Data-quality audit",
        "mean_corruption_accuracy",
        "auroc_wrong_vs_right",
        "Model metadata",
        "img_size",
    ):
        assert text in page, text
    assert "Not in this report" not in page  # every method ran
