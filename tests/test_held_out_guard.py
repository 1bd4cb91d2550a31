"""The held-out guard follows the data, not its path: a model's own training images, reached through symlinked folders
or copied elsewhere, are recognised by content (the data fingerprint in the model file), so evaluation runs on the
held-out test split only, calibration recomputes the validation split, and influence knows the training images."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import PBC, make_tree

from wbc_trust import config
from wbc_trust.data import find_dataset, match_training_data, relative_paths, validation_split
from wbc_trust.errors import WbcError
from wbc_trust.evaluate import choose_records, evaluate
from wbc_trust.modelfile import read_metadata
from wbc_trust.trust.influence import training_records


def _linked(source: Path, target: Path) -> Path:
    """A folder whose class folders are symlinks into ``source`` (another path to the same files, as another checkout
    or mount gives; a symlink to the root itself resolves to the same path)."""
    target.mkdir()
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / folder.name).symlink_to(folder, target_is_directory=True)
    return target


def test_the_shipped_models_training_folder_through_symlinks_evaluates_only_its_held_out_split(
    default_model: Path, tmp_path: Path
) -> None:
    meta = read_metadata(default_model)
    index = find_dataset(_linked(PBC, tmp_path / "pbc"), require_all_classes=False)
    target = choose_records(index, meta)
    assert sorted(relative_paths(target.records, index.root)) == sorted(meta["data"]["test_files"])
    assert len(target.left_out) == len(index.splits["all"]) - len(meta["data"]["test_files"])
    assert "training data" in target.description and "left out" in target.description


@pytest.fixture(scope="module")
def views(tiny_run: Path, small_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("views")
    copy = root / "elsewhere" / "copy"
    shutil.copytree(small_tree, copy)
    link = root / "link"
    link.symlink_to(small_tree, target_is_directory=True)
    return {"symlinked folders": _linked(small_tree, root / "linked"), "copy": copy, "symlink": link}


@pytest.mark.parametrize("view", ["symlinked folders", "copy", "symlink"])
def test_a_tiny_runs_training_data_elsewhere_is_guarded(view: str, views: dict, tiny_run: Path, tmp_path: Path) -> None:
    data, model_path = views[view], tiny_run / "model.safetensors"
    split = json.loads((tiny_run / "split.json").read_text())
    meta = read_metadata(model_path)
    metrics = evaluate(model_path, data, tmp_path)
    assert metrics["n_images"] == len(split["test"]), metrics["evaluated"]
    with (tmp_path / "predictions.csv").open() as f:
        evaluated = {str(Path(row["path"]).relative_to(Path(data).resolve())) for row in csv.DictReader(f)}
    assert evaluated == set(split["test"])
    with (tmp_path / "left_out.csv").open() as f:
        left_out = list(csv.DictReader(f))
    assert len(left_out) == len(split["train"]) + len(split["val"]) + len(split.get("calib", []))
    assert all("trained or was validated on them" in row["reason"] for row in left_out)

    held, fitted_on = validation_split(meta, data)  # `wbc calibrate MODEL --data VIEW`: the split training fitted on
    assert sorted(relative_paths(held.records, Path(data).resolve())) == sorted(split.get("calib") or split["val"])

    index = find_dataset(data, require_all_classes=False)  # influence: the held-out test images are not training ones
    assert not set(relative_paths(training_records(index, meta), index.root)) & set(split["test"])
    # and neither are the validation and calibration images: influence explains only what moved the weights
    assert sorted(relative_paths(training_records(index, meta), index.root)) == sorted(split["train"])


def test_a_changed_copy_or_another_folder_is_not_taken_for_the_training_data(
    tiny_run: Path, small_tree: Path, tmp_path: Path
) -> None:
    meta = read_metadata(tiny_run / "model.safetensors")
    split = json.loads((tiny_run / "split.json").read_text())
    relabelled = tmp_path / "relabelled"  # one training image moved to another class: not the same data any more
    shutil.copytree(small_tree, relabelled)
    moved = relabelled / split["train"][0]
    other_class = next(c for c in config.CLASSES if c != moved.parent.name)
    moved.rename(relabelled / other_class / moved.name)
    index = find_dataset(relabelled, require_all_classes=False)
    match = match_training_data(index, meta)
    assert not match.same and match.changed, match
    target = choose_records(index, meta)  # still only the held-out test files, and it says why
    assert sorted(relative_paths(target.records, index.root)) == sorted(split["test"])
    assert "changed since" in target.description
    with pytest.raises(WbcError, match="changed since the model was trained"):
        validation_split(meta, relabelled)

    unseen = make_tree(tmp_path / "unseen", 3, offset=200)  # images the model never saw: evaluated whole
    index = find_dataset(unseen, require_all_classes=False)
    assert not match_training_data(index, meta).same
    assert len(choose_records(index, meta).records) == len(index.splits["all"])
