"""ONNX: the exported graph, run by onnxruntime, gives the same probabilities as PyTorch (within 1e-3) on real cell
images; `wbc predict --backend onnx` gives the same answers as the PyTorch backend; `wbc export-onnx` writes a
self-describing file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import onnx
import pytest
import torch
from conftest import pbc_files
from typer.testing import CliRunner

from wbc_trust import config
from wbc_trust.cli import app
from wbc_trust.data import image_to_tensor, read_image
from wbc_trust.errors import WbcError
from wbc_trust.modelfile import load_extra, load_model, save_model
from wbc_trust.models import VIEWS
from wbc_trust.onnx_export import META_KEY, OnnxModel
from wbc_trust.predict import Predictor

IMAGES = [path for cls in config.CLASSES for path in pbc_files(cls, 2, offset=100)]


def assert_same_as_pytorch(onnx_model: OnnxModel, model_path: Path | None) -> None:
    """ONNX probabilities and pooled features equal PyTorch's fp32 ones (test-time views included) on the real
    images."""
    model, meta = load_model(model_path)
    images = torch.stack([image_to_tensor(read_image(path, meta["img_size"])) for path in IMAGES])
    logits, features = onnx_model.logits_and_features(images, batch_size=4)
    with torch.inference_mode():
        reference, reference_features = model.predict(images.float() / 255.0)
    assert (torch.softmax(logits, 1) - torch.softmax(reference, 1)).abs().max() < 1e-3
    assert torch.allclose(features, reference_features, rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def onnx_predictor() -> Predictor:
    """The default model with ``--backend onnx`` (exported once into the test's cache dir)."""
    return Predictor(backend="onnx")


def test_onnx_matches_pytorch_on_real_images(onnx_predictor: Predictor) -> None:
    assert isinstance(onnx_predictor.model, OnnxModel)
    assert_same_as_pytorch(onnx_predictor.model, None)


def test_predict_backend_onnx_gives_the_same_answers(onnx_predictor: Predictor, tmp_path: Path) -> None:
    rows = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.csv"
        result = CliRunner().invoke(app, ["predict", *map(str, IMAGES), "--backend", backend, "--csv", str(out)])
        assert result.exit_code == 0, result.output
        rows[backend] = list(csv.DictReader(out.open()))
    assert len(rows["onnx"]) == len(IMAGES)
    for torch_row, onnx_row in zip(rows["torch"], rows["onnx"]):
        assert onnx_row["prediction"] == torch_row["prediction"]
        assert onnx_row["prediction_set"] == torch_row["prediction_set"]
        # the PyTorch backend runs in bf16 where the CPU supports it, ONNX in fp32
        assert abs(float(onnx_row["confidence"]) - float(torch_row["confidence"])) < 0.05


def test_export_onnx_command(tiny_run: Path, tmp_path: Path) -> None:
    model_path = tiny_run / "model.safetensors"
    out = tmp_path / "tiny.onnx"
    result = CliRunner().invoke(app, ["export-onnx", str(out), "--model", str(model_path)])
    assert result.exit_code == 0, result.output
    assert_same_as_pytorch(OnnxModel(out), model_path)
    stored = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(stored[META_KEY])["arch"] == "cnn"


def test_every_test_view_exports(tiny_run: Path, tmp_path: Path) -> None:
    """A model that averages all eight symmetries of the square (quarter turns and transposes as well as the flips)
    exports, and its graph answers as PyTorch does."""
    model, meta = load_model(tiny_run / "model.safetensors")
    all_views = tmp_path / "all_views.safetensors"
    save_model(all_views, model, {**meta, "test_views": list(VIEWS)}, load_extra(tiny_run / "model.safetensors"))
    assert load_model(all_views)[0].views == tuple(VIEWS) and len(VIEWS) == 8
    out = tmp_path / "all_views.onnx"
    result = CliRunner().invoke(app, ["export-onnx", str(out), "--model", str(all_views)])
    assert result.exit_code == 0, result.output
    assert_same_as_pytorch(OnnxModel(out), all_views)


def test_unknown_backend_is_refused() -> None:
    result = CliRunner().invoke(app, ["predict", str(IMAGES[0]), "--backend", "tensorrt"])
    assert result.exit_code != 0
    assert "unknown backend" in str(result.exception)


@pytest.fixture(scope="module")
def exported_default(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped default model exported with `wbc export-onnx` (network, metadata and calibration in one file)."""
    out = tmp_path_factory.mktemp("onnx") / "default.onnx"
    result = CliRunner().invoke(app, ["export-onnx", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_predict_with_an_exported_onnx_file(exported_default: Path, tmp_path: Path) -> None:
    """The command the CLI help advertises, `wbc predict --backend onnx --model OUT.onnx`, answers like the model
    file it came from: exactly as the same graph with the model file's calibration, and like PyTorch (same classes,
    prediction sets and flags, probabilities within 1e-3)."""
    stored = {p.key: p.value for p in onnx.load(str(exported_default)).metadata_props}
    assert json.loads(stored[META_KEY]) == load_model(None)[1]  # the model file's metadata, calibration included
    images = IMAGES + [config.SAMPLE_DATA_DIR.parent / "default_model.safetensors"]  # + one file that is no image
    rows = {}
    for name, options in {
        "torch": [],
        "onnx": ["--backend", "onnx"],
        "onnx file": ["--backend", "onnx", "--model", str(exported_default)],
    }.items():
        out = tmp_path / f"{name}.csv"
        result = CliRunner().invoke(app, ["predict", *map(str, images), *options, "--csv", str(out)])
        assert result.exit_code == 0, result.output
        rows[name] = list(csv.DictReader(out.open()))
    # everything the calibration computes (temperature, sets, OOD scores, flags) is the model file's, to the digit
    assert rows["onnx file"] == rows["onnx"]
    assert len(rows["onnx file"]) == len(images) and rows["onnx file"][-1]["flag"].startswith("unreadable")
    for torch_row, onnx_row in zip(rows["torch"], rows["onnx file"]):
        assert onnx_row["prediction"] == torch_row["prediction"]
        assert onnx_row["flag"] == torch_row["flag"] and onnx_row["prediction_set"] == torch_row["prediction_set"]
        assert onnx_row["prediction_set"] or not onnx_row["prediction"], "the calibration did not travel"
        for column in (c for c in torch_row if c.startswith("p_") and torch_row[c]):
            assert abs(float(onnx_row[column]) - float(torch_row[column])) < 1e-3, column


def test_onnx_file_needs_the_onnx_backend_and_its_metadata(exported_default: Path, tmp_path: Path) -> None:
    with pytest.raises(WbcError, match="--backend onnx"):
        Predictor(exported_default)
    foreign = onnx.load(str(exported_default))
    del foreign.metadata_props[:]  # an ONNX file from another tool: no wbc-trust metadata
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(WbcError, match="no wbc-trust metadata"):
        Predictor(tmp_path / "foreign.onnx", backend="onnx")
