"""One view for the model (crop.py) on real images: PBC crops, BCCD's tight crops and BCCD smear fields are all cut
to one physical window around the most central white cell, sizes stay information, and `wbc predict` says when an
image shows several white cells or none."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, require_shared
from PIL import Image
from typer.testing import CliRunner

from wbc_trust import config
from wbc_trust.cli import app
from wbc_trust.crop import FLAG_NONE, FLAG_SEVERAL, CropPolicy, image_reading, lab_scale, shared_finder
from wbc_trust.data import batch_policy, measure_scale, read_image, view_image
from wbc_trust.errors import WbcError
from wbc_trust.finder import CellFinder, read_voc
from wbc_trust.modelfile import load_extra, load_model, save_model
from wbc_trust.predict import Predictor

require_shared()
PBC = SHARED / "pbc-wbc"
CELL = CropPolicy("cell", 160)


def _files(folder: Path, n: int) -> list[Path]:
    return sorted(p for p in folder.glob("*.jpg") if not p.name.startswith("."))[:n]


def test_a_frame_policy_is_the_whole_image_resized() -> None:
    path = _files(PBC / "monocyte", 1)[0]
    view = view_image(path, CropPolicy("frame", 96))
    assert not view.flag and view.cell is None
    assert np.array_equal(np.asarray(view.image), np.asarray(read_image(path, 96)))


def test_pbc_views_are_centred_and_at_the_red_cell_scale() -> None:
    scales = []
    for path in _files(PBC / "neutrophil", 8):
        image = read_image(path)
        view = CELL.apply(image)
        assert view.image.size == (160, 160) and view.cell is not None
        cx, cy = view.cell.centre
        assert abs(cx - image.width / 2) < image.width / 4 and abs(cy - image.height / 2) < image.height / 4
        assert view.scale_from in ("red cells", "crop")
        scales.append(view.px_per_um)
    # PBC's scanner: about 10.9 px/µm (360 px ≈ 33 µm); each image's ruler reads it within its spread
    assert 9.5 < np.median(scales) < 12.0
    assert all(0.6 < s / np.median(scales) < 1.5 for s in scales), scales


def test_sizes_survive_the_view_lymphocytes_stay_smaller_than_monocytes() -> None:
    """Scale comes from magnification, not from the cell: the cell's box in µm keeps the classes' size difference."""

    def size_um(cls: str) -> float:
        sizes = []
        for path in _files(PBC / cls, 12):
            view = CELL.apply(read_image(path))
            sizes.append(max(view.cell.box[2] - view.cell.box[0], view.cell.box[3] - view.cell.box[1]) / view.px_per_um)
        return float(np.median(sizes))

    assert size_um("lymphocyte") < 0.85 * size_um("monocyte")


def test_a_tight_crop_is_padded_out_to_the_window() -> None:
    """BCCD's crops: the cell fills the frame, so the cell sets the scale and the view shows it at PBC's size."""
    seen = 0
    for path in _files(SHARED / "bccd-wbc" / "Neutrophil", 8):
        image = read_image(path)
        view = CELL.apply(image)
        if view.scale_from != "cell":
            continue
        seen += 1
        long_side = max(view.cell.box[2] - view.cell.box[0], view.cell.box[3] - view.cell.box[1])
        assert view.px_per_um == pytest.approx(long_side / config.CROP_CELL_UM)
        corner = np.asarray(view.image)[:8, :8].reshape(-1, 3).astype(int)
        assert np.ptp(corner, axis=0).max() <= 2  # the padding: one flat background colour, not black
        assert corner.mean() > 100
    # 4 of these 8 (70 of every third BCCD crop's 117) are tight to the finder's voted boxes; a looser box is read as
    # a crop framed like PBC's
    assert seen >= 4


def test_a_field_is_cut_around_its_white_cell_at_its_own_scale() -> None:
    path = sorted((SHARED / "bccd-fields" / "JPEGImages").glob("*.jpg"))[0]
    truth = read_voc(SHARED / "bccd-fields" / "Annotations" / f"{path.stem}.xml")
    view = CELL.apply(read_image(path))
    assert view.scale_from == "red cells" and 11 < view.px_per_um < 18  # BCCD's red cells: ~101 px ≈ 13.5 px/µm
    x, y = view.cell.centre
    assert any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in truth)


def _bccd_fields(n: int) -> list[Path]:
    return sorted((SHARED / "bccd-fields" / "JPEGImages").glob("*.jpg"))[:n]


def test_a_labs_magnification_is_measured_on_its_fields_or_on_the_frames_of_its_tight_crops() -> None:
    fields, why = lab_scale([image_reading(read_image(p)) for p in _bccd_fields(10)])
    assert fields is not None and 11 < fields < 18 and "red-cell ruler" in why, why  # annotated red cells: ~13.5 px/µm
    # the same lab's cropped cells: their rulers are too few and disagree (the edges cut the red cells), but 16 of these
    # 40 are tight crops, whose frames give the lab's scale (a frame per cell taken as CROP_TIGHT_FRAME_UM)
    crops = [p for cls in ("Neutrophil", "Eosinophil") for p in _files(SHARED / "bccd-wbc" / cls, 20)]
    from_frames, why = lab_scale([image_reading(read_image(p)) for p in crops])
    assert from_frames is not None and 11 < from_frames < 18, (from_frames, fields, why)  # the fields' range
    assert "tight crops" in why and "show enough red cells" in why, why
    # a few tight crops that do read a ruler can agree by chance (these 21 read 8.0 px/µm before the share rule):
    # where most of the images read none, the few that do are not believed, and the frames are read instead
    few = [
        p
        for cls, n in (("Basophil", 1), ("Eosinophil", 5), ("Lymphocyte", 5), ("Monocyte", 5), ("Neutrophil", 5))
        for p in _files(SHARED / "bccd-wbc" / cls, n)
    ]
    readings = [image_reading(read_image(p)) for p in few]
    read = sum(r.ruler is not None for r in readings)
    assert config.LAB_SCALE_MIN_IMAGES <= read < config.LAB_SCALE_MIN_SHARE * len(few), readings
    scale, why = lab_scale(readings)
    assert f"{read} of {len(few)} images show enough red cells" in why, why
    assert scale is not None and 11 < scale < 18, (scale, fields, why)  # not the rulers' 8.0
    # too few rulers and too few tight crops (7 of these 24): no scale, each image keeps its own
    mixed = [p for cls in ("Neutrophil", "Eosinophil") for p in _files(SHARED / "bccd-wbc" / cls, 12)]
    none, why = lab_scale([image_reading(read_image(p)) for p in mixed])
    assert none is None and "too few to measure their cells" in why, why


def test_a_folder_is_read_at_its_one_measured_magnification() -> None:
    """A batch from one microscope: every image cut at the median ruler of the batch, not at its own reading; a batch
    whose rulers disagree and which is not mostly tight crops (24 of BCCD's cropped cells), or a single image, keeps
    each image's own scale."""
    pbc = [p for cls in ("neutrophil", "monocyte", "lymphocyte") for p in _files(PBC / cls, 4)]
    batch = batch_policy(CELL, pbc)
    assert batch.px_per_um is not None and 9.5 < batch.px_per_um < 12.0
    own = [CELL.apply(read_image(p)) for p in pbc]
    assert np.median([v.px_per_um for v in own]) == pytest.approx(batch.px_per_um, rel=0.05)
    assert len({round(v.px_per_um, 3) for v in own}) > 1  # each image's ruler reads its own value...
    views = [batch.apply(read_image(p)) for p in pbc]
    assert {(v.scale_from, v.px_per_um) for v in views} == {("lab", batch.px_per_um)}  # ...the batch one scale
    crops = [p for cls in ("Neutrophil", "Eosinophil") for p in _files(SHARED / "bccd-wbc" / cls, 12)]
    assert batch_policy(CELL, crops) == CELL and batch_policy(CELL, pbc[:1]) == CELL
    assert batch_policy(CropPolicy("frame", 160), pbc) == CropPolicy("frame", 160)
    assert batch_policy(CELL.with_lab_scale(13.0), pbc).px_per_um == 13.0  # a lab's known scale is kept


def test_a_folders_rulers_are_read_once_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``measure_scale`` keeps its sample's readings on disk: a new process (here a new finder, without the last one's
    memory) gets the same magnification without searching an image; a file changed since is searched again."""
    folder = tmp_path / "lab"
    folder.mkdir()
    paths = []
    for src in [p for cls in ("neutrophil", "lymphocyte") for p in _files(PBC / cls, 6)]:
        paths.append(folder / src.name)
        shutil.copy(src, paths[-1])
    monkeypatch.setenv("WBC_CACHE_DIR", str(tmp_path / "cache"))
    searched: list[int] = []
    search = CellFinder._find_one
    monkeypatch.setattr(CellFinder, "_find_one", lambda self, array: searched.append(1) or search(self, array))

    def measured() -> tuple[float | None, str]:
        shared_finder.cache_clear()  # what a new process starts with
        return measure_scale(paths, "measuring")

    first = measured()
    assert first[0] is not None and 9.5 < first[0] < 12.0, first
    assert len(searched) == len(paths)
    assert measured() == first and len(searched) == len(paths)  # read, not searched
    os.utime(paths[0], ns=(10**9, 10**9))
    assert measured() == first and len(searched) == 2 * len(paths)


def test_at_the_labs_scale_a_tight_crop_keeps_its_cells_size() -> None:
    """Without a scale, every tight crop's cell is taken as CROP_CELL_UM; at the lab's magnification BCCD's
    lymphocytes stay smaller than its neutrophils, as in PBC."""
    lab = CELL.with_lab_scale(14.6)

    def size_um(policy: CropPolicy, cls: str) -> float:
        sizes = []
        for path in _files(SHARED / "bccd-wbc" / cls, 12):
            view = policy.apply(read_image(path))
            assert (view.scale_from == "lab") == (policy is lab)
            sizes.append(max(view.cell.box[2] - view.cell.box[0], view.cell.box[3] - view.cell.box[1]) / view.px_per_um)
        return float(np.median(sizes))

    assert size_um(CELL, "Lymphocyte") == pytest.approx(size_um(CELL, "Neutrophil"))
    assert size_um(lab, "Lymphocyte") < 0.8 * size_um(lab, "Neutrophil")
    assert CropPolicy.from_meta({"img_size": 160, "crop": lab.to_meta()}) == lab
    home = CropPolicy("cell", 160, home_px_per_um=10.9)
    assert CropPolicy.from_meta({"img_size": 160, "crop": home.to_meta()}) == home
    for scale in ({"px_per_um": 14.6}, {"home_px_per_um": 10.9}):
        with pytest.raises(WbcError, match="needs a cell policy"):
            CropPolicy("frame", 160, **scale)


@pytest.fixture(scope="module")
def cell_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped network and calibration in a model file whose crop policy is the cell view."""
    model, meta = load_model()
    path = tmp_path_factory.mktemp("model") / "cell.safetensors"
    save_model(path, model, {**meta, "crop": CELL.to_meta()}, load_extra())
    return path


def test_wbc_adapt_unlabelled_fields_stores_the_labs_scale(cell_model: Path, tiny_run: Path, tmp_path: Path) -> None:
    fields = tmp_path / "fields"
    fields.mkdir()
    for path in _bccd_fields(config.ADAPT_MIN_UNLABELLED + 2):
        (fields / path.name).write_bytes(path.read_bytes())
    result = CliRunner().invoke(
        app, ["adapt", "--unlabelled", str(fields), "--model", str(cell_model), "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    predictor = Predictor(tmp_path / "run" / "model.safetensors")
    measured = predictor.meta["adapted"]["px_per_um"]
    assert predictor.crop.px_per_um == measured["value"] and 11 < measured["value"] < 18
    assert "median red-cell ruler of 10 of 10 images" in measured["source"]
    view = predictor.view(_files(SHARED / "bccd-wbc" / "Lymphocyte", 1)[0])
    assert view.scale_from == "lab" and view.px_per_um == measured["value"]
    # a model of whole frames (the tiny run's) has no scale to set
    frame_model = str(tiny_run / "model.safetensors")
    refused = CliRunner().invoke(
        app,
        [
            "adapt",
            "--unlabelled",
            str(fields),
            "--px-per-um",
            "14",
            "--model",
            frame_model,
            "--out",
            str(tmp_path / "f"),
        ],
    )
    assert isinstance(refused.exception, WbcError) and "--px-per-um needs a model with the cell view" in str(
        refused.exception
    )


def test_predict_flags_several_white_cells_and_none(cell_model: Path, tmp_path: Path) -> None:
    fields = sorted((SHARED / "bccd-fields" / "JPEGImages").glob("*.jpg"))[:2]
    left, right = (Image.open(f).convert("RGB") for f in fields)
    two = Image.new("RGB", (left.width + right.width, left.height))
    two.paste(left, (0, 0))
    two.paste(right, (left.width, 0))
    two.save(tmp_path / "two_fields.png")
    # a corner of a real field away from every annotated white cell, where the finder sees none: red cells only
    corners = [(0, 0, 200, 200), (440, 0, 640, 200), (0, 280, 200, 480), (440, 280, 640, 480)]
    for field in sorted((SHARED / "bccd-fields" / "JPEGImages").glob("*.jpg"))[:10]:
        image = Image.open(field).convert("RGB")
        truth = read_voc(SHARED / "bccd-fields" / "Annotations" / f"{field.stem}.xml")
        free = [
            c
            for c in corners
            if not any(b[0] < c[2] and c[0] < b[2] and b[1] < c[3] and c[1] < b[3] for b in truth)
            and not shared_finder().find(image.crop(c)).cells
        ]
        if free:
            image.crop(free[0]).save(tmp_path / "no_cell.png")
            break
    predictor = Predictor(cell_model)
    assert predictor.crop == CELL
    answers = {Path(a.path).name: a for a in predictor.predict_files(sorted(tmp_path.glob("*.png")))}
    assert answers["two_fields.png"].flag.startswith(FLAG_SEVERAL)
    assert answers["no_cell.png"].flag.startswith(FLAG_NONE)
    assert answers["two_fields.png"].prediction in predictor.classes


def test_wbc_train_crop_cell_stores_the_policy_and_predicts_through_it(small_tree: Path, tmp_path: Path) -> None:
    """`wbc train --crop cell` on real PBC images: the model file records the cell view, and `wbc predict` on a field
    with several white cells says so; an unknown policy is one clear error line."""
    run = CliRunner().invoke(
        app,
        ["train", "--data", str(small_tree), "--out", str(tmp_path / "run"), "--arch", "cnn", "--epochs", "1"]
        + ["--img-size", "64", "--batch-size", "16", "--crop", "cell"],
    )
    assert run.exit_code == 0, run.output
    model = tmp_path / "run" / "model.safetensors"
    crop = load_model(model)[1]["crop"]
    assert {k: crop[k] for k in ("kind", "window_um")} == {"kind": "cell", "window_um": config.CROP_WINDOW_UM}
    # the training lab's magnification, measured on its red cells and recorded: PBC reads ~10.9 px/µm
    assert 9.5 < crop["home_px_per_um"] < 12.5 and "px_per_um" not in crop
    fields = sorted((SHARED / "bccd-fields" / "JPEGImages").glob("*.jpg"))[:2]
    two = Image.new("RGB", (1280, 480))
    for i, field in enumerate(fields):
        two.paste(Image.open(field).convert("RGB"), (640 * i, 0))
    two.save(tmp_path / "two.png")
    predicted = CliRunner().invoke(app, ["predict", str(tmp_path / "two.png"), "--model", str(model)])
    assert predicted.exit_code == 0 and FLAG_SEVERAL in predicted.output, predicted.output
    bad = CliRunner().invoke(
        app, ["train", "--data", str(small_tree), "--out", str(tmp_path / "x"), "--crop", "nucleus"]
    )
    assert bad.exit_code != 0 and "unknown crop policy 'nucleus'" in str(bad.exception)  # main() prints it as error:
