"""The cell finder on real annotated fields (txl-fields val of four labs, bccd-fields): boxes against annotations,
original-pixel coordinates at any size, tiling, the red-cell ruler, junk label lines, degenerate images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, require_shared
from PIL import Image

from wbc_trust.finder import CellFinder, TreeEnsemble, match, read_voc, read_yolo

require_shared()  # real fields and crops from ../shared/datasets
TXL = SHARED / "txl-fields"
FIELDS = SHARED / "bccd-fields"
LAB_SIZES = {(360, 363): "PBC", (575, 575): "Raabin", (416, 416): "BCD", (640, 480): "BCCD"}


def txl_val(per_lab: int = 2) -> list[tuple[Path, np.ndarray]]:
    chosen, counts = [], {}
    for path in sorted((TXL / "images" / "val").iterdir()):
        with Image.open(path) as image:
            size = image.size
        lab = LAB_SIZES.get(size)
        if lab is None or counts.get(lab, 0) >= per_lab:
            continue
        counts[lab] = counts.get(lab, 0) + 1
        boxes, _ = read_yolo(TXL / "labels" / "val" / f"{path.stem}.txt", *size)
        chosen.append((path, boxes.get(0, np.zeros((0, 4)))))
    assert set(counts) == set(LAB_SIZES.values())
    return chosen


@pytest.fixture(scope="module")
def finder() -> CellFinder:
    return CellFinder()


def boxes_of(result) -> tuple[np.ndarray, np.ndarray]:
    return np.array([c.box for c in result.cells]).reshape(-1, 4), np.array([c.score for c in result.cells])


def test_boxes_match_annotations_on_four_labs_and_bccd(finder: CellFinder) -> None:
    items = txl_val(per_lab=4) + [
        (p, read_voc(FIELDS / "Annotations" / f"{p.stem}.xml"))
        for p in sorted((FIELDS / "JPEGImages").glob("*.jpg"))[:6]
    ]
    hits = found = true = 0
    for path, truth in items:
        result = finder.find(Image.open(path))
        boxes, scores = boxes_of(result)
        assert all(0 <= s <= 1 for s in scores)
        assert (
            (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= result.width).all() and (boxes[:, 3] <= result.height).all()
        )
        hits += match(boxes, scores, truth)
        found += len(boxes)
        true += len(truth)
    assert true >= 22
    assert hits / true >= 0.85, f"recall {hits}/{true}"
    assert hits / found >= 0.8, f"precision {hits}/{found}"


def test_a_segmented_nucleus_is_one_cell(finder: CellFinder) -> None:
    """The lobes of this Raabin neutrophil's nucleus each propose a box; before the boxes were voted and suppressed
    again, the finder returned two cells for it (a differential would count it twice)."""
    path = TXL / "images" / "val" / "b8aa811e-6389-57cf-a9cc-905a01c64aae.jpg"
    truth = read_yolo(TXL / "labels" / "val" / f"{path.stem}.txt", 575, 575)[0][0]
    boxes, scores = boxes_of(finder.find(Image.open(path)))
    assert len(truth) == 1 and len(boxes) == 1, boxes
    assert match(boxes, scores, truth) == 1


def test_boxes_are_in_pixels_of_the_original_image_at_any_size(finder: CellFinder) -> None:
    path = min((FIELDS / "JPEGImages").glob("*.jpg"))
    image = Image.open(path).convert("RGB")
    truth = read_voc(FIELDS / "Annotations" / f"{path.stem}.xml")
    for factor in (0.5, 2.0):  # 320×240 and 1280×960: same cells, boxes scaled with the image
        resized = image.resize((round(image.width * factor), round(image.height * factor)))
        boxes, scores = boxes_of(finder.find(np.asarray(resized)))
        assert match(boxes / factor, scores, truth) == len(truth)


def test_a_big_field_is_tiled_and_every_part_is_searched(finder: CellFinder) -> None:
    paths = sorted((FIELDS / "JPEGImages").glob("*.jpg"))[:9]
    fields = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    mosaic = np.concatenate([np.concatenate(fields[i : i + 3], 1) for i in (0, 3, 6)], 0)  # 1920×1440: 20 tiles
    truth = np.concatenate(
        [
            read_voc(FIELDS / "Annotations" / f"{p.stem}.xml") + [640 * (k % 3), 480 * (k // 3)] * 2
            for k, p in enumerate(paths)
        ]
    )
    boxes, scores = boxes_of(finder.find(mosaic))
    assert match(boxes, scores, truth) >= len(truth) - 2
    assert len(boxes) <= len(truth) + 2  # a cell seen by several tiles is one cell


def test_red_cells_give_the_scale(finder: CellFinder) -> None:
    path = min((FIELDS / "JPEGImages").glob("*.jpg"))
    rbc = read_voc(FIELDS / "Annotations" / f"{path.stem}.xml", "RBC")
    inner = rbc[(rbc[:, 0] > 1) & (rbc[:, 1] > 1) & (rbc[:, 2] < 639) & (rbc[:, 3] < 479)]
    annotated = float(np.median((inner[:, 2] - inner[:, 0] + inner[:, 3] - inner[:, 1]) / 2))
    result = finder.find(Image.open(path))
    assert result.red_cell_diameter_px == pytest.approx(annotated, rel=0.3)
    assert result.px_per_um == pytest.approx(result.red_cell_diameter_px / 7.5)


def test_no_white_cell_in_blank_tiny_or_grey_images(finder: CellFinder) -> None:
    assert finder.find(Image.new("RGB", (640, 480), (235, 225, 230))).cells == []
    assert finder.find(np.zeros((5, 5, 3), np.uint8)).cells == []
    grey = np.asarray(Image.open(min((FIELDS / "JPEGImages").glob("*.jpg"))).convert("L"))
    finder.find(grey)  # a 2-D array is read as grey RGB, without error


def test_junk_label_lines_are_skipped_and_reported(tmp_path: Path) -> None:
    label = tmp_path / "x.txt"
    label.write_text("0 0.5 0.5 0.2 0.4\nWBC 0.5 0.5 0.1 0.1\n1 0.1 0.1\n\n1 0.2 0.2 0.1 0.1\n")
    boxes, junk = read_yolo(label, 100, 200)
    assert junk == ["WBC 0.5 0.5 0.1 0.1", "1 0.1 0.1"]
    np.testing.assert_allclose(boxes[0], [[40, 60, 60, 140]])
    assert len(boxes[1]) == 1


def test_shipped_trees_walk_like_scikit_learn() -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    x[rng.random(x.shape) < 0.05] = np.nan  # missing values take the learned side
    y = x[:, 0] + np.nan_to_num(x[:, 1]) ** 2 > 0.5
    model = HistGradientBoostingClassifier(max_iter=20, max_leaf_nodes=7, random_state=0).fit(x, y)
    trees = TreeEnsemble.from_sklearn(model)
    np.testing.assert_allclose(1 / (1 + np.exp(-trees.raw(x))), model.predict_proba(x)[:, 1], atol=1e-9)


def test_the_same_pixels_are_searched_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder's images are found twice (its scale measured, then each cut): the second time is the first result,
    by pixel content, not by file or object; other pixels are searched anew, and a result cannot be changed."""
    finder = CellFinder()  # a fresh one: nothing remembered yet
    searched: list[tuple[int, ...]] = []
    find_one = finder._find_one
    monkeypatch.setattr(finder, "_find_one", lambda array: searched.append(array.shape) or find_one(array))
    path = sorted((FIELDS / "JPEGImages").glob("*.jpg"))[0]
    first = finder.find(Image.open(path).convert("RGB"))
    again = finder.find(Image.open(path).convert("RGB"))  # decoded again: another object, the same pixels
    assert again is first and len(searched) == 1 and first.cells
    mirrored = finder.find(Image.open(path).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert len(searched) == 2 and len(mirrored.cells) == len(first.cells)
    with pytest.raises(AttributeError):
        first.red_cell_diameter_px = 1.0  # type: ignore[misc]
