"""One view for the model: every image the classifier reads (train, evaluate, predict, calibrate, adapt, the trust
methods, the app, ONNX through the same Predictor) is cut here, by the crop policy stored in its model file.

``CropPolicy("cell")``: the cell finder (``finder.CellFinder``) finds the white cells, the most central one is taken,
and a square window of ``window_um`` µm centred on it is cut and resized to the model's input size. Scale is set by
magnification, never by the cell's own size where anything else tells it, because size is information (a lymphocyte is
small, a monocyte large): the red cells are the ruler (about 7.5 µm across in every smear, ``FinderResult.px_per_um``)
when the image shows enough of them and is not a tight crop; a crop without a ruler is taken to be framed like the
training crops (its short side ``window_um`` µm); a tight crop (the cell fills the frame, as in BCCD's crops) gives
only the cell, which is then taken to be ``config.CROP_CELL_UM`` across (the median white cell of PBC). Where the
window leaves the image it is filled with the image's median colour (the smear's background). Where the lab's
magnification is known (``px_per_um``: measured on a folder, ``lab_scale``, as the median ruler of its images or, for
tight crops, from their frames; or given to ``wbc adapt``), every image is cut at it instead: one microscope has one
scale, and the median of many readings scatters far less than one image's. ``wbc train`` measures its own lab's
magnification the same way and cuts every training image at it (``home_px_per_um``, recorded so that ``wbc adapt``
cuts the training lab's replay images as they were trained); other images are read at their own scale. The
constants are checked by ``tests/test_crop.py``.

``CropPolicy("frame")``: the whole image resized, what model files from before the finder do (they have no ``crop``
entry in their metadata and keep predicting exactly as before).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image

from wbc_trust import config
from wbc_trust.errors import WbcError
from wbc_trust.finder import Cell, CellFinder, FinderResult

FLAG_SEVERAL = "several white cells: use wbc count"
FLAG_NONE = "no white cell found"
KINDS = ("frame", "cell")


@lru_cache(maxsize=1)
def shared_finder() -> CellFinder:
    """The shipped finder, loaded once per process (its trees are read-only, so threads may share it)."""
    return CellFinder()


@lru_cache(maxsize=1)
def _finder_version() -> str:
    """The shipped finder's weights, by content: a refit changes the boxes, so the cached views must change too."""
    return hashlib.sha256(config.FINDER_MODEL_PATH.read_bytes()).hexdigest()[:12]


def ruler_key() -> str:
    """What one image's reading (``image_reading``) depends on besides its pixels: the finder's weights and the
    constants of ``ruler_fits``, ``_tight`` and ``central_cell`` (``data.measure_scale`` keys its cached readings by
    it)."""
    constants = (
        config.CROP_RULER_CELLS,
        config.RED_CELL_DIAMETER_UM,
        config.CROP_TIGHT_SHARE,
        config.CROP_MERGE_OVERLAP,
    )
    return f"{_finder_version()}|{constants}"


@dataclass(frozen=True)
class CropResult:
    """One image's view: the model's input (``size``×``size`` RGB), the flag for the answer (several white cells, none
    found; empty when one), the cell used (None for a frame view or when none was found), the scale in pixels per µm
    and where it came from (``lab``, ``red cells``, ``crop``, ``cell``; empty for a frame view)."""

    image: Image.Image
    flag: str = ""
    cell: Cell | None = None
    px_per_um: float | None = None
    scale_from: str = ""


@dataclass(frozen=True)
class CropPolicy:
    """How an image becomes the model's input (see the module docstring); stored as ``meta["crop"]``."""

    kind: str
    size: int
    window_um: float = config.CROP_WINDOW_UM
    #: the lab's magnification, where known (``with_lab_scale``): every image is cut at it
    px_per_um: float | None = None
    #: the training lab's magnification (``wbc train`` measures it): its training images were cut at it
    home_px_per_um: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise WbcError(f"unknown crop policy {self.kind!r}: choose one of {', '.join(KINDS)}")
        if not self.window_um > 0:
            raise WbcError(f"a crop window of {self.window_um} µm: it must be positive")
        for scale in (self.px_per_um, self.home_px_per_um):
            if scale is not None and not (self.kind == "cell" and scale > 0):
                raise WbcError(f"a lab scale ({scale} px/µm) needs a cell policy and a positive value")

    @classmethod
    def from_meta(cls, meta: dict) -> CropPolicy:
        """The policy a model file was trained with; files without one (before the finder) read whole frames."""
        crop = meta.get("crop") or {"kind": "frame"}
        scale, home = crop.get("px_per_um"), crop.get("home_px_per_um")
        return cls(
            crop["kind"],
            meta["img_size"],
            float(crop.get("window_um", config.CROP_WINDOW_UM)),
            None if scale is None else float(scale),
            None if home is None else float(home),
        )

    def to_meta(self) -> dict:
        stored = {"kind": self.kind, "window_um": self.window_um}
        for name in ("px_per_um", "home_px_per_um"):
            if getattr(self, name) is not None:
                stored[name] = getattr(self, name)
        return stored

    def with_lab_scale(self, px_per_um: float | None) -> CropPolicy:
        """This policy at a lab's magnification (None: each image's own scale again)."""
        return replace(self, px_per_um=px_per_um)

    @property
    def key(self) -> str:
        """What the decoded-image cache must tell apart (and the finder's weights, which change the crops)."""
        if self.kind == "frame":
            return f"frame|{self.size}"
        constants = (config.CROP_CELL_UM, config.CROP_TIGHT_SHARE, config.CROP_RULER_CELLS, config.CROP_MERGE_OVERLAP)
        return (
            f"cell|{self.size}|{self.window_um}|{self.px_per_um}|{self.home_px_per_um}|{constants}|"
            f"finder-{_finder_version()}"
        )

    def scale(self, image: Image.Image, result: FinderResult, cell: Cell) -> tuple[float, str]:
        """Pixels per µm of ``image`` around ``cell`` and what gave it (see the module docstring)."""
        if self.px_per_um is not None:
            return self.px_per_um, "lab"
        if ruler_fits(image, result, cell):
            return result.px_per_um, "red cells"
        if not _tight(image, cell):
            return min(image.size) / self.window_um, "crop"
        return _long_side(cell) / config.CROP_CELL_UM, "cell"

    def cut(self, image: Image.Image, cell: Cell, px_per_um: float) -> Image.Image:
        """The square window of ``window_um`` µm centred on ``cell``, resized to ``size``; the part outside the
        image filled with its median colour (PIL would fill it black, which no smear is)."""
        side = max(1, round(self.window_um * px_per_um))
        cx, cy = cell.centre
        left, top = round(cx - side / 2), round(cy - side / 2)
        window = image.crop((left, top, left + side, top + side))
        inside = (max(0, -left), max(0, -top), min(side, image.width - left), min(side, image.height - top))
        if inside != (0, 0, side, side):
            canvas = Image.new("RGB", (side, side), background_colour(image))
            canvas.paste(window.crop(inside), inside[:2])
            window = canvas
        return window.resize((self.size, self.size), Image.Resampling.LANCZOS, reducing_gap=3.0)

    def cell_view(self, image: Image.Image, result: FinderResult, cell: Cell) -> Image.Image:
        """The view of one found cell of a field (``wbc count``, the app): its physical window at the field's scale
        (``scale``), for both policies. A frame policy's model was trained on whole PBC crops, and a PBC crop is that
        window (``config.CROP_WINDOW_UM`` is PBC's frame in µm), so the cell is as large in the view as in training,
        whatever box the finder drew around it."""
        return self.cut(image, cell, self.scale(image, result, cell)[0])

    def apply(self, image: Image.Image, finder: CellFinder | None = None) -> CropResult:
        """One image → the model's input. Several white cells: the most central one, flagged ``FLAG_SEVERAL``;
        none: the whole frame, flagged ``FLAG_NONE`` (its answer is not about a found cell)."""
        frame = (self.size, self.size)
        if self.kind == "frame":
            return CropResult(image.resize(frame, Image.Resampling.BILINEAR, reducing_gap=None))
        result = (finder or shared_finder()).find(image)
        if not result.cells:
            return CropResult(image.resize(frame, Image.Resampling.BILINEAR, reducing_gap=None), FLAG_NONE)
        cell, others = central_cell(result.cells, image.size)
        px_per_um, source = self.scale(image, result, cell)
        return CropResult(self.cut(image, cell, px_per_um), FLAG_SEVERAL if others else "", cell, px_per_um, source)


def ruler_fits(image: Image.Image, result: FinderResult, cell: Cell) -> bool:
    """Whether the red-cell ruler holds for ``cell``: the image is not a tight crop and the cell is as many red cells
    across as white cells are (``config.CROP_RULER_CELLS``); in a close-up a few red cells cut by the edges read far
    too small."""
    if result.px_per_um is None or _tight(image, cell):
        return False
    low, high = config.CROP_RULER_CELLS
    return low <= _long_side(cell) / (result.px_per_um * config.RED_CELL_DIAMETER_UM) <= high


@dataclass(frozen=True)
class ScaleReading:
    """What one image tells of its lab's magnification: its red-cell ruler in px/µm (``ruler_fits`` for its most
    central white cell; any field without one), and for a tight crop the short side of its frame in pixels, which a
    lab's tool cut around the cell (``lab_scale`` reads a folder's frames as its white cells' size)."""

    ruler: float | None = None
    tight_frame: int | None = None


def image_reading(image: Image.Image, finder: CellFinder | None = None) -> ScaleReading:
    """One image's ``ScaleReading``; a tight crop has no ruler (its edges cut the few red cells it shows)."""
    result = (finder or shared_finder()).find(image)
    if not result.cells:
        return ScaleReading(result.px_per_um)
    cell = central_cell(result.cells, image.size)[0]
    if _tight(image, cell):
        return ScaleReading(tight_frame=min(image.size))
    return ScaleReading(result.px_per_um if ruler_fits(image, result, cell) else None)


def lab_scale(readings: list[ScaleReading]) -> tuple[float | None, str]:
    """A lab's magnification from its images' readings (``image_reading``), with a sentence saying how, or None and
    why not. First the red cells: the median ruler where at least ``config.LAB_SCALE_MIN_IMAGES`` and
    ``config.LAB_SCALE_MIN_SHARE`` of the images read one and they agree (``config.LAB_SCALE_MAX_SPREAD``). Else, in a
    folder of tight crops (as many of them as a ruler needs), the median frame over ``config.CROP_TIGHT_FRAME_UM``:
    each frame is about its cell, so over many cells of a normal mix the median frame is the lab's median white cell;
    one scale for the folder keeps a small lymphocyte smaller than a monocyte, which a scale per crop (each cell
    taken as ``config.CROP_CELL_UM``) erases."""
    needed = max(config.LAB_SCALE_MIN_IMAGES, math.ceil(config.LAB_SCALE_MIN_SHARE * len(readings)))
    scale, why = _ruler_scale([r.ruler for r in readings if r.ruler is not None], len(readings), needed)
    if scale is not None:
        return scale, why
    frames = [r.tight_frame for r in readings if r.tight_frame is not None]
    if len(frames) < needed:
        return None, f"{why}; {len(frames)} are tight crops, too few to measure their cells"
    return float(np.median(frames)) / config.CROP_TIGHT_FRAME_UM, (
        f"median frame of {len(frames)} of {len(readings)} images, tight crops taken as a white cell of "
        f"{config.CROP_TIGHT_FRAME_UM:g} µm, since {why}"
    )


def _ruler_scale(values: list[float], n: int, needed: int) -> tuple[float | None, str]:
    """``lab_scale``'s red-cell rule: the median of ``values`` (read from ``n`` images), or None and why not."""
    if len(values) < needed:
        return None, (
            f"{len(values)} of {n} images show enough red cells (at least {needed} needed; tight crops show none, or "
            "misread the few their edges cut)"
        )
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    if (q3 - q1) / median > config.LAB_SCALE_MAX_SPREAD:
        return None, (
            f"the red cells of {len(values)} images read {q1:.1f}-{q3:.1f} px/µm (quartiles), too far apart to be one "
            "magnification (small crops cut their red cells)"
        )
    return float(median), f"median red-cell ruler of {len(values)} of {n} images"


def _long_side(cell: Cell) -> float:
    return max(cell.box[2] - cell.box[0], cell.box[3] - cell.box[1])


def _tight(image: Image.Image, cell: Cell) -> bool:
    """A tight crop: the cell's long side is at least CROP_TIGHT_SHARE of the image's short side."""
    return _long_side(cell) >= config.CROP_TIGHT_SHARE * min(image.size)


def central_cell(cells: list[Cell], size: tuple[int, int]) -> tuple[Cell, int]:
    """The white cell a crop is about, and how many others the image shows. The finder's verifier was fitted on whole
    fields: in a close-up crop it may box the lobes of one neutrophil apart, so boxes that overlap (``_touch``) are
    one cell, boxed by their union; the cell is the group nearest the centre."""
    groups: list[list[Cell]] = []
    for cell in cells:
        touching = [g for g in groups if any(_touch(cell.box, other.box) for other in g)]
        merged = [cell] + [c for g in touching for c in g]
        groups = [g for g in groups if g not in touching] + [merged]
    boxes = [tuple(f(c.box[i] for c in g) for i, f in enumerate((min, min, max, max))) for g in groups]
    cx, cy = size[0] / 2, size[1] / 2
    best = min(
        range(len(groups)),
        key=lambda i: math.hypot((boxes[i][0] + boxes[i][2]) / 2 - cx, (boxes[i][1] + boxes[i][3]) / 2 - cy),
    )
    top = max(groups[best], key=lambda c: c.score)
    return Cell(boxes[best], top.score, top.nucleus), len(groups) - 1


def _touch(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Two boxes of one cell: they overlap by at least CROP_MERGE_OVERLAP of the smaller box (the lobes of one nucleus
    do; two white cells side by side mostly overlap less, see the constant)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return False
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return width * height >= config.CROP_MERGE_OVERLAP * smaller


def background_colour(image: Image.Image) -> tuple[int, int, int]:
    """The image's median colour: in a smear, the background between the cells."""
    pixels = np.asarray(image.resize((32, 32))).reshape(-1, 3)
    return tuple(int(v) for v in np.median(pixels, axis=0))
