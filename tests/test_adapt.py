"""`wbc adapt` and the two warnings, on real images: BCCD's white cells (another lab: other microscope, stain and
camera) and PBC's own platelets (the model's lab, not white cells)."""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import pbc_files
from typer.testing import CliRunner

from wbc_trust import config
from wbc_trust.calibration import FLAG_NEW_LAB, FLAG_NOT_WBC
from wbc_trust.cli import app
from wbc_trust.colour import ColourTransfer, LabStatistics
from wbc_trust.data import Record, list_files, load_images
from wbc_trust.errors import WbcError
from wbc_trust.lab import statistics
from wbc_trust.modelfile import load_model, read_metadata
from wbc_trust.predict import Predictor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
BCCD = SHARED / "bccd-wbc"
PLATELETS = SHARED / "pbc-non-wbc" / "platelet"
#: labelled cells per class given to `wbc adapt` (BCCD has 3 basophils: one of them is the one-cell case)
FEW = {"Basophil": 1, "Eosinophil": 5, "Lymphocyte": 5, "Monocyte": 5, "Neutrophil": 5}
SELECTION_SEED = 0

pytestmark = pytest.mark.skipif(not BCCD.is_dir(), reason="needs ../shared/datasets/bccd-wbc")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    """A lab folder with FEW labelled cells per class drawn at random (seeded), and all its other cells: a folder of
    them (the lab's unlabelled images) and their files, to test on."""
    root = tmp_path_factory.mktemp("lab")
    (root / "rest").mkdir()
    test: list[Path] = []
    for name, n in FEW.items():
        files = list_files(BCCD / name)
        random.Random(SELECTION_SEED).shuffle(files)
        (root / "cells" / name).mkdir(parents=True)
        for f in files[:n]:
            shutil.copy(f, root / "cells" / name / f.name)
        for f in files[n:]:
            shutil.copy(f, root / "rest" / f.name)
        test += files[n:]
    return root / "cells", root / "rest", test


def _answers(model: Path | None, files: list[Path]) -> tuple[float, list[str]]:
    """Accuracy of ``model`` on ``files`` read as one folder (their folder names are their classes), and its flags."""
    predictions = Predictor(model).predict_files(files, progress=False)
    right = sum(p.prediction == f.parent.name.lower() for p, f in zip(predictions, files))
    return right / len(files), [p.flag for p in predictions]


def test_adapt_on_a_few_cells_beats_the_base_model_on_the_others(
    lab: tuple[Path, Path, list[Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As a lab runs it: a few cells labelled, the rest given unlabelled; with a short fine-tuning (the default's 80
    steps, three times over for the cross-fitted calibration, take minutes: docs/another-lab.md)."""
    cells, rest, test = lab
    args = ["adapt", "--data", str(cells), "--unlabelled", str(rest), "--fine-tune-steps", "12"]
    with caplog.at_level(logging.INFO, logger="wbc_trust"):
        result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "basophil (1 cell)" in warnings[0], warnings  # one warning, not an error
    adapted = tmp_path / "run" / "model.safetensors"
    meta = read_metadata(adapted)
    provenance = meta["adapted"]
    # BCCD's crops: too few read a ruler (70 of 351), and most are tight crops, whose frames give the lab's scale
    # (its fields' red cells: 14.67 px/µm)
    assert "tight crops" in provenance["px_per_um"]["source"] and 11 < provenance["px_per_um"]["value"] < 18
    assert provenance["cells_per_class"] == {c.lower(): n for c, n in FEW.items()}
    assert provenance["classes_kept_from_base"] == ["basophil"]
    assert len(provenance["lab_data_fingerprint"]) == 64 and provenance["base_model_sha256"]
    assert provenance["replay"]["n_images"] > 0  # the base model's training data or the shipped sample
    assert meta["calibration"]["cross_fitted"] and "lab" in meta["calibration"]
    assert provenance["fine_tune_steps"] == 12 and "fine-tuned folds" in provenance["method"]
    assert provenance["lab_augment"] == (config.ADAPT_LAB_AUGMENT or meta["training"]["augment"])
    assert provenance["unlabelled"]["n_images"] == len(test) + sum(FEW.values())  # its labelled cells are its too
    prevalence = provenance["class_prevalence"]  # BCCD's cells are mostly neutrophils (207 of 351)
    assert max(prevalence, key=prevalence.get) == "neutrophil", prevalence
    base, _ = load_model()
    tuned, _ = load_model(adapted)
    name = "net.bn1.running_mean"  # the lab's batch-norm statistics
    assert not torch.allclose(dict(base.named_buffers())[name], dict(tuned.named_buffers())[name])
    frozen = meta["training"]["frozen_stages"]
    same = [torch.equal(a, b) for a, b in zip(base.stages()[-1].parameters(), tuned.stages()[-1].parameters())]
    assert not all(same)  # the late stages were fine-tuned, the base recipe's frozen ones not
    last_frozen = zip(base.stages()[frozen - 1].parameters(), tuned.stages()[frozen - 1].parameters())
    assert frozen > 0 and all(torch.equal(a, b) for a, b in last_frozen)
    (base_accuracy, _), (adapted_accuracy, flags) = _answers(None, test), _answers(adapted, test)
    # the 330 other cells, read at the lab's scale (session 17; `python bench/adapt_test_recipe.py --selection first 0
    # 1 2`): the shipped default 240 right zero-label, adapted 259
    # (selections 1 and 2: 246 -> 256, 243 -> 261; the first files of each class, the worst selection measured:
    # 248 -> 254). Until session 17 the base read such crops without their lab's scale and the adapted model beat it
    # by more than 15 points on 34 of them.
    assert adapted_accuracy >= base_accuracy + 0.03, (base_accuracy, adapted_accuracy)
    # recalibrated on the lab: its own cells are no longer "from an unfamiliar lab"
    assert flags.count(FLAG_NEW_LAB) <= len(test) // 4, flags


def test_labelled_cells_alone_re_estimate_batch_norm_and_say_what_they_miss(
    lab: tuple[Path, Path, list[Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without --unlabelled the labelled cells are the lab's images for batch norm, and nothing tells the lab's
    class prevalence: one warning says to give the lab's other images (here the head alone, to be quick)."""
    cells, _, _ = lab
    with caplog.at_level(logging.WARNING, logger="wbc_trust"):
        args = ["adapt", "--data", str(cells), "--fine-tune-steps", "0", "--out", str(tmp_path / "run")]
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    provenance = read_metadata(tmp_path / "run" / "model.safetensors")["adapted"]
    assert provenance["batch_norm"].endswith(f"the lab's {sum(FEW.values())} labelled cells")
    assert "class_prevalence" not in provenance  # no unlabelled images, nothing to estimate it on
    assert sum("--unlabelled" in r.getMessage() for r in caplog.records) == 1, caplog.records


def test_unlabelled_adaptation_maps_the_labs_colours_to_the_training_labs(tmp_path: Path) -> None:
    images = tmp_path / "unlabelled"
    images.mkdir()
    files = list_files(BCCD / "Neutrophil")[:12] + list_files(BCCD / "Eosinophil")[:4]
    for f in files:
        shutil.copy(f, images / f.name)
    # at BCCD's magnification (its fields' red cells read 14.67 px/µm; its small crops' rulers disagree)
    args = ["adapt", "--unlabelled", str(images), "--px-per-um", "14.67", "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    base, _ = load_model()
    adapted, meta = load_model(tmp_path / "run" / "model.safetensors")
    assert (
        meta["adapted"]["unlabelled"]["n_images"] == 16 and "colour transfer" in meta["adapted"]["unlabelled"]["method"]
    )
    assert isinstance(adapted.colour, ColourTransfer) and isinstance(base.colour, torch.nn.Identity)
    for name, buffer in base.named_buffers():  # no labels, no batch-norm re-estimation: only the colours move
        assert torch.equal(buffer, dict(adapted.named_buffers())[name]), name
    # ... and the head's priors, to the prevalence EM reads in a folder of 12 neutrophils and 4 eosinophils: mostly
    # granulocytes (BCCD's neutrophils and eosinophils are what the model tells apart worst), the rest at the floor
    prevalence = meta["adapted"]["class_prevalence"]
    assert abs(sum(prevalence.values()) - 1) < 1e-3 and min(prevalence.values()) > 0.018, prevalence
    assert prevalence["neutrophil"] + prevalence["eosinophil"] > 0.8, prevalence
    shift = adapted.last_linear().bias - base.last_linear().bias
    expected = meta["calibration"]["temperature"] * torch.log(5 * torch.tensor(list(prevalence.values())))
    assert torch.allclose(shift, expected, atol=1e-3), (shift, expected)
    # BCCD's pale, blue views come out with the training lab's CIELAB statistics (measured on its replay images)
    views = torch.stack([Predictor(tmp_path / "run" / "model.safetensors").to_tensor(f) for f in files])
    before, after = LabStatistics.of(views), LabStatistics.of(adapted.colour(views.float() / 255))
    home = adapted.colour.home
    assert abs(before.std[0] - home.std[0]) > 4 and abs(before.mean[2] - home.mean[2]) > 4, (before, home)
    assert all(abs(a - h) < 1.5 for a, h in zip(after.mean + after.std, home.mean + home.std)), (after, home)


def test_unlabelled_with_labelled_cells_re_estimates_batch_norm(
    lab: tuple[Path, Path, list[Path]], tmp_path: Path
) -> None:
    """With --data the stages are fine-tuned with replay images in the training lab's colours, so --unlabelled
    re-estimates batch norm there instead of moving the colours (here the head alone, to be quick)."""
    cells, _, _ = lab
    args = ["adapt", "--data", str(cells), "--unlabelled", str(BCCD / "Lymphocyte"), "--fine-tune-steps", "0"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    base, _ = load_model()
    adapted, meta = load_model(tmp_path / "run" / "model.safetensors")
    assert meta["adapted"]["unlabelled"]["method"].startswith("AdaBN") and "colour" not in meta
    prevalence = meta["adapted"]["class_prevalence"]  # a folder of lymphocytes reads as one
    assert max(prevalence, key=prevalence.get) == "lymphocyte" and prevalence["lymphocyte"] > 0.5, prevalence
    name = "net.bn1.running_mean"
    assert not torch.allclose(dict(base.named_buffers())[name], dict(adapted.named_buffers())[name])


def test_a_folder_that_is_not_labelled_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "lab"
    folder.mkdir()
    for name in FEW:
        shutil.copy(list_files(BCCD / name)[0], folder)
    result = subprocess.run(
        [sys.executable, "-m", "wbc_trust.cli", "adapt", "--data", str(folder), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error:") and "is not a labelled folder" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "model.safetensors").exists()


def test_one_cell_per_class_is_too_few_to_adapt_on(tmp_path: Path) -> None:
    folder = tmp_path / "lab"
    for name in FEW:
        (folder / name).mkdir(parents=True)
        shutil.copy(list_files(BCCD / name)[0], folder / name)
    result = CliRunner().invoke(app, ["adapt", "--data", str(folder), "--out", str(tmp_path / "run")])
    assert isinstance(result.exception, WbcError), result.output
    assert "at least 2 cells of at least two classes" in str(result.exception)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_two_warnings_and_one_notice_for_a_folder_from_another_lab(tmp_path: Path) -> None:
    if Predictor().calibration.lab is None:
        pytest.fail("the shipped default model has no lab statistic: python bench/cross_lab.py --install-lab-statistic")
    other_lab = [f for name in FEW for f in list_files(BCCD / name)[:3]]
    platelets = list_files(PLATELETS)[:10]
    predictor = Predictor()
    lab_flags = [p.flag for p in predictor.predict_files(other_lab, progress=False)]
    platelet_flags = [p.flag for p in predictor.predict_files(platelets, progress=False)]
    assert lab_flags.count(FLAG_NEW_LAB) >= len(other_lab) - 1, lab_flags
    assert platelet_flags.count(FLAG_NOT_WBC) >= 7 and platelet_flags.count(FLAG_NEW_LAB) <= 1, platelet_flags
    result = CliRunner().invoke(app, ["predict", *map(str, other_lab)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert output.count("wbc adapt --data") == 1  # one message up front, not one per row
    assert "--px-per-um" not in output  # 10 of the 15 are tight crops: their frames give the magnification...
    # ...but in these 24 neither the red cells nor the frames (7 tight crops) do, so the note says how to give it
    mixed = [f for name in ("Neutrophil", "Eosinophil") for f in list_files(BCCD / name)[:12]]
    result = CliRunner().invoke(app, ["predict", *map(str, mixed)])
    assert result.exit_code == 0 and " ".join(result.output.split()).count("--px-per-um X") == 1, result.output
    assert predictor.batch_notice(predictor.predict_files(platelets, progress=False)) is None

    # the same lab's whole fields show their red cells: the batch's magnification is measured, nothing to add
    fields = sorted((SHARED / "bccd-fields" / "JPEGImages").glob("*.jpg"))[:10]
    crop = predictor.batch_policy(fields)
    assert crop.px_per_um is not None and 11 < crop.px_per_um < 18
    notice = predictor.batch_notice(predictor.predict_files(fields, progress=False, crop=crop), crop)
    assert notice is not None and "wbc adapt --data" in notice and "--px-per-um" not in notice


def test_lab_statistics_are_each_images_own_whatever_the_batch() -> None:
    """The lab statistic is computed a few images at a time (it held ~1 GB for a whole calibration split): on real
    images of two labs, any batch size gives the same numbers, and the two labs' colours differ."""
    records = [Record(p, 0) for p in list_files(BCCD / "Neutrophil")[:5] + pbc_files("neutrophil", 5)]
    images = load_images(records, 96, cache=False).images
    whole = statistics(images, batch_size=len(images))
    assert whole.shape == (10, 15) and torch.equal(statistics(images, batch_size=3), whole)
    assert float((whole[:5].mean(0) - whole[5:].mean(0)).abs().max()) > 0.05  # BCCD's pale blue against PBC's
