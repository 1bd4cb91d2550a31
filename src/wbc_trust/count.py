"""``wbc count``: every white cell of every image found, classified, counted into a differential with its uncertainty.

What a hematology lab gets from a CellaVision DM96 or a Scopio X100, from plain image files: the finder
(``finder.CellFinder``) gives each white cell's box, each cell is cut as the model's crop policy says
(``crop.CropPolicy.cell_view``: a window of fixed µm at the field's red-cell scale, or for models of whole PBC frames
the share of the frame a PBC cell covers), and the model (``predict.Predictor``) classifies the crops with their
calibrated confidence, prediction set, OOD score and flag.

Output folder:
- ``cells.csv``: one row per white cell (``image, cell, x0, y0, x1, y1, prediction, confidence, p_<class>…, flag,
  prediction_set, ood_score``; boxes in pixels of the original image, ``cell`` from 1 within its image);
- ``images.csv``: one row per input file (``image, n_cells, flag``: unreadable, no white cell, too many cells);
- ``differential.csv`` / ``.json``: counts, percentages and 95 % Wilson intervals over the cells that are counted;
  flagged cells (uncertain, out-of-distribution, cut by the image edge) are counted apart;
- ``annotated/`` (each image with its boxes coloured by class, flagged ones dashed and marked "?"), ``gallery/<class>/``
  and ``gallery/flagged/`` (the crops the model saw), and one self-contained ``report.html``.

Images are streamed: one image (and its crops) in memory at a time; the CSV rows go to disk as they are made.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from statsmodels.stats.proportion import proportion_confint
from tqdm import tqdm

from wbc_trust import config
from wbc_trust.data import UnreadableImage, find_unlabelled, image_to_tensor, read_image
from wbc_trust.errors import WbcError
from wbc_trust.finder import Cell, CellFinder
from wbc_trust.io import atomic_write_text, write_json

log = logging.getLogger(__name__)

#: Box colours per class (annotated pictures, report); flagged cells are drawn dashed in their class colour.
CLASS_COLOURS: dict[str, str] = {
    "basophil": "#6a3d9a",
    "eosinophil": "#e31a1c",
    "lymphocyte": "#1f78b4",
    "monocyte": "#33a02c",
    "neutrophil": "#ff7f00",
}
FLAG_EDGE = "cut by the image edge"


@dataclass
class CountSummary:
    """What a run counted (the CLI prints it); the files are in ``out``."""

    out: Path
    n_images: int
    n_unreadable: int
    n_cells: int
    n_flagged: int
    differential: list[dict]
    seconds: float


def differential(classes: Sequence[str], predictions: Sequence[str], n_flagged: int) -> list[dict]:
    """Counts, percentages and 95 % Wilson score intervals (the binomial intervals of the Rümke table) over the counted
    cells, then one row for the flagged cells, counted apart (their percentage is of all cells found)."""
    counts = Counter(predictions)
    n = len(predictions)
    rows = []
    for c in classes:
        k = counts.get(c, 0)
        low, high = proportion_confint(k, n, alpha=0.05, method="wilson") if n else (float("nan"), float("nan"))
        rows.append(
            {
                "class": c,
                "count": k,
                "percent": 100 * k / n if n else float("nan"),
                "ci_low": 100 * low,
                "ci_high": 100 * high,
            }
        )
    total = n + n_flagged
    rows.append(
        {
            "class": "flagged (not counted)",
            "count": n_flagged,
            "percent": 100 * n_flagged / total if total else float("nan"),
            "ci_low": None,
            "ci_high": None,
        }
    )
    return rows


class _CsvStream:
    """A CSV written row by row to a temporary file and renamed into place when complete (atomic, O(1) memory)."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        fd, self.tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        self.file = os.fdopen(fd, "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=list(columns))
        self.writer.writeheader()

    def write(self, row: dict) -> None:
        self.writer.writerow(row)

    def close(self, keep: bool = True) -> None:
        self.file.close()
        if keep:
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.path)
        else:
            Path(self.tmp).unlink(missing_ok=True)


def draw_cells(image: Image.Image, cells: Sequence[Cell], rows: Sequence[dict]) -> Image.Image:
    """The image (at most COUNT_ANNOTATED_PX wide) with one box per cell, coloured by class, flagged ones dashed."""
    scale = min(1.0, config.COUNT_ANNOTATED_PX / max(image.size))
    picture = (
        image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        if scale < 1
        else image.copy()
    )
    draw = ImageDraw.Draw(picture)
    width = max(2, round(max(picture.size) / 250))
    for cell, row in zip(cells, rows):
        x0, y0, x1, y1 = (v * scale for v in cell.box)
        colour = CLASS_COLOURS.get(row["prediction"], "#000000")
        if row["flag"]:
            for a, b in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
                n = max(2, int(np.hypot(b[0] - a[0], b[1] - a[1]) // 12))
                xs, ys = np.linspace(a[0], b[0], n), np.linspace(a[1], b[1], n)
                for i in range(0, n - 1, 2):
                    draw.line([(xs[i], ys[i]), (xs[i + 1], ys[i + 1])], fill=colour, width=width)
        else:
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = f"{row['cell']} {row['prediction'][:4]}{' ?' if row['flag'] else ''}"
        draw.text((x0 + width + 1, y0 + width), text, fill=colour)
    return picture


def cell_columns(classes: Sequence[str]) -> list[str]:
    """The columns of ``cells.csv``: the image, the cell's number and box, then ``wbc predict``'s columns."""
    return [
        "image",
        "cell",
        "x0",
        "y0",
        "x1",
        "y1",
        "prediction",
        "confidence",
        *[f"p_{c}" for c in classes],
        "flag",
        "prediction_set",
        "ood_score",
    ]


@dataclass
class ImageCount:
    """One image's white cells (reading order), their ``cells.csv`` rows, the crops the model saw, and the image's
    flag (no white cell, too many cells; empty when fine)."""

    cells: list[Cell]
    rows: list[dict]
    crops: list[Image.Image]
    flag: str


def count_image(image: Image.Image, name: str, finder: CellFinder, predictor) -> ImageCount:
    """Find and classify the white cells of one image (``wbc count``'s step per file, also the app's): each row is a
    ``cells.csv`` row with ``image = name``; a cell cut by the image edge is flagged (``FLAG_EDGE``)."""
    found = finder.find(image)
    cells = found.cells
    flag = ""
    if not cells:
        flag = "no white cell found"
    elif len(cells) > config.COUNT_MAX_CELLS:
        flag = (
            f"{len(cells)} white cells found: only the {config.COUNT_MAX_CELLS} most confident are "
            "classified (is this a white-cell concentrate or a very large scan? tile it)"
        )
        cells = cells[: config.COUNT_MAX_CELLS]
    cells = sorted(cells, key=lambda c: (c.box[1], c.box[0]))  # reading order: top to bottom, left to right
    crops = [predictor.crop.cell_view(image, found, cell) for cell in cells]
    names = [f"{name}#{number}" for number in range(1, len(cells) + 1)]
    answers = predictor.predict_views(names, torch.stack([image_to_tensor(c) for c in crops])) if cells else []
    classes = list(predictor.classes)
    rows = []
    for number, (cell, answer) in enumerate(zip(cells, answers), 1):
        edge = _touches_edge(cell.box, image.size)
        row = {
            "image": name,
            "cell": number,
            **{k: f"{v:.1f}" for k, v in zip(("x0", "y0", "x1", "y1"), cell.box)},
            **{k: v for k, v in answer.as_row(classes).items() if k != "path"},
        }
        row["flag"] = "; ".join(f for f in (answer.flag, FLAG_EDGE if edge else "") if f)
        rows.append(row)
    return ImageCount(cells, rows, crops, flag)


@dataclass
class CountedImage:
    """One input file's part of a count's output folder: its ``cells.csv`` rows, its ``images.csv`` cell count and
    flag, and its annotated picture and gallery crops already encoded as JPEG bytes (``picture`` None: unreadable).

    Encoded where the image was counted, so that it is small plain data (a few hundred kB for a field): a Ray actor
    sends it to the driver as it is, and the driver writes files without ever holding or re-reading an image."""

    rows: list[dict]
    n_cells: int
    flag: str
    picture: bytes | None
    thumbs: list[bytes]


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def count_file(path: Path, finder: CellFinder, predictor) -> CountedImage:
    """Read, count and encode one file (``wbc count``'s step, in this process or in a Ray actor); an unreadable file
    gives no rows and ``unreadable: <reason>`` as its flag."""
    try:
        image = read_image(path)
    except UnreadableImage as exc:
        return CountedImage([], 0, f"unreadable: {exc}", None, [])
    found = count_image(image, str(path), finder, predictor)
    picture = _jpeg(draw_cells(image, found.cells, found.rows), quality=88)
    thumbs = [_jpeg(crop.resize((config.COUNT_THUMB_PX,) * 2), quality=90) for crop in found.crops]
    return CountedImage(found.rows, len(found.cells), found.flag, picture, thumbs)


class CountWriter:
    """Writes a count's output folder from one ``CountedImage`` per input file, added in input order: the CSV rows,
    gallery crops and annotated picture as each file comes (only file paths are kept, for the report), then ``finish``
    writes the differential and report.html. The local loop and the Ray driver both feed it, so their folders are the
    same; use it as a context manager, so that a run that fails leaves no half-written CSV."""

    def __init__(self, out: Path, classes: Sequence[str], files: Sequence[Path]) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.classes = list(classes)
        self.files = list(files)
        self.names = _unique_names(self.files)
        self.cells_csv = _CsvStream(self.out / "cells.csv", cell_columns(self.classes))
        self.images_csv = _CsvStream(self.out / "images.csv", ["image", "n_cells", "flag"])
        self.open = True
        self.added = 0
        self.counted: list[str] = []
        self.n_flagged = self.n_unreadable = 0
        self.pictures: list[tuple[str, Path]] = []
        self.gallery: dict[str, list[Path]] = {}

    def __enter__(self) -> CountWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None and self.open:
            self.cells_csv.close(keep=False)
            self.images_csv.close(keep=False)
            self.open = False

    def add(self, counted: CountedImage) -> None:
        """The next input file's part."""
        path, name = self.files[self.added], self.names[self.added]
        self.added += 1
        if counted.picture is None:
            self.images_csv.write({"image": str(path), "n_cells": 0, "flag": counted.flag})
            self.n_unreadable += 1
            return
        for row, thumb_bytes in zip(counted.rows, counted.thumbs):
            self.cells_csv.write(row)
            group = "flagged" if row["flag"] else row["prediction"]
            if row["flag"]:
                self.n_flagged += 1
            else:
                self.counted.append(row["prediction"])
            thumb = self.out / "gallery" / group / f"{name}_{row['cell']}.jpg"
            thumb.parent.mkdir(parents=True, exist_ok=True)
            thumb.write_bytes(thumb_bytes)
            self.gallery.setdefault(group, []).append(thumb)
        self.images_csv.write({"image": str(path), "n_cells": counted.n_cells, "flag": counted.flag})
        picture = self.out / "annotated" / f"{name}.jpg"
        picture.parent.mkdir(parents=True, exist_ok=True)
        picture.write_bytes(counted.picture)
        self.pictures.append((str(path), picture))

    def finish(self, start: float) -> CountSummary:
        """Close the CSVs, write the differential and report.html; the summary (``start``: the run's
        ``time.perf_counter()`` when it began). Raises WbcError when no file could be read (the files still written)."""
        self.cells_csv.close()
        self.images_csv.close()
        self.open = False
        counted, n_flagged, n_files = self.counted, self.n_flagged, len(self.files)
        table = differential(self.classes, counted, n_flagged)
        _write_differential(self.out, table, len(counted), n_flagged)
        _write_report(
            self.out,
            table,
            len(counted),
            n_flagged,
            n_files,
            self.n_unreadable,
            self.pictures,
            self.gallery,
            self.classes,
        )
        summary = CountSummary(
            self.out,
            n_files,
            self.n_unreadable,
            len(counted) + n_flagged,
            n_flagged,
            table,
            time.perf_counter() - start,
        )
        if self.n_unreadable == n_files:
            raise WbcError(f"none of the {n_files} files could be read as images (see {self.out / 'images.csv'})")
        return summary


def run_count(
    paths: Sequence[str | Path],
    out: Path,
    model_path: Path | None = None,
    progress: bool = True,
    finder: CellFinder | None = None,
    predictor=None,
) -> CountSummary:
    """Find, classify and count the white cells of every image in ``paths`` (files or folders) into ``out``."""
    from wbc_trust.predict import Predictor  # the model loads only when a count runs

    start = time.perf_counter()
    files = find_unlabelled(paths)
    finder = finder or CellFinder()
    predictor = predictor or Predictor(model_path)
    with CountWriter(out, predictor.classes, files) as writer:
        for path in tqdm(files, desc="counting", unit="image", disable=not progress):
            writer.add(count_file(path, finder, predictor))
        return writer.finish(start)


def _touches_edge(box: Sequence[float], size: tuple[int, int]) -> bool:
    """A cell cut by the image edge is only partly seen: it is flagged, not counted (as CellaVision does)."""
    margin = config.COUNT_EDGE_MARGIN_PX
    return box[0] <= margin or box[1] <= margin or box[2] >= size[0] - margin or box[3] >= size[1] - margin


def _unique_names(files: Sequence[Path]) -> list[str]:
    """File stems made unique (two folders may both hold ``field_1.jpg``) and safe for file names."""
    seen: Counter = Counter()
    names = []
    for path in files:
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in path.stem)[:80] or "image"
        seen[stem] += 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def _missing(value: float | None) -> bool:
    """No number: a class interval of an empty count (NaN) or the flagged row's interval (None)."""
    return value is None or math.isnan(value)


def _write_differential(out: Path, table: list[dict], n_counted: int, n_flagged: int) -> None:
    def fmt(value: float | None) -> str:
        return "" if _missing(value) else f"{value:.2f}"

    lines = ["class,count,percent,ci_low,ci_high"]
    lines += [f"{r['class']},{r['count']},{fmt(r['percent'])},{fmt(r['ci_low'])},{fmt(r['ci_high'])}" for r in table]
    atomic_write_text(out / "differential.csv", "\n".join(lines) + "\n")
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in table]
    write_json(
        out / "differential.json",
        {
            "counted": n_counted,
            "flagged": n_flagged,
            "interval": "95 % Wilson score interval (statsmodels proportion_confint), percent",
            "note": "percentages are over the counted cells; flagged cells (uncertain, out-of-distribution, cut by the "
            "image edge) are counted apart, as a share of all cells found",
            "classes": clean,
        },
    )


def _data_uri(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _write_report(
    out: Path,
    table: list[dict],
    n_counted: int,
    n_flagged: int,
    n_images: int,
    n_unreadable: int,
    pictures: list[tuple[str, Path]],
    gallery: dict[str, list[Path]],
    classes: Sequence[str],
) -> None:
    """One self-contained HTML page (images inlined): the differential, the annotated images and the galleries.
    At most COUNT_REPORT_IMAGES pictures and COUNT_REPORT_GALLERY crops per class are inlined, so that the page of a
    1,000-field run stays openable; the folders hold all of them."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>wbc count</title><style>",
        (
            "body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse} td,th{border:1px solid #ccc;"
            f"padding:3px 8px;text-align:right}} img{{margin:2px}} .g img{{width:{config.COUNT_THUMB_PX}px}}"
            "</style></head><body>"
        ),
        (
            f"<h1>White-cell differential</h1><p>{n_images} image(s), {n_unreadable} unreadable; "
            f"{n_counted + n_flagged} white cells found, {n_counted} counted, {n_flagged} flagged and counted apart "
            "(uncertain, out-of-distribution or cut by the image edge). Intervals: 95 % Wilson score.</p>"
        ),
        "<table><tr><th>class</th><th>count</th><th>%</th><th>95 % interval</th></tr>",
    ]
    for r in table:
        interval = "" if _missing(r["ci_low"]) else f"{r['ci_low']:.1f}–{r['ci_high']:.1f}"
        percent = "" if _missing(r["percent"]) else f"{r['percent']:.1f}"
        parts.append(
            f"<tr><td style='text-align:left'>{esc(r['class'])}</td><td>{r['count']}</td><td>{percent}</td>"
            f"<td>{interval}</td></tr>"
        )
    parts.append(
        "</table><p>Box colours: "
        + ", ".join(f"<span style='color:{CLASS_COLOURS.get(c, '#000')}'>■ {esc(c)}</span>" for c in classes)
        + "; dashed boxes marked ? are flagged.</p>"
    )
    for group in [*classes, "flagged"]:
        thumbs = gallery.get(group, [])
        shown = thumbs[: config.COUNT_REPORT_GALLERY]
        more = f" (first {len(shown)} shown; all in gallery/{group}/)" if len(thumbs) > len(shown) else ""
        parts.append(f"<h2>{esc(group)}: {len(thumbs)}{more}</h2><div class='g'>")
        parts += [f"<img src='{_data_uri(p)}' title='{esc(p.stem)}'>" for p in shown]
        parts.append("</div>")
    shown_pictures = pictures[: config.COUNT_REPORT_IMAGES]
    parts.append(f"<h2>Images ({len(shown_pictures)} of {len(pictures)} shown; all in annotated/)</h2>")
    parts += [
        f"<figure><img src='{_data_uri(p)}' style='max-width:100%'><figcaption>{esc(src)}</figcaption></figure>"
        for src, p in shown_pictures
    ]
    parts.append("</body></html>")
    atomic_write_text(out / "report.html", "\n".join(parts))
