"""A person's review of real BCCD smear fields (the app's field mode, without the browser): corrections change the
differential exactly as recounting them by hand does, the downloaded zip is a labelled folder that
``data.find_dataset`` reads with the right counts, and `wbc adapt` trains a model on it."""

from __future__ import annotations

import csv
import io
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import SHARED, require_shared
from PIL import Image
from statsmodels.stats.proportion import proportion_confint
from typer.testing import CliRunner

from wbc_trust.cli import app
from wbc_trust.corrections import FLAGGED, NOT_WBC, NOT_WBC_FOLDER, ZIP_ROOT, CountedField, Review, count_field
from wbc_trust.data import find_dataset
from wbc_trust.errors import WbcError
from wbc_trust.finder import CellFinder
from wbc_trust.modelfile import read_metadata
from wbc_trust.predict import Predictor

require_shared()
FIELDS = SHARED / "bccd-fields"
#: Each field's white-cell class as BCCD's annotators gave it (labels.csv); fields without one left out.
TRUTH = {
    Path(r["image"]).name: r["wbc_class"]
    for r in csv.DictReader(open(FIELDS / "labels.csv", newline=""))
    if r["wbc_class"]
}
#: Real fields (labels.csv: neutrophil ×2, eosinophil ×2, lymphocyte, monocyte; the monocyte field holds a second,
#: edge-cut cell): after the review, classes of 2 cells (which `wbc adapt` fits) and of 1 (kept from the base model).
NAMES = [f"BloodImage_{i:05d}.jpg" for i in (0, 1, 9, 17, 20, 40)]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor()


@pytest.fixture(scope="module")
def fields(predictor: Predictor) -> list[CountedField]:
    finder = CellFinder()
    counted = [count_field(name, (FIELDS / "JPEGImages" / name).read_bytes(), finder, predictor) for name in NAMES]
    assert all(f.count.rows for f in counted), [f.name for f in counted if not f.count.rows]
    return counted


def reviewed(fields: list[CountedField], classes: list[str]) -> tuple[Review, dict[tuple[str, int], str | None]]:
    """A person's review: each field's first cell set to the field's annotated class, every further cell of a field
    marked not a white cell; and, recomputed here apart from ``Review``, what each cell then is."""
    review = Review(fields, classes)
    expected: dict[tuple[str, int], str | None] = {}
    for f in fields:
        for row in f.count.rows:
            label = TRUTH[f.name] if row["cell"] == 1 else NOT_WBC
            review.correct(f.key, row["cell"], label)
            expected[(f.name, row["cell"])] = label
    return review, expected


def test_corrections_change_the_differential(fields: list[CountedField], predictor: Predictor) -> None:
    classes = list(predictor.classes)
    before = Review(fields, classes)
    rows = [r for f in fields for r in f.count.rows]
    model_counted = Counter(r["prediction"] for r in rows if not r["flag"])
    assert {r["class"]: r["count"] for r in before.differential()} == {
        **{c: model_counted.get(c, 0) for c in classes},
        "flagged (not counted)": sum(bool(r["flag"]) for r in rows),
    }
    galleries = before.galleries()
    assert {g: len(m) for g, m in galleries.items()} == {
        **{c: model_counted.get(c, 0) for c in classes},
        FLAGGED: sum(bool(r["flag"]) for r in rows),
    }
    review, expected = reviewed(fields, classes)
    assert {g: len(m) for g, m in review.galleries().items()} == {g: len(m) for g, m in galleries.items()}, (
        "a corrected cell left the gallery the person found it in"
    )
    assert Counter(expected.values())[NOT_WBC] >= 1, "no field has a second cell to mark"
    counts = Counter(v for v in expected.values() if v in classes)
    n = sum(counts.values())
    assert n == len(NAMES) and review.n_not_wbc() == Counter(expected.values())[NOT_WBC]
    table = {r["class"]: r for r in review.differential()}
    for c in classes:
        low, high = proportion_confint(counts[c], n, alpha=0.05, method="wilson")
        assert table[c]["count"] == counts[c]
        assert table[c]["percent"] == pytest.approx(100 * counts[c] / n)
        assert (table[c]["ci_low"], table[c]["ci_high"]) == pytest.approx((100 * low, 100 * high))
    assert table["flagged (not counted)"]["count"] == 0  # every cell was classified by the person
    # the picture shows the person's classes, no longer flagged
    drawn = review.drawn_rows(fields[0])
    assert drawn[0]["prediction"] == TRUTH[fields[0].name] and drawn[0]["flag"] == ""
    assert review.picture(fields[0], Image.open(FIELDS / "JPEGImages" / fields[0].name).convert("RGB")).size == (
        640,
        480,
    )
    # taking a correction back gives the model's answer again (or counts the cell apart when flagged)
    first = fields[0].count.rows[0]
    review.correct(fields[0].key, 1, None)
    after = {r["class"]: r["count"] for r in review.differential()}
    if first["flag"]:
        assert after["flagged (not counted)"] == 1
    else:
        assert after[first["prediction"]] == counts[first["prediction"]] + (first["prediction"] != TRUTH[NAMES[0]])
    with pytest.raises(WbcError, match="not a class"):
        review.correct(fields[0].key, 1, "platelet")


def test_the_zip_is_a_labelled_folder_that_trains(
    fields: list[CountedField], predictor: Predictor, tmp_path: Path
) -> None:
    classes = list(predictor.classes)
    review, expected = reviewed(fields, classes)
    with zipfile.ZipFile(io.BytesIO(review.zip_bytes())) as archive:
        archive.extractall(tmp_path)
    root = tmp_path / ZIP_ROOT
    index = find_dataset(root, require_all_classes=False)
    found = Counter(classes[r.label] for r in index.splits["all"])
    assert found == Counter(v for v in expected.values() if v in classes)
    assert index.ignored_classes == {NOT_WBC_FOLDER: Counter(expected.values())[NOT_WBC]}
    for record in index.splits["all"]:
        with Image.open(record.path) as crop:
            assert crop.size == (predictor.img_size, predictor.img_size)
    with open(root / "cells.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(expected)
    model_rows = {(r["image"], r["cell"]): r for f in fields for r in f.count.rows}
    for row in table:
        key = (row["image"], int(row["cell"]))
        assert row["prediction"] == model_rows[key]["prediction"]  # the original class
        assert row["corrected"] == expected[key] and row["changed_by_person"] == "yes"
        folder = NOT_WBC_FOLDER if expected[key] == NOT_WBC else expected[key]
        assert row["file"] == f"{folder}/{Path(row['image']).stem}_{row['cell']}.png"
        assert (root / row["file"]).is_file()
    # the head alone (--fine-tune-steps 0): what is tested here is that the folder is one wbc adapt reads
    result = CliRunner().invoke(
        app, ["adapt", "--data", str(root), "--out", str(tmp_path / "run"), "--fine-tune-steps", "0"]
    )
    assert result.exit_code == 0, result.output
    adapted = read_metadata(tmp_path / "run" / "model.safetensors")["adapted"]
    assert adapted["cells_per_class"] == {c: found[c] for c in classes}
    assert adapted["classes_kept_from_base"] == sorted(c for c in classes if found[c] < 2)


def test_an_unreadable_upload_is_a_field_without_cells(predictor: Predictor) -> None:
    field = count_field("notes.jpg", b"lab notes, not a picture", CellFinder(), predictor)
    assert field.flag.startswith("unreadable: not an image") and not field.count.rows
    review = Review([field], list(predictor.classes))
    assert review.differential()[-1]["count"] == 0 and review.rows() == []
    with zipfile.ZipFile(io.BytesIO(review.zip_bytes())) as archive:
        assert archive.namelist() == [f"{ZIP_ROOT}/cells.csv"]
