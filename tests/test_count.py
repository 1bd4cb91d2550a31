"""`wbc count` on real smear fields and real crops: the files and their columns, the differential adds up, and every
bad input (unreadable file, no white cell, a 10,000×10,000 scan, an image full of white cells) gets a row and a
reason."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, require_shared
from PIL import Image

from wbc_trust import config
from wbc_trust.cli import app
from wbc_trust.crop import CropPolicy
from wbc_trust.finder import Cell, FinderResult

require_shared()  # real fields and crops from ../shared/datasets
FIELDS = sorted((SHARED / "bccd-fields" / "JPEGImages").glob("*.jpg"))[:3]
SAMPLE = (
    sorted((config.SAMPLE_DATA_DIR / "lymphocyte").glob("*.jpg"))[:2]
    + sorted((config.SAMPLE_DATA_DIR / "neutrophil").glob("*.jpg"))[:2]
)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def counted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real `wbc count` run over fields, PBC crops and every kind of bad input."""
    from typer.testing import CliRunner

    src = tmp_path_factory.mktemp("smears")
    for p in FIELDS + SAMPLE:
        shutil.copy(p, src / p.name)
    (src / "notes.jpg").write_text("not an image")
    Image.new("RGB", (640, 480), (236, 226, 232)).save(src / "blank.png")
    Image.new("L", (10_000, 10_000), 230).save(src / "scan.png")  # 100 megapixels: over the pixel limit
    crops = [Image.open(p).convert("RGB").resize((240, 240)) for p in SAMPLE]  # a 2×2 mosaic of white cells only
    Image.fromarray(
        np.concatenate(
            [
                np.concatenate([np.asarray(c) for c in crops[:2]], 1),
                np.concatenate([np.asarray(c) for c in crops[2:]], 1),
            ],
            0,
        )
    ).save(src / "all_wbc.png")
    out = tmp_path_factory.mktemp("count_out")
    result = CliRunner().invoke(app, ["count", str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "white cells in 11 image(s)" in result.output
    return out


def test_files_and_columns(counted: Path) -> None:
    for name in ("cells.csv", "images.csv", "differential.csv", "differential.json", "report.html"):
        assert (counted / name).stat().st_size > 0
    with open(counted / "cells.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == [
        "image",
        "cell",
        "x0",
        "y0",
        "x1",
        "y1",
        "prediction",
        "confidence",
        *[f"p_{c}" for c in config.CLASSES],
        "flag",
        "prediction_set",
        "ood_score",
    ]
    assert rows(counted / "images.csv")[0].keys() == {"image", "n_cells", "flag"}
    assert list(rows(counted / "differential.csv")[0]) == ["class", "count", "percent", "ci_low", "ci_high"]
    report = (counted / "report.html").read_text()
    assert "data:image/jpeg;base64," in report and "<img src='file" not in report  # self-contained
    assert len(list((counted / "annotated").glob("*.jpg"))) == 9  # every readable image


def test_each_cell_row_is_a_box_in_its_image_with_probabilities(counted: Path) -> None:
    cells = rows(counted / "cells.csv")
    per_image = {r["image"]: int(r["n_cells"]) for r in rows(counted / "images.csv")}
    assert sum(per_image.values()) == len(cells)
    for r in cells:
        with Image.open(r["image"]) as image:
            w, h = image.size
        x0, y0, x1, y1 = (float(r[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert sum(float(r[f"p_{c}"]) for c in config.CLASSES) == pytest.approx(1, abs=1e-3)
        assert r["prediction"] in config.CLASSES
    numbers = {}
    for r in cells:
        numbers.setdefault(r["image"], []).append(int(r["cell"]))
    assert all(n == list(range(1, len(n) + 1)) for n in numbers.values())
    # every PBC crop (a centred white cell, the training lab) is found; most are counted (the rest flagged uncertain)
    found = {p.name: [r for r in cells if Path(r["image"]).name == p.name] for p in SAMPLE}
    assert all(found.values()), found
    assert sum(any(not r["flag"] for r in mine) for mine in found.values()) >= 3


def test_the_differential_adds_up(counted: Path) -> None:
    cells = rows(counted / "cells.csv")
    table = {r["class"]: r for r in rows(counted / "differential.csv")}
    kept = [r for r in cells if not r["flag"]]
    assert len(kept) >= 3
    for c in config.CLASSES:
        n = sum(r["prediction"] == c for r in kept)
        assert int(table[c]["count"]) == n
        assert float(table[c]["percent"]) == pytest.approx(100 * n / len(kept), abs=0.01)
        assert float(table[c]["ci_low"]) <= float(table[c]["percent"]) <= float(table[c]["ci_high"])
    assert int(table["flagged (not counted)"]["count"]) == len(cells) - len(kept)
    assert sum(float(table[c]["percent"]) for c in config.CLASSES) == pytest.approx(100, abs=0.05)
    summary = json.loads((counted / "differential.json").read_text())
    assert summary["counted"] == len(kept) and summary["flagged"] == len(cells) - len(kept)


def test_bad_input_gets_a_row_and_a_reason(counted: Path) -> None:
    images = {Path(r["image"]).name: r for r in rows(counted / "images.csv")}
    assert len(images) == 11
    assert images["notes.jpg"]["flag"].startswith("unreadable: not an image")
    assert images["scan.png"]["flag"].startswith("unreadable: image too large")
    assert images["blank.png"] == {**images["blank.png"], "n_cells": "0", "flag": "no white cell found"}
    assert int(images["all_wbc.png"]["n_cells"]) >= 3


def test_nothing_readable_is_an_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    (tmp_path / "a.jpg").write_text("no")
    result = CliRunner().invoke(app, ["count", str(tmp_path / "a.jpg"), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "none of the 1 files could be read" in str(result.exception)
    assert (tmp_path / "out" / "images.csv").exists()  # the reason is still written down


def test_a_cell_window_is_centred_and_filled_with_the_background() -> None:
    image = Image.open(FIELDS[0]).convert("RGB")
    cell = Cell((560, 380, 640, 480), 1.0)  # at the corner: the window leaves the image
    found = FinderResult([cell], 640, 480, red_cell_diameter_px=60.0)  # red cells 60 px across: 8 px per µm
    policy = CropPolicy("frame", 160)
    crop = policy.cell_view(image, found, cell)
    assert crop.size == (160, 160)
    corner = np.asarray(crop)[-10:, -10:].reshape(-1, 3)
    assert corner.mean() > 120  # filled with the smear's background colour, not black
    # the window is the frame's µm at the red cells' scale, whatever the box's size; the cell's centre is its centre
    side = policy.window_um * 60.0 / config.RED_CELL_DIAMETER_UM
    expected = image.crop((int(600 - side / 2), int(430 - side / 2), int(600 + side / 2), int(430 + side / 2)))
    top_left = np.asarray(expected.resize((160, 160)))[:40, :40].astype(float)
    assert np.abs(np.asarray(crop)[:40, :40].astype(float) - top_left).mean() < 12
    wider = Cell((540, 360, 640, 480), 1.0)  # a looser box around the same cell: the same scale
    assert policy.scale(image, found, wider) == policy.scale(image, found, cell)
