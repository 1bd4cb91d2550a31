"""Same seed and data → same split, same metrics and same weights on CPU; every model says how it was made
(package versions, git commit, data fingerprint)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wbc_trust import config
from wbc_trust.data import Record, find_dataset, load_images
from wbc_trust.modelfile import read_metadata
from wbc_trust.train import TrainConfig, data_fingerprint, prepare_splits, train

#: The settings of conftest's ``tiny_run`` (a 1-epoch seed-CNN run at 64 px, batch 16, default seed).
TINY = {"arch": "cnn", "epochs": 1, "batch_size": 16, "img_size": 64}


def _json(path: Path) -> object:
    return json.loads(path.read_text())


def test_same_seed_and_data_give_the_same_run(tiny_run: Path, small_tree: Path, tmp_path: Path) -> None:
    """A second run with tiny_run's settings: identical split, history (but time), test metrics and weights."""
    again = tmp_path / "again"
    train(TrainConfig(data=small_tree, out=again, **TINY))
    assert _json(again / "split.json") == _json(tiny_run / "split.json")
    without_time = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert without_time(_json(again / "history.json")) == without_time(_json(tiny_run / "history.json"))
    assert _json(again / "test" / "metrics.json") == _json(tiny_run / "test" / "metrics.json")
    first, second = load_file(str(tiny_run / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert read_metadata(again / "model.safetensors")["data"] == read_metadata(tiny_run / "model.safetensors")["data"]


def test_another_seed_gives_another_split(small_tree: Path, tmp_path: Path, tiny_run: Path) -> None:
    """The comparison above can fail: the seed really drives the split (and the fingerprint does not depend on it)."""
    splits, _ = prepare_splits(TrainConfig(data=small_tree, out=tmp_path, seed=1, **TINY), 64)
    reference = _json(tiny_run / "split.json")
    assert splits.split_file["test"] != reference["test"]
    assert splits.split_file["data_fingerprint"] == reference["data_fingerprint"]


def test_model_metadata_carries_the_run_manifest(tiny_run: Path) -> None:
    meta = read_metadata(tiny_run / "model.safetensors")
    manifest = meta["manifest"]
    for package in ("torch", "torchvision", "timm", "numpy", "pillow", "scikit-learn"):
        assert re.match(r"\d+\.\d+", manifest["versions"][package]), package
    assert re.fullmatch(r"[0-9a-f]{40}", manifest["git_commit"] or ""), manifest["git_commit"]
    assert manifest["python"] and manifest["platform"] and manifest["torch_threads"] >= 1
    assert meta["training"]["seed"] == config.SEED
    assert re.fullmatch(r"[0-9a-f]{64}", meta["data"]["fingerprint"])
    assert meta["data"]["fingerprint"] == _json(tiny_run / "split.json")["data_fingerprint"]


def _fingerprint(root: Path) -> str:
    records = find_dataset(root).splits["all"]
    return data_fingerprint(load_images(records, 16, cache=False))


@pytest.fixture
def tree_copy(small_tree: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(small_tree, tmp_path / "copy"))


def test_fingerprint_follows_images_and_labels_not_names(small_tree: Path, tree_copy: Path, tiny_run: Path) -> None:
    original = _json(tiny_run / "split.json")["data_fingerprint"]
    assert _fingerprint(small_tree) == original

    for i, path in enumerate(sorted((tree_copy / "monocyte").iterdir())):  # renamed files: same data
        path.rename(path.with_name(f"renamed_{i}{path.suffix}"))
    assert _fingerprint(tree_copy) == original

    moved = next((tree_copy / "monocyte").iterdir())  # one image relabelled: other data
    moved.rename(tree_copy / "lymphocyte" / moved.name)
    relabelled = _fingerprint(tree_copy)
    assert relabelled != original

    changed = next((tree_copy / "basophil").iterdir())  # one byte of one image changed: other data
    data = bytearray(changed.read_bytes())
    data[-3] ^= 0x01
    changed.write_bytes(bytes(data))
    assert _fingerprint(tree_copy) not in (original, relabelled)


def test_fingerprint_ignores_unreadable_files(small_tree: Path, tree_copy: Path, tiny_run: Path) -> None:
    """Files that are never trained on do not change what the model was trained on."""
    (tree_copy / "basophil" / "broken.jpg").write_bytes(b"not a jpeg")
    records = find_dataset(tree_copy).splits["all"]
    loaded = load_images(records, 16, cache=False)
    assert [p.name for p, _ in loaded.unreadable] == ["broken.jpg"]
    assert data_fingerprint(loaded) == _json(tiny_run / "split.json")["data_fingerprint"]
    assert Record(tree_copy / "basophil" / "broken.jpg", 0) in records
