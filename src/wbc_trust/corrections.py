"""A person's review of counted smear fields (the app's "Count smear fields" mode), without any Streamlit in it.

The app counts each uploaded field with ``count.count_image`` (the same step as ``wbc count``) into a
``CountedField``; a ``Review`` holds those fields and what the person changed: any cell reclassified, or marked
"not a white cell". From it come the differential after the corrections, the pictures' boxes after the corrections,
and the download: a zip whose folder ``wbc_corrections/`` holds one sub-folder per class of crops
(``<class>/<image>_<cell>.png``, the crops the model saw), which ``wbc adapt --data`` and ``wbc train --data`` read as
they are, and ``cells.csv`` with each cell's original and corrected class.

What counts, as on a CellaVision review: a person's class wins; a cell nobody changed keeps the model's answer,
unless the model flagged it (uncertain, out-of-distribution, another lab, cut by the edge), which stays counted apart
and out of the folder until a person classifies it; cells marked "not a white cell" are counted in neither and go to
``not_a_white_cell/``, a folder ``data.find_dataset`` reports as not a class and leaves out of training.
"""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath

from PIL import Image

from wbc_trust.count import ImageCount, _unique_names, count_image, differential, draw_cells
from wbc_trust.data import UnreadableImage, read_image
from wbc_trust.errors import WbcError
from wbc_trust.finder import CellFinder

#: The choice that says a found object is not a white cell (debris, a smudge, a red-cell clump).
NOT_WBC = "not a white cell"
#: Its folder in the zip: not a class name, so ``wbc train`` and ``wbc adapt`` leave it out (and say so).
NOT_WBC_FOLDER = "not_a_white_cell"
#: The gallery of the cells the model flagged (the CellaVision view keeps them apart).
FLAGGED = "flagged"
#: The folder inside the zip that ``--data`` names after unzipping.
ZIP_ROOT = "wbc_corrections"
#: The columns of the corrections CSV: the cell and what the model said (``cells.csv``'s), then what the person
#: made of it and the crop's path in the zip.
MODEL_COLUMNS: tuple[str, ...] = ("image", "cell", "x0", "y0", "x1", "y1", "prediction", "confidence", "flag")
CSV_COLUMNS: tuple[str, ...] = (*MODEL_COLUMNS, "corrected", "changed_by_person", "file")


@dataclass
class CountedField:
    """One uploaded field, counted: its name as uploaded, ``key`` (a hash of its bytes: names the field's cells
    across the app's re-runs), the count (boxes, ``cells.csv`` rows, crops, flag) and each crop as PNG bytes
    (encoded once, so that building the zip on every re-run only copies bytes)."""

    name: str
    key: str
    count: ImageCount
    pngs: list[bytes]

    @property
    def flag(self) -> str:
        """Why the field gives no or not all cells (unreadable, no white cell, too many); empty when fine."""
        return self.count.flag


def field_key(data: bytes) -> str:
    """The field's identity: the same file uploaded again is the same field (and the same cells)."""
    return hashlib.sha256(data).hexdigest()[:16]


def count_field(name: str, data: bytes, finder: CellFinder, predictor) -> CountedField:
    """Find and classify the white cells of one uploaded field; a file that is not an image gives a field without
    cells whose ``flag`` says why."""
    key = field_key(data)
    try:
        image = read_image(data)
    except UnreadableImage as exc:
        return CountedField(name, key, ImageCount([], [], [], f"unreadable: {exc}"), [])
    found = count_image(image, name, finder, predictor)
    return CountedField(name, key, found, [_png(crop) for crop in found.crops])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class ReviewedCell:
    """One cell as the review sees it: its field, its ``cells.csv`` row, its crop (PNG), its class after the review
    (``None``: flagged and not yet classified by a person), and whether a person set it."""

    field: CountedField
    row: dict
    png: bytes
    label: str | None
    changed: bool


@dataclass
class Review:
    """Counted fields and a person's corrections, keyed by (field key, cell number)."""

    fields: Sequence[CountedField]
    classes: Sequence[str]
    corrections: dict[tuple[str, int], str] = field(default_factory=dict)

    @property
    def choices(self) -> list[str]:
        """What a person can make of a cell: a class, or not a white cell."""
        return [*self.classes, NOT_WBC]

    def correct(self, key: str, cell: int, label: str | None) -> None:
        """Set a cell's class (or ``NOT_WBC``) by hand; ``None`` takes the correction back."""
        if label is None:
            self.corrections.pop((key, cell), None)
            return
        if label not in self.choices:
            raise WbcError(f"{label!r} is not a class of this model: choose one of {', '.join(self.choices)}")
        self.corrections[(key, cell)] = label

    def cells(self) -> Iterator[ReviewedCell]:
        """Every cell of every field, in upload and reading order."""
        for counted in self.fields:
            for row, png in zip(counted.count.rows, counted.pngs):
                fixed = self.corrections.get((counted.key, int(row["cell"])))
                if fixed is not None:
                    yield ReviewedCell(counted, row, png, fixed, True)
                else:
                    yield ReviewedCell(counted, row, png, None if row["flag"] else row["prediction"], False)

    def galleries(self) -> dict[str, list[ReviewedCell]]:
        """The cells as the model sorted them: one gallery per class, then the flagged ones (``FLAGGED``). Sorted by
        the model's answer, not the person's, so that a cell stays where the person found it while reclassifying."""
        galleries: dict[str, list[ReviewedCell]] = {group: [] for group in [*self.classes, FLAGGED]}
        for c in self.cells():
            galleries[FLAGGED if c.row["flag"] else c.row["prediction"]].append(c)
        return galleries

    def differential(self) -> list[dict]:
        """``count.differential`` over the cells after the review: classified cells counted, flagged ones nobody
        classified counted apart, "not a white cell" in neither."""
        labels = [c.label for c in self.cells()]
        return differential(self.classes, [x for x in labels if x in self.classes], labels.count(None))

    def n_not_wbc(self) -> int:
        """Cells a person marked as not white cells."""
        return sum(c.label == NOT_WBC for c in self.cells())

    def drawn_rows(self, counted: CountedField) -> list[dict]:
        """The rows ``count.draw_cells`` draws for a field after the review: a cell a person classified shows that
        class and is no longer marked flagged."""
        rows = []
        for c in self.cells():
            if c.field is counted:
                rows.append({**c.row, "prediction": c.label, "flag": ""} if c.changed else c.row)
        return rows

    def picture(self, counted: CountedField, image: Image.Image) -> Image.Image:
        """The field (``image``: its decoded upload) with its boxes after the review (``count.draw_cells``)."""
        return draw_cells(image, counted.count.cells, self.drawn_rows(counted))

    def _files(self) -> dict[int, str]:
        """Each cell's path in the zip (by its position in ``cells()``); cells without a class have none."""
        stems = dict(zip((f.key for f in self.fields), _unique_names([PurePath(f.name) for f in self.fields])))
        files = {}
        for i, c in enumerate(self.cells()):
            if c.label is not None:
                folder = NOT_WBC_FOLDER if c.label == NOT_WBC else c.label
                files[i] = f"{folder}/{stems[c.field.key]}_{c.row['cell']}.png"
        return files

    def rows(self) -> list[dict]:
        """The corrections CSV: one row per cell, the model's answer and the class after the review."""
        files = self._files()
        return [
            {
                **{k: c.row[k] for k in MODEL_COLUMNS},
                "corrected": c.label or "",
                "changed_by_person": "yes" if c.changed else "no",
                "file": files.get(i, ""),
            }
            for i, c in enumerate(self.cells())
        ]

    def csv_text(self) -> str:
        """``rows()`` as CSV text."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        return buffer.getvalue()

    def zip_bytes(self) -> bytes:
        """The labelled folder as a zip: ``wbc_corrections/<class>/<image>_<cell>.png`` for every cell with a class
        after the review, ``wbc_corrections/not_a_white_cell/`` for the rejected ones, and
        ``wbc_corrections/cells.csv``. PNGs are stored, not deflated (already compressed)."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            files = self._files()
            for i, c in enumerate(self.cells()):
                if i in files:
                    archive.writestr(f"{ZIP_ROOT}/{files[i]}", c.png)
            archive.writestr(f"{ZIP_ROOT}/cells.csv", self.csv_text(), compress_type=zipfile.ZIP_DEFLATED)
        return buffer.getvalue()
