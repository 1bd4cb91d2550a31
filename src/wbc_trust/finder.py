"""The cell finder: any microscope image (a 120 px crop or a 2,000 px smear field) → its white cells.

Why this method (measured on ``txl-fields``, docs/counting.md): white-cell nuclei are the darkest, most
violet objects of a Romanowsky-stained smear, so a few thresholds of a violet index propose nucleus regions cheaply
(they reach nearly every annotated white cell on all four labs), and a small learned verifier (gradient-boosted trees on
~35 region features) tells white-cell nuclei from platelets, stain debris and the darker red cells of some labs, and
regresses the cell's box around its nucleus (the cytoplasm is often too pale to segment). The trees ship as a small
``.npz`` (``assets/finder.npz``), fitted by ``python bench/finder.py --fit`` on the train split of ``txl-fields``.

One image's way through: ``_work_image`` (downscale to ``config.FINDER_WORK_PX``) → ``_proposals`` (violet index,
three thresholds, connected regions, their features) → ``TreeEnsemble`` scores and box offsets → non-maximum
suppression → ``Cell`` boxes in pixels of the original image. Images longer than ``config.FINDER_TILE_PX`` are searched
in overlapping tiles. Red cells are the ruler: ``FinderResult.px_per_um`` is their diameter (``_ruler``) / 7.5 µm.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_multiotsu, threshold_otsu
from skimage.measure import find_contours, label, regionprops
from torchvision.ops import box_iou, nms

from wbc_trust import config
from wbc_trust.errors import WbcError

log = logging.getLogger(__name__)

#: The region features the verifier reads, in order (documentation of ``assets/finder.npz``; checked on load).
FEATURE_NAMES: tuple[str, ...] = (
    "level",
    "threshold_above_median",
    "area_share",
    "size_share",
    "width_share",
    "height_share",
    "aspect",
    "extent",
    "solidity",
    "eccentricity",
    "index_above_threshold",
    "index_above_median",
    "index_max_above_median",
    "red",
    "green",
    "blue",
    "red_vs_image",
    "green_vs_image",
    "blue_vs_image",
    "touches_border",
    "area_vs_largest",
    "distance_from_centre",
    "n_proposals",
    "size_vs_red_cell",
    "red_cell_share",
    "otsu_gap",
    "ray_left",
    "ray_right",
    "ray_up",
    "ray_down",
    "ray_left_room",
    "ray_right_room",
    "ray_up_room",
    "ray_down_room",
)


@dataclass(frozen=True)
class Cell:
    """One white cell: its box ``(x0, y0, x1, y1)`` in pixels of the original image, the verifier's score (0–1, the
    probability that the region is a white cell's nucleus) and the nucleus outline (N×2 ``x, y`` points, original
    pixels)."""

    box: tuple[float, float, float, float]
    score: float
    nucleus: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 2)))

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class FinderResult:
    """What the finder saw in one image: the white cells (most confident first) and the scale, where red cells give
    one (``px_per_um`` None: no red cells to measure)."""

    cells: list[Cell]
    width: int
    height: int
    red_cell_diameter_px: float | None = None

    @property
    def px_per_um(self) -> float | None:
        if self.red_cell_diameter_px is None:
            return None
        return self.red_cell_diameter_px / config.RED_CELL_DIAMETER_UM


@dataclass
class _Proposal:
    """A candidate nucleus region in working-image pixels (its mask is kept for the outline of kept cells)."""

    bbox: tuple[int, int, int, int]  # y0, x0, y1, x1 (skimage order)
    mask: np.ndarray  # bool, the region inside bbox


# ---------------------------------------------------------------------------------------------------------------
# Proposals and features
# ---------------------------------------------------------------------------------------------------------------


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise WbcError(f"the finder takes a PIL image or an H×W×3 uint8 array, not {array.dtype} {array.shape}")
    return array[..., :3]


def _work_image(array: np.ndarray) -> tuple[np.ndarray, float]:
    """Downscale so that the long side is at most FINDER_WORK_PX: the cost per image is bounded and the thresholds and
    region sizes see a comparable number of pixels whatever the camera."""
    h, w = array.shape[:2]
    scale = min(1.0, config.FINDER_WORK_PX / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        array = np.asarray(Image.fromarray(array).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
    return array, scale


def _violet_index(rgb: np.ndarray) -> np.ndarray:
    """Blue minus red plus (1 − green), smoothed: high on Romanowsky-stained nuclei (violet, dark), lower on pink red
    cells and the pale background. Chosen over rgb2hed's haematoxylin channel because it is a third of the cost and
    its proposals reach as many annotated white cells on the four txl-fields labs. The smoothing merges the lobes of a
    segmented nucleus into one region."""
    index = rgb[..., 2] - rgb[..., 0] + (1.0 - rgb[..., 1])
    return ndi.gaussian_filter(index, config.FINDER_SMOOTH_SIGMA)


def _red_cell_radii(rgb: np.ndarray, nuclei: np.ndarray) -> np.ndarray | None:
    """Red-cell radii in working pixels: cells are the darker-than-background regions (holes filled, the pale centre
    of a red cell included) away from nuclei; the distance transform's local maxima are the cells' radii, which keeps
    touching cells apart. None when fewer than FINDER_MIN_RED_CELLS maxima are seen (a tight crop, a blank image)."""
    grey = rgb.mean(axis=2)
    if np.ptp(grey) < 1e-3:
        return None
    cells = ndi.binary_fill_holes(grey < threshold_otsu(grey[::2, ::2]))
    cells &= ~ndi.binary_dilation(nuclei, iterations=3)
    cells = ndi.binary_opening(cells, iterations=2)
    distance = ndi.distance_transform_edt(cells)
    peaks = peak_local_max(distance, min_distance=5, threshold_abs=3, exclude_border=True)
    if len(peaks) < config.FINDER_MIN_RED_CELLS:
        return None
    return distance[peaks[:, 0], peaks[:, 1]]


def _ruler(radii: np.ndarray | None) -> float | None:
    """Red-cell diameter (working pixels) for the scale: many maxima lie on ridges of irregular or touching cells and
    are smaller than the cell, so the high percentile, not the median, tracks the cell; divided by the ratio of that
    percentile to the annotated red-cell box size measured on txl-fields train (0.77–0.85 on the four labs)."""
    if radii is None:
        return None
    return float(2 * np.percentile(radii, config.FINDER_RED_CELL_PERCENTILE) / config.FINDER_RED_CELL_BOX_RATIO)


def _rays(background: np.ndarray, bbox: tuple[int, int, int, int]) -> list[float]:
    """How far the cell reaches beyond its nucleus box to the left, right, up and down before the background starts
    (median over a band of 5 rows/columns), relative to the nucleus box, and relative to the room left to the image
    edge: the cytoplasm the box regression needs, without segmenting it."""
    h, w = background.shape
    y0, x0, y1, x1 = bbox
    rows = np.linspace(y0 + (y1 - y0) * 0.25, y1 - 1 - (y1 - y0) * 0.25, 5).astype(int).clip(0, h - 1)
    cols = np.linspace(x0 + (x1 - x0) * 0.25, x1 - 1 - (x1 - x0) * 0.25, 5).astype(int).clip(0, w - 1)

    def reach(lines: Sequence[np.ndarray]) -> float:
        firsts = [np.flatnonzero(line)[0] if line.any() else len(line) for line in lines]
        return float(np.median(firsts))

    left = reach([background[r, :x0][::-1] for r in rows])
    right = reach([background[r, x1:] for r in rows])
    up = reach([background[:y0, c][::-1] for c in cols])
    down = reach([background[y1:, c] for c in cols])
    bw, bh = max(x1 - x0, 1), max(y1 - y0, 1)
    rooms = (x0, w - x1, y0, h - y1)
    return [
        left / bw,
        right / bw,
        up / bh,
        down / bh,
        *(reach_ / room if room else 1.0 for reach_, room in zip((left, right, up, down), rooms)),
    ]


def _proposals(array: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[_Proposal], float, float | None]:
    """Candidate nuclei of one image: features (n×len(FEATURE_NAMES)), nucleus boxes in original pixels (n×4, x0 y0
    x1 y1), the regions, the working scale, and the red-cell diameter in original pixels (or None)."""
    work, scale = _work_image(array)
    rgb = work.astype(np.float32) / 255.0
    index = _violet_index(rgb)
    h, w = index.shape
    if h < 8 or w < 8 or np.ptp(index) < 1e-3:  # a blank or tiny image: nothing to threshold
        return np.zeros((0, len(FEATURE_NAMES)), np.float32), np.zeros((0, 4)), [], scale, None
    sample = index[::2, ::2]
    otsu = float(threshold_otsu(sample))
    low, high = (float(t) for t in threshold_multiotsu(sample, 3))
    levels = (otsu, high, high + 0.5 * (float(index.max()) - high))
    median = float(np.median(index))
    image_rgb = rgb.reshape(-1, 3).mean(axis=0)
    radii = _red_cell_radii(rgb, index > high)
    red_cell = None if radii is None else float(2 * np.median(radii))  # the verifier's size feature
    grey = rgb.mean(axis=2)
    background = ndi.binary_opening(grey > threshold_otsu(grey[::2, ::2]), iterations=1)

    regions: list[tuple[int, float, object]] = []
    for level, threshold in enumerate(levels):
        mask = ndi.binary_opening(index > threshold, iterations=1)
        for region in regionprops(label(mask), intensity_image=index):
            if region.area >= config.FINDER_MIN_AREA_SHARE * h * w:
                regions.append((level, threshold, region))
    largest = {level: max(r.area for lv, _, r in regions if lv == level) for level, _, _ in regions}

    rows, boxes, props = [], [], []
    for level, threshold, region in regions:
        y0, x0, y1, x1 = region.bbox
        colour = rgb[region.coords[:, 0], region.coords[:, 1]].mean(axis=0)
        size = float(np.sqrt(region.area))
        rows.append(
            [
                level,
                threshold - median,
                region.area / (h * w),
                size / max(h, w),
                (x1 - x0) / w,
                (y1 - y0) / h,
                (x1 - x0) / max(y1 - y0, 1),
                region.extent,
                region.solidity,
                region.eccentricity,
                region.intensity_mean - threshold,
                region.intensity_mean - median,
                region.intensity_max - median,
                *colour,
                *(colour - image_rgb),
                float(x0 == 0 or y0 == 0 or x1 == w or y1 == h),
                region.area / largest[level],
                float(np.hypot((region.centroid[1] - w / 2) / w, (region.centroid[0] - h / 2) / h)),
                len(regions),
                size / red_cell if red_cell else np.nan,
                red_cell / max(h, w) if red_cell else np.nan,
                high - low,
                *_rays(background, region.bbox),
            ]
        )
        boxes.append([x0 / scale, y0 / scale, x1 / scale, y1 / scale])
        props.append(_Proposal(region.bbox, region.image))
    features = np.asarray(rows, dtype=np.float32).reshape(-1, len(FEATURE_NAMES))
    ruler = _ruler(radii)
    return (
        features,
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        props,
        scale,
        None if ruler is None else ruler / scale,
    )


def _encode(nuclei: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Box-regression targets: the cell box relative to its nucleus box (centre shift in nucleus widths/heights, log
    size ratio), as in Faster R-CNN's box coder."""
    nw, nh = nuclei[:, 2] - nuclei[:, 0], nuclei[:, 3] - nuclei[:, 1]
    return np.stack(
        [
            ((cells[:, 0] + cells[:, 2]) - (nuclei[:, 0] + nuclei[:, 2])) / 2 / nw,
            ((cells[:, 1] + cells[:, 3]) - (nuclei[:, 1] + nuclei[:, 3])) / 2 / nh,
            np.log((cells[:, 2] - cells[:, 0]) / nw),
            np.log((cells[:, 3] - cells[:, 1]) / nh),
        ],
        axis=1,
    )


def _decode(nuclei: np.ndarray, offsets: np.ndarray, width: int, height: int) -> np.ndarray:
    nw, nh = nuclei[:, 2] - nuclei[:, 0], nuclei[:, 3] - nuclei[:, 1]
    cx = (nuclei[:, 0] + nuclei[:, 2]) / 2 + offsets[:, 0] * nw
    cy = (nuclei[:, 1] + nuclei[:, 3]) / 2 + offsets[:, 1] * nh
    half_w, half_h = nw * np.exp(offsets[:, 2]) / 2, nh * np.exp(offsets[:, 3]) / 2
    return np.stack(
        [
            np.clip(cx - half_w, 0, width),
            np.clip(cy - half_h, 0, height),
            np.clip(cx + half_w, 0, width),
            np.clip(cy + half_h, 0, height),
        ],
        axis=1,
    )


# ---------------------------------------------------------------------------------------------------------------
# The shipped verifier
# ---------------------------------------------------------------------------------------------------------------


class TreeEnsemble:
    """Gradient-boosted trees (scikit-learn's HistGradientBoosting*) as plain arrays.

    Hand-written inference (a vectorised walk down every tree at once) so that the shipped weights are a small ``.npz``
    that any scikit-learn version reads, instead of a pickle tied to the version that fitted it; ``from_sklearn``
    checks the walk against scikit-learn's own prediction when it converts a model.
    """

    def __init__(
        self,
        feature: np.ndarray,
        threshold: np.ndarray,
        missing_left: np.ndarray,
        left: np.ndarray,
        right: np.ndarray,
        value: np.ndarray,
        leaf: np.ndarray,
        baseline: float,
    ) -> None:
        self.feature, self.threshold, self.missing_left = feature, threshold, missing_left
        self.left, self.right, self.value, self.leaf, self.baseline = left, right, value, leaf, baseline

    @classmethod
    def from_sklearn(cls, model, check: np.ndarray | None = None) -> TreeEnsemble:
        """Convert a fitted HistGradientBoostingClassifier (binary) or Regressor; raw scores (log-odds for a
        classifier) are what ``raw`` returns. ``check``: features on which the conversion must agree."""
        trees = [predictors[0].nodes for predictors in model._predictors]
        n_nodes = max(len(t) for t in trees)

        def stack(name: str, dtype, fill) -> np.ndarray:
            out = np.full((len(trees), n_nodes), fill, dtype=dtype)
            for i, nodes in enumerate(trees):
                out[i, : len(nodes)] = nodes[name]
            return out

        ensemble = cls(
            stack("feature_idx", np.int16, 0),
            stack("num_threshold", np.float64, 0.0),
            stack("missing_go_to_left", bool, False),
            stack("left", np.int16, 0),
            stack("right", np.int16, 0),
            stack("value", np.float64, 0.0),
            stack("is_leaf", bool, True),
            float(np.ravel(model._baseline_prediction)[0]),
        )
        if check is not None:
            expected = model._raw_predict(check).ravel()
            if not np.allclose(ensemble.raw(check), expected, atol=1e-6):
                raise RuntimeError("tree conversion disagrees with scikit-learn's prediction")
        return ensemble

    def raw(self, x: np.ndarray) -> np.ndarray:
        """Sum of the trees' leaf values + baseline for each row of x."""
        if len(x) == 0:
            return np.zeros(0)
        trees = np.arange(len(self.feature))[:, None]
        node = np.zeros((len(self.feature), len(x)), dtype=np.int64)
        rows = np.arange(len(x))[None, :]
        for _ in range(self.feature.shape[1]):  # depth ≤ number of nodes; stops as soon as all are at leaves
            at_leaf = self.leaf[trees, node]
            if at_leaf.all():
                break
            values = x[rows, self.feature[trees, node]]
            go_left = np.where(np.isnan(values), self.missing_left[trees, node], values <= self.threshold[trees, node])
            node = np.where(at_leaf, node, np.where(go_left, self.left[trees, node], self.right[trees, node]))
        return self.value[trees, node].sum(axis=0) + self.baseline

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        names = ("feature", "threshold", "missing_left", "left", "right", "value", "leaf")
        out = {f"{prefix}.{n}": getattr(self, n) for n in names}
        out[f"{prefix}.baseline"] = np.array([self.baseline])
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> TreeEnsemble:
        names = ("feature", "threshold", "missing_left", "left", "right", "value", "leaf")
        return cls(*(arrays[f"{prefix}.{n}"] for n in names), float(arrays[f"{prefix}.baseline"][0]))


_OFFSETS = ("dx", "dy", "log_w", "log_h")


class CellFinder:
    """The verifier and box regressors, loaded once; ``find`` many images."""

    def __init__(self, path: Path | None = None, min_score: float = config.FINDER_MIN_SCORE) -> None:
        path = Path(path or config.FINDER_MODEL_PATH)
        try:
            with np.load(path, allow_pickle=False) as arrays:
                names = tuple(str(n) for n in arrays["feature_names"])
                if names != FEATURE_NAMES:
                    raise WbcError(f"{path} was fitted on other features: refit it with python bench/finder.py --fit")
                self.verifier = TreeEnsemble.from_arrays(arrays, "verifier")
                self.regressors = [TreeEnsemble.from_arrays(arrays, f"box.{o}") for o in _OFFSETS]
        except (OSError, KeyError, ValueError) as exc:
            raise WbcError(
                f"cannot read the cell finder's weights {path} ({exc}): refit them with "
                "python bench/finder.py --fit, or reinstall wbc-trust"
            ) from exc
        self.min_score = min_score
        # The results of the last images found, by pixel content. A folder's images are each found twice: once
        # when its magnification is measured (crop.image_reading on up to 2 x config.SCALE_SAMPLE of them), once
        # when each is cut at it; the finder is most of the time of both (200 PBC crops: 23 of 28 s). Results are
        # frozen, so one object can be handed out twice; a lock, since the app's threads share one finder. Written
        # out rather than functools.lru_cache, whose keys would have to carry the pixels and so keep 600 images
        # alive: this keeps only their 16-byte digests.
        self._recent: OrderedDict[tuple, FinderResult] = OrderedDict()
        self._recent_lock = threading.Lock()

    def find(self, image: Image.Image | np.ndarray) -> FinderResult:
        """White cells of one image (any size; long images are searched in overlapping tiles), most confident first.
        The same pixels found again within the last ``config.FINDER_RECENT_IMAGES`` images give the same result
        object without a second search (whole scans searched in tiles are not kept: their results are large)."""
        array = np.ascontiguousarray(_as_array(image))
        tile_px = _tile_size(array)
        if tile_px is not None:
            return self._find_tiled(array, tile_px)
        key = (array.shape, str(array.dtype), hashlib.blake2b(array, digest_size=16).digest())
        with self._recent_lock:
            if key in self._recent:
                self._recent.move_to_end(key)
                return self._recent[key]
        cells, red_cell = self._find_one(array)
        result = FinderResult(cells, array.shape[1], array.shape[0], red_cell)
        with self._recent_lock:
            self._recent[key] = result
            while len(self._recent) > config.FINDER_RECENT_IMAGES:
                self._recent.popitem(last=False)
        return result

    def _find_tiled(self, array: np.ndarray, tile_px: int) -> FinderResult:
        height, width = array.shape[:2]
        found, diameters = [], []
        for x0, y0, tile in _tiles(array, tile_px):
            cells, red_cell = self._find_one(tile)
            diameters += [red_cell] if red_cell else []
            th, tw = tile.shape[:2]
            for cell in cells:
                b = cell.box
                # a cell cut by an inner tile edge is found whole in the overlapping tile: keep that one only
                if (
                    (b[0] <= 2 and x0 > 0)
                    or (b[1] <= 2 and y0 > 0)
                    or (b[2] >= tw - 2 and x0 + tw < width)
                    or (b[3] >= th - 2 and y0 + th < height)
                ):
                    continue
                found.append(
                    Cell((b[0] + x0, b[1] + y0, b[2] + x0, b[3] + y0), cell.score, cell.nucleus + np.array([x0, y0]))
                )
        return FinderResult(_suppress(found), width, height, float(np.median(diameters)) if diameters else None)

    def _find_one(self, array: np.ndarray) -> tuple[list[Cell], float | None]:
        features, nuclei, props, scale, red_cell = _proposals(array)
        if len(features) == 0:
            return [], red_cell
        scores = 1.0 / (1.0 + np.exp(-self.verifier.raw(features)))
        keep = scores >= self.min_score
        offsets = np.stack([r.raw(features[keep]) for r in self.regressors], axis=1)
        boxes = _decode(nuclei[keep], offsets, array.shape[1], array.shape[0])
        kept = [p for p, k in zip(props, keep) if k]
        cells = [
            Cell(tuple(float(v) for v in box), float(s), _outline(p, scale))
            for box, s, p in zip(boxes, scores[keep], kept)
        ]
        return _suppress(cells), red_cell


def _outline(proposal: _Proposal, scale: float) -> np.ndarray:
    """The nucleus region's outline (x, y) in original pixels."""
    contours = find_contours(np.pad(proposal.mask, 1).astype(np.float32), 0.5)
    if not contours:
        return np.zeros((0, 2))
    yx = max(contours, key=len) - 1 + np.array(proposal.bbox[:2])
    return yx[:, ::-1] / scale


def _suppress(cells: list[Cell]) -> list[Cell]:
    """Non-maximum suppression with box voting: the proposals of several thresholds (and of overlapping tiles) find the
    same cell; the most confident one stays, with the score-weighted mean box of the boxes that overlap it by
    ``config.FINDER_VOTE_IOU`` (Gidaris & Komodakis 2015). Each threshold's nucleus region regresses its own cell box,
    and their mean lands closer to the annotated box than the most confident one alone (txl-fields val: PBC recall
    0.989 → 1.000, bccd-fields' unseen photos 0.943 → 0.959, the other labs unchanged; ``bench/finder.py``). Written
    here because torchvision's ``nms`` returns indices only, and box voting is a few lines over its ``box_iou``."""
    if not cells:
        return []
    boxes = torch.tensor([c.box for c in cells], dtype=torch.float64)
    scores = torch.tensor([c.score for c in cells], dtype=torch.float64)
    keep = nms(boxes.float(), scores.float(), config.FINDER_NMS_IOU)
    votes = (box_iou(boxes[keep], boxes) >= config.FINDER_VOTE_IOU) * scores[None, :]
    # a weighted mean lies within its boxes, but its rounding can put it a millionth of a pixel past the image edge
    voted = ((votes @ boxes) / votes.sum(dim=1, keepdim=True)).clamp(min=boxes.min(0).values, max=boxes.max(0).values)
    # two lobes of one nucleus can each keep a box that voting then moves onto the same cell: suppress once more
    again = nms(voted.float(), scores[keep].float(), config.FINDER_NMS_IOU).tolist()
    return [Cell(tuple(float(v) for v in voted[j]), cells[keep[j]].score, cells[keep[j]].nucleus) for j in again]


def _tile_size(array: np.ndarray) -> int | None:
    """The tile side for a big image, or None to search it whole. The verifier was fitted on fields a few red cells
    across (txl-fields), so a tile spans FINDER_TILE_RED_CELLS red-cell diameters, measured on the whole image at the
    working scale (FINDER_TILE_PX where no red cells are seen): the same cells at twice the magnification are searched
    whole, a field of many cells at the same magnification in tiles."""
    if max(array.shape[:2]) <= config.FINDER_TILE_PX:
        return None
    work, scale = _work_image(array)
    rgb = work.astype(np.float32) / 255.0
    index = _violet_index(rgb)
    radii = None if np.ptp(index) < 1e-3 else _red_cell_radii(rgb, index > threshold_multiotsu(index[::2, ::2], 3)[1])
    ruler = _ruler(radii)
    size = (
        config.FINDER_TILE_PX
        if ruler is None
        else max(config.FINDER_TILE_PX, round(config.FINDER_TILE_RED_CELLS * ruler / scale))
    )
    return None if max(array.shape[:2]) <= 1.25 * size else size


def _tiles(array: np.ndarray, size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Overlapping square tiles: each cell smaller than the overlap lies whole in some tile."""
    height, width = array.shape[:2]
    step = int(size * (1 - config.FINDER_TILE_OVERLAP))

    def starts(length: int) -> list[int]:
        return sorted({*range(0, max(length - size, 0) + 1, step), max(length - size, 0)})

    for y0 in starts(height):
        for x0 in starts(width):
            yield x0, y0, array[y0 : y0 + size, x0 : x0 + size]


# ---------------------------------------------------------------------------------------------------------------
# Annotations, matching, fitting (bench/finder.py and the tests)
# ---------------------------------------------------------------------------------------------------------------


def read_yolo(path: Path, width: int, height: int) -> tuple[dict[int, np.ndarray], list[str]]:
    """A YOLO label file → boxes per class in pixels (x0 y0 x1 y1), and the lines that are not YOLO lines (a class
    written as a word, missing numbers: real defects of txl-fields), which are skipped and returned for reporting."""
    boxes: dict[int, list[list[float]]] = {}
    junk = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            cls, (x, y, w, h) = int(parts[0]), (float(v) for v in parts[1:5])
            if len(parts) != 5:
                raise ValueError(line)
        except ValueError:
            junk.append(line)
            continue
        boxes.setdefault(cls, []).append(
            [(x - w / 2) * width, (y - h / 2) * height, (x + w / 2) * width, (y + h / 2) * height]
        )
    if junk:
        log.warning("%s: %d line(s) that are not YOLO boxes skipped, e.g. %r", path, len(junk), junk[0])
    return {c: np.asarray(b, dtype=np.float64) for c, b in boxes.items()}, junk


def read_voc(path: Path, name: str = "WBC") -> np.ndarray:
    """The boxes of one class in a Pascal VOC annotation (BCCD's fields), x0 y0 x1 y1 in pixels."""
    boxes = []
    for obj in ET.parse(path).getroot().iter("object"):
        if (obj.findtext("name") or "").strip() == name:
            bb = obj.find("bndbox")
            boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def match(boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray, iou: float = config.FINDER_MATCH_IOU) -> int:
    """True positives: found boxes, most confident first, each matched to the best unmatched true box with IoU ≥ iou
    (the PASCAL VOC rule)."""
    if len(boxes) == 0 or len(truth) == 0:
        return 0
    overlap = box_iou(torch.as_tensor(boxes, dtype=torch.float64), torch.as_tensor(truth, dtype=torch.float64)).numpy()
    free = np.ones(len(truth), dtype=bool)
    hits = 0
    for i in np.argsort(-np.asarray(scores)):
        candidates = np.where(free, overlap[i], -1.0)
        j = int(candidates.argmax())
        if candidates[j] >= iou:
            free[j] = False
            hits += 1
    return hits


def training_targets(nuclei: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which proposals are white-cell nuclei, and the box offsets to their cell: a proposal is positive when its centre
    lies in a true white-cell box, ≥ 70 % of it lies inside that box and it covers ≥ 8 % of the box (a nucleus, or a
    lobe of one, not a stray dark pixel at a cell's rim)."""
    positive = np.zeros(len(nuclei), dtype=bool)
    offsets = np.zeros((len(nuclei), 4))
    if len(nuclei) == 0 or len(truth) == 0:
        return positive, offsets
    area = (nuclei[:, 2] - nuclei[:, 0]) * (nuclei[:, 3] - nuclei[:, 1])
    truth_area = (truth[:, 2] - truth[:, 0]) * (truth[:, 3] - truth[:, 1])
    ix = np.clip(
        np.minimum(nuclei[:, None, 2], truth[None, :, 2]) - np.maximum(nuclei[:, None, 0], truth[None, :, 0]), 0, None
    )
    iy = np.clip(
        np.minimum(nuclei[:, None, 3], truth[None, :, 3]) - np.maximum(nuclei[:, None, 1], truth[None, :, 1]), 0, None
    )
    inside = ix * iy / area[:, None]
    cover = area[:, None] / truth_area[None, :]
    cx, cy = (nuclei[:, 0] + nuclei[:, 2]) / 2, (nuclei[:, 1] + nuclei[:, 3]) / 2
    centred = (
        (cx[:, None] >= truth[None, :, 0])
        & (cx[:, None] <= truth[None, :, 2])
        & (cy[:, None] >= truth[None, :, 1])
        & (cy[:, None] <= truth[None, :, 3])
    )
    ok = centred & (inside >= 0.7) & (cover >= 0.08)
    positive = ok.any(axis=1)
    best = np.where(ok, cover, -1.0).argmax(axis=1)
    offsets = _encode(nuclei, truth[best])
    return positive, offsets


def proposal_table(array: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and box offsets of one annotated image's proposals (the verifier's training rows)."""
    features, nuclei, _, _, _ = _proposals(_as_array(array))
    positive, offsets = training_targets(nuclei, truth)
    return features, positive, offsets


def fit(features: np.ndarray, positive: np.ndarray, offsets: np.ndarray, out: Path, seed: int = 0) -> Path:
    """Fit the verifier and the four box regressors, convert them to arrays and write ``out`` (.npz, atomically)."""
    from sklearn.ensemble import (
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
    )

    from wbc_trust.io import atomic_write

    params = {
        "max_iter": config.FINDER_TREES,
        "learning_rate": 0.1,
        "max_leaf_nodes": config.FINDER_LEAVES,
        "random_state": seed,
    }
    verifier = HistGradientBoostingClassifier(**params).fit(features, positive)
    arrays = {"feature_names": np.array(FEATURE_NAMES)}
    arrays.update(TreeEnsemble.from_sklearn(verifier, features[:500]).arrays("verifier"))
    box_params = {**params, "max_iter": config.FINDER_BOX_TREES, "max_leaf_nodes": config.FINDER_BOX_LEAVES}
    for k, name in enumerate(_OFFSETS):
        regressor = HistGradientBoostingRegressor(**box_params).fit(features[positive], offsets[positive, k])
        arrays.update(TreeEnsemble.from_sklearn(regressor, features[positive][:500]).arrays(f"box.{name}"))
    atomic_write(Path(out), lambda f: np.savez_compressed(f, **arrays))
    return Path(out)
