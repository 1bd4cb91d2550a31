"""Recipes: ``wbc train`` without options is default.yaml and the shipped model travel.yaml; ``--config FILE`` is read,
explicit options override it and every run saves its effective recipe as ``args.yaml``; the best-epoch rule; the
calibration split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from wbc_trust import config
from wbc_trust.calibration import calibrate
from wbc_trust.cli import app
from wbc_trust.data import find_dataset, load_images, split_plan, split_records
from wbc_trust.errors import WbcError
from wbc_trust.modelfile import read_metadata
from wbc_trust.recipe import TrainConfig, load_recipe, make_config, shipped_recipes
from wbc_trust.train import resolve, update_best

#: What a recipe is, beside where it reads and writes.
RUN_ONLY = {"data", "out", "resume"}


def test_no_options_are_default_yaml_and_the_shipped_model_is_travel_yaml(default_model: Path) -> None:
    """``wbc train`` without options is ``recipes/default.yaml`` (the quick whole-frame recipe of issue 14's timings);
    the shipped default model was made by ``--config travel`` and records every setting of that file."""
    defaults = resolve(TrainConfig(data=Path("d"), out=Path("o")))
    assert resolve(make_config("default", data="d", out="o")) == defaults
    assert defaults.augment == "seed" and defaults.crop == "frame" and defaults.max_images is None
    # default.yaml spells out every recipe setting
    assert set(load_recipe("default")) == {f for f in defaults.__dataclass_fields__} - RUN_ONLY
    travel = resolve(make_config("travel", data="d", out="o"))
    shipped = read_metadata(default_model)
    recorded = {**shipped["training"], "img_size": shipped["img_size"]}  # it was trained with the default size (null)
    for key in set(load_recipe("default")) - {"bf16", "device", "max_images", "mixup"}:  # the machine's, or unset
        value = getattr(travel, key)
        assert (list(value) if key == "test_views" else value) == recorded[key], key
    assert recorded["test_views"] == shipped["test_views"]


def test_architecture_defaults_follow_the_architecture() -> None:
    """The custom CNN has no ImageNet weights: it starts from scratch with nothing frozen unless told otherwise."""
    cnn = resolve(make_config("cnn", data="d", out="o"))
    assert (cnn.pretrained, cnn.frozen_stages, cnn.img_size, cnn.lr) == ("none", 0, 128, 2e-3)
    scratch = resolve(TrainConfig(data=Path("d"), out=Path("o"), pretrained="none"))
    assert scratch.arch == config.DEFAULT_ARCH and scratch.frozen_stages == 0
    assert {"default", "cnn", "resnet50", "cross_lab"} <= set(shipped_recipes())
    assert resolve(make_config("cross_lab", data="d", out="o")) == resolve(
        TrainConfig(data=Path("d"), out=Path("o"), augment="cross-lab")
    )


def test_bad_recipes_say_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 8\nlearning_rate: 0.1\n")
    with pytest.raises(WbcError, match="unknown setting 'learning_rate'.*lr"):
        load_recipe(bad)
    with pytest.raises(WbcError, match="mixup's alpha must be 0"):
        resolve(make_config(data="d", out="o", mixup=-0.2))
    bad.write_text("epochs: many\n")
    with pytest.raises(WbcError, match="epochs: expected int"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(WbcError, match="must map setting names"):
        load_recipe(bad)
    with pytest.raises(WbcError, match="no such recipe file.*cnn"):
        load_recipe("nonexistent")
    with pytest.raises(WbcError, match="--data is required"):
        make_config("cnn", out="o")


def test_config_file_explicit_options_and_args_yaml(small_tree: Path, tmp_path: Path) -> None:
    """A real ``wbc train --config FILE --epochs 1`` run: the file's settings apply, the explicit option wins, and
    ``args.yaml`` holds the effective recipe, which repeats the run when given back as ``--config``."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("arch: cnn\nimg_size: 64\nbatch_size: 16\nepochs: 5\nlr: 2e-3\nmax_images: 16\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", "--config", str(recipe), "--data", str(small_tree), "--out", str(out), "--epochs", "1"]
    )
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "args.yaml").read_text())
    assert saved["epochs"] == 1 and saved["arch"] == "cnn" and saved["lr"] == 2e-3 and saved["img_size"] == 64
    assert saved["pretrained"] == "none" and saved["data"] == str(small_tree) and "resume" not in saved
    training = read_metadata(out / "model.safetensors")["training"]
    # the model file records what the settings resolved to on this machine (device auto → cpu, bf16 null → on/off)
    assert {k: training[k] for k in saved if k not in ("device", "bf16")} == {
        k: v for k, v in saved.items() if k not in ("device", "bf16")
    }
    assert saved["device"] == "auto" and training["device"] == "cpu" and isinstance(training["bf16"], bool)
    assert training["world_size"] == 1 and training["effective_batch_size"] == 16
    assert make_config(out / "args.yaml") == resolve(make_config(recipe, data=small_tree, out=out, epochs=1))


ROW = {"val_macro_f1": 0.9, "val_loss": 0.3}


def test_best_epoch_rule() -> None:
    """First-half epochs only stand in until the annealing half; then the best macro-F1 (lower loss on ties) wins,
    and only annealing-half epochs that do not improve count towards early stopping."""
    first = {**ROW, "epoch": 1}
    best, stale, improved = update_best(None, 0, first, epochs=8)
    assert (best, stale, improved) == (first, 0, True)
    better_early = {**ROW, "epoch": 2, "val_macro_f1": 0.99}
    assert update_best(first, 0, better_early, 8) == (first, 0, False)  # mid-flight: not kept, not stale
    worse_late = {**ROW, "epoch": 5, "val_macro_f1": 0.5}
    assert update_best(first, 0, worse_late, 8) == (worse_late, 0, True)  # first annealing epoch replaces a stand-in
    tie_lower_loss = {**worse_late, "epoch": 6, "val_loss": 0.1}
    assert update_best(worse_late, 0, tie_lower_loss, 8) == (tie_lower_loss, 0, True)
    no_gain = {**tie_lower_loss, "epoch": 7}
    assert update_best(tie_lower_loss, 0, no_gain, 8) == (tie_lower_loss, 1, False)
    assert update_best(tie_lower_loss, 1, {**no_gain, "epoch": 8}, 8) == (tie_lower_loss, 2, False)


def test_calibration_split_is_carved_out_of_validation(small_tree: Path) -> None:
    """Train and test are exactly the split without a calibration part; calib and val are disjoint, stratified,
    and byte-identical files stay on one side."""
    pool, fractions, _ = split_plan(find_dataset(small_tree))
    loaded = load_images(pool, 16, cache=False)
    before = split_records(loaded.records, loaded.digests, fractions, seed=0)
    after = split_records(loaded.records, loaded.digests, fractions, seed=0, calib_fraction=0.5)
    assert after["train"] == before["train"] and after["test"] == before["test"]
    assert sorted(r.path for r in after["val"] + after["calib"]) == sorted(r.path for r in before["val"])
    assert abs(len(after["calib"]) - len(before["val"]) / 2) <= 1
    assert {r.label for r in after["calib"]} == {r.label for r in after["val"]} == set(range(len(config.CLASSES)))

    digests = list(loaded.digests)
    digests[[r.path for r in loaded.records].index(before["val"][0].path)] = digests[
        [r.path for r in loaded.records].index(before["val"][1].path)
    ]  # two val images made byte-identical
    twins = {before["val"][0].path, before["val"][1].path}
    for seed in range(6):  # wherever the pair lands (train, val, calib or test), it lands together
        with_twins = split_records(loaded.records, digests, fractions, seed=seed, calib_fraction=0.5)
        sides = [name for name, records in with_twins.items() if twins & {r.path for r in records}]
        assert len(sides) == 1 and twins <= {r.path for r in with_twins[sides[0]]}, (seed, sides)


def test_training_and_wbc_calibrate_use_the_calibration_split(tiny_run: Path, small_tree: Path, tmp_path: Path) -> None:
    split = json.loads((tiny_run / "split.json").read_text())
    assert split["calib"] and not set(split["calib"]) & set(split["val"])
    meta = read_metadata(tiny_run / "model.safetensors")
    assert meta["data"]["n_calib"] == len(split["calib"]) and meta["data"]["n_val"] == len(split["val"])
    assert meta["calibration"]["n_images"] == len(split["calib"])
    assert meta["calibration"]["fitted_on"].startswith("calibration split")
    model = Path(shutil.copy(tiny_run / "model.safetensors", tmp_path / "model.safetensors"))
    stored = calibrate(model, small_tree)
    assert stored["n_images"] == len(split["calib"]) and stored["fitted_on"].startswith("calibration split")
