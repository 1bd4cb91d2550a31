"""The data layer: find images in any supported layout, read them safely, split them, cache them, augment them.

One image's way in: ``find_dataset`` lists ``(path, class)`` records → ``read_image`` opens one file and checks it →
``load_images`` decodes and resizes every image once (cached on disk) → ``ImageTensorDataset`` serves them to training
with the seed's augmentation, or unchanged to evaluation and prediction.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from kornia.color import lab_to_rgb, rgb_to_lab
from PIL import Image, ImageFile, ImageFilter, ImageOps
from skimage.color import hed2rgb, rgb2hed
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from wbc_trust import config
from wbc_trust.crop import CropPolicy, CropResult, ScaleReading, background_colour, image_reading, lab_scale, ruler_key
from wbc_trust.errors import WbcError
from wbc_trust.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

Image.MAX_IMAGE_PIXELS = config.MAX_IMAGE_PIXELS  # Pillow's own guard; read_image checks the exact limit
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is reported, never half-read


class UnreadableImage(Exception):
    """A file that is not a usable image; ``str(exc)`` is the reason shown to the user."""


@dataclass(frozen=True)
class Record:
    """One image file and its class index (``None`` when the class is unknown, e.g. files to predict)."""

    path: Path
    label: int | None


@dataclass
class DatasetIndex:
    """What ``find_dataset`` found: the images per split and what it left out."""

    root: Path
    layout: str  # "class-folders" or "kaggle"
    splits: dict[str, list[Record]]  # "all", or "train" (to be split into train/val), "test", "test_b"
    ignored_classes: dict[str, int] = field(default_factory=dict)  # folder name → number of files left out

    def summary(self) -> dict:
        """A JSON-able description that is stored in model metadata and printed by the CLI."""
        return {
            "root": str(self.root),
            "layout": self.layout,
            "splits": {name: _class_counts(records) for name, records in self.splits.items()},
            "ignored_classes": self.ignored_classes,
        }


def _class_counts(records: Iterable[Record]) -> dict[str, int]:
    counts = Counter(config.CLASSES[r.label] for r in records if r.label is not None)
    return {c: counts.get(c, 0) for c in config.CLASSES}


# ---------------------------------------------------------------------------------------------------------------
# Reading one image
# ---------------------------------------------------------------------------------------------------------------


def is_image_name(path: Path) -> bool:
    """True when the file ending is one we read (case-insensitive)."""
    return path.suffix.lower() in config.IMAGE_EXTENSIONS


#: Pillow modes whose samples are 16-bit, and formats whose 32-bit "I" mode holds 16-bit samples.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_SIXTEEN_BIT_I_FORMATS = frozenset({"PNG", "PPM"})

#: What Pillow raises on malformed files: the exceptions its own fuzz tests accept (Tests/oss-fuzz/test_fuzzers.py),
#: plus the parser errors that ``Image.open`` turns into SyntaxError but ``load()`` lets through (atheris found a TIFF
#: whose float strip offset raises TypeError in load). Anything else is a bug, and the fuzz tests look for it.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    MemoryError,
    NotImplementedError,
    OverflowError,
    IndexError,
    KeyError,
    TypeError,
)


def _to_rgb(image: Image.Image, source_format: str | None) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, keeping brightness relative to the file's own range.

    Pillow's own conversion clips 16-bit pixels at 255 (a 16-bit photo turns white), so 16-bit samples are scaled by
    255/65535 here. Pillow gives 16-bit PNG/PGM/PPM samples as "I;16" or "I" (PGM/PPM already rescaled to 0..65535);
    other 32-bit integer and floating-point images carry no brightness range, so they are refused instead of guessed.
    Transparent pixels become white (the background of a smear).
    """
    if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and source_format in _SIXTEEN_BIT_I_FORMATS):
        array = np.asarray(image)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise UnreadableImage("pixel values outside the 16-bit range: save the image as 8- or 16-bit")
        rounded = (array.astype(np.uint32) * 255 + 32767) // 65535  # integer maths: 4 bytes a pixel, not 8
        image = Image.fromarray(rounded.astype(np.uint8))
    elif image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise UnreadableImage(f"{kind} pixels have no fixed brightness range: save the image as 8- or 16-bit")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    try:
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as exc:  # a mode Pillow cannot turn into RGB
        raise UnreadableImage(f"unsupported colour mode {image.mode} ({exc})") from exc


def _read_bytes(source: Path | bytes) -> bytes:
    """The file's bytes, refusing empty and over-sized files before anything is decoded."""
    if isinstance(source, bytes):
        data = source
    else:
        try:
            n_bytes = Path(source).stat().st_size
            if n_bytes > config.MAX_IMAGE_FILE_BYTES:
                raise UnreadableImage(
                    f"file too large ({n_bytes / 2**20:,.0f} MB; the limit is {config.MAX_IMAGE_FILE_BYTES / 2**20:,.0f} MB)"
                )
            data = Path(source).read_bytes()
        except OSError as exc:
            raise UnreadableImage(f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    return data


def _check_pixels(width: int, height: int) -> None:
    """The decompression-bomb and shape guards, checked from the header before any pixel is decoded.

    Pillow's own guard (``Image.MAX_IMAGE_PIXELS``) only raises above twice its limit and warns below; this is the exact
    limit, and needs no process-wide warning filter (which would not be thread-safe under ``load_images``' threads).
    """
    if width * height > config.MAX_IMAGE_PIXELS:
        raise UnreadableImage(
            f"image too large ({width}×{height} = {width * height:,} pixels, over the limit of "
            f"{config.MAX_IMAGE_PIXELS:,}): refused as a possible decompression bomb"
        )
    if min(width, height) < 1:
        raise UnreadableImage("image has no pixels")
    if max(width, height) > config.MAX_IMAGE_ASPECT_RATIO * min(width, height):
        raise UnreadableImage(
            f"image is a {width}×{height} strip (more than {config.MAX_IMAGE_ASPECT_RATIO:g} times longer than wide): "
            "not a cell image; crop it to the cell"
        )


def _check_coverage(image: Image.Image) -> None:
    """Refuse a TIFF whose strips or tiles cover only part of the declared image: Pillow would leave the rest black.

    JPEG and PNG data always spans the whole image (or is reported truncated); GIF frames may legitimately be smaller
    than the screen, so only TIFF is checked.
    """
    if image.format != "TIFF" or not image.tile:
        return
    covered = sum((t.extents[2] - t.extents[0]) * (t.extents[3] - t.extents[1]) for t in image.tile)
    if covered < image.width * image.height:
        raise UnreadableImage(f"damaged TIFF: its data covers {covered:,} of its {image.width * image.height:,} pixels")


def read_image(source: Path | bytes, size: int | None = None) -> Image.Image:
    """Open one image file (or its bytes), check it fully, and return it as RGB, optionally resized to size×size.

    Raises ``UnreadableImage`` with a human reason (not an image, truncated, too many pixels, ...).
    Multi-frame files give their first frame; EXIF rotation is applied.
    """
    data = _read_bytes(source)
    try:
        image = Image.open(io.BytesIO(data))
        image.seek(0)
        _check_pixels(*image.size)
        _check_coverage(image)
        source_format = image.format
        if size is not None and source_format == "JPEG":
            image.draft("RGB", (size, size))  # decode at reduced scale: same result every time, much faster
        image.load()
        image = _to_rgb(ImageOps.exif_transpose(image), source_format)
    except Image.DecompressionBombError as exc:  # Pillow's guard fires in Image.open, before ours can
        raise UnreadableImage(
            f"image too large (over {config.MAX_IMAGE_PIXELS:,} pixels): refused as a possible decompression bomb"
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise UnreadableImage("not an image file (unknown format)") from exc
    except _DECODE_ERRORS as exc:
        raise UnreadableImage(f"broken or truncated image ({exc})") from exc
    if size is not None:
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return image


def measure_scale(paths: Sequence[Path], desc: str) -> tuple[float | None, str]:
    """The magnification (px/µm) of the lab that made ``paths``, read from at most ``config.SCALE_SAMPLE`` of its
    images, spread over the list: their median red-cell ruler where they agree, else the median frame of its tight
    crops (``crop.lab_scale``), or None; with a sentence saying which. Unreadable files are skipped here (they are
    reported where the images are read for the model).

    The sample's readings are searched on threads, as ``load_images`` decodes, and kept on disk (``cache_dir``), keyed
    by the sampled files and the finder like the decoded views: the other processes of a torchrun job, and every later
    run on the same folder whose views are cached, read them instead of searching the sample again (about 16 s for
    300 PBC images on one core)."""
    sample = list(paths)[:: max(1, len(paths) // config.SCALE_SAMPLE)]
    key_file = cache_dir() / f"scale-{_scale_key(sample)}.json"
    try:
        readings = [ScaleReading(**r) for r in json.loads(key_file.read_text())["readings"]]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: measured again, never trusted
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            read = pool.map(_scale_reading, sample)
            read = list(tqdm(read, total=len(sample), desc=desc, unit="img", leave=False, disable=len(sample) < 20))
        readings = [r for r in read if r is not None]
        atomic_write_text(key_file, json.dumps({"readings": [asdict(r) for r in readings]}))
    return lab_scale(readings)


def _scale_reading(path: Path) -> ScaleReading | None:
    """``crop.image_reading`` of one file; None where it cannot be read."""
    try:
        return image_reading(read_image(path))
    except UnreadableImage:
        return None


def _scale_key(sample: Sequence[Path]) -> str:
    """The sampled files and what reads them (``crop.ruler_key``)."""
    return _files_key(f"scale-v2|{ruler_key()}", sample)


def _files_key(head: str, paths: Sequence[Path]) -> str:
    """A cache key: ``head`` (what is computed from the files) and each file's path, size and modification time."""
    h = hashlib.sha256(head.encode())
    for p in paths:
        try:
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:  # a dangling link: it reads as unreadable, and keys as such
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()[:24]


def batch_policy(crop: CropPolicy, paths: Sequence[Path]) -> CropPolicy:
    """The policy for reading ``paths`` together: a cell view that knows no lab scale cuts a batch of images at the
    batch's measured magnification (``measure_scale``), since the images of one folder come from one microscope and
    the median of their rulers scatters far less than one image's (PBC held-out: 99.16 % at each image's own ruler,
    99.32 % at one scale; docs/one-view.md). Where the rulers disagree (small crops cut their red
    cells, or the folder mixes labs) or too few images show red cells, each image keeps its own scale, as does a
    single image. A frame view, or a policy with its lab's scale, is returned as it is."""
    if crop.px_per_um is not None or len(paths) < config.LAB_SCALE_MIN_IMAGES:
        return crop
    scale = lab_magnification(crop, paths, "the images'")
    return crop if scale is None else crop.with_lab_scale(scale)


def lab_magnification(crop: CropPolicy, paths: Sequence[Path], whose: str, missing: int = logging.INFO) -> float | None:
    """``measure_scale`` for a cell view, logged: ``whose`` magnification in px/µm, or None for a frame view (it reads
    no scale) and where it cannot be measured (logged at level ``missing``: each image then keeps its own scale)."""
    if crop.kind != "cell":
        return None
    scale, why = measure_scale(paths, f"measuring {whose} red cells")
    if scale is None:
        log.log(missing, f"{whose} magnification could not be measured ({why}): each image keeps its own scale")
        return None
    log.info(f"{whose} magnification: {scale:.2f} px/µm ({why})")
    return scale


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → uint8 tensor 3×H×W (the cache format)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Images as every model reads them: uint8 (0..255, as decoded and cached) → float in [0, 1]; float images are
    taken to be in [0, 1] already and pass as float32."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


# ---------------------------------------------------------------------------------------------------------------
# Finding images
# ---------------------------------------------------------------------------------------------------------------

_KAGGLE_SPLITS = {"train": "train", "test-a": "test", "test-b": "test_b"}


def _subdirs(folder: Path) -> dict[str, Path]:
    return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}


def list_files(folder: Path) -> list[Path]:
    """All image-named files below ``folder`` (recursive, sorted; hidden files included so broken ones get reported)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p))


def _class_folder_records(folder: Path, ignored: dict[str, int]) -> list[Record]:
    records: list[Record] = []
    for name, sub in _subdirs(folder).items():
        if name in config.CLASSES:
            label = config.CLASSES.index(name)
            records.extend(Record(p, label) for p in list_files(sub))
        else:
            ignored[sub.name] = ignored.get(sub.name, 0) + len(list_files(sub))
    return records


def find_dataset(root: str | Path, require_all_classes: bool = True) -> DatasetIndex:
    """Find the labelled images below ``root``.

    Understands class folders in any letter case (``Neutrophil/``, ``NEUTROPHIL/``), the Kaggle "White Blood Cells
    Dataset" layout (``Train/ Test-A/ Test-B/`` with class folders inside), and PBC's layout, whose extra classes
    (platelet, ig, ...) are reported in ``ignored_classes`` and left out.
    """
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise WbcError(f"data folder {root} does not exist: check the path (--data)")
    if not root.is_dir():
        raise WbcError(f"{root} is a file, not a folder: pass a folder with one sub-folder per class")
    ignored: dict[str, int] = {}
    subdirs = _subdirs(root)
    if "train" in subdirs and ("test-a" in subdirs or "test" in subdirs):
        layout = "kaggle"
        splits = {}
        for name, sub in subdirs.items():
            split = _KAGGLE_SPLITS.get(name, "test" if name == "test" else None)
            if split is not None:
                splits[split] = _class_folder_records(sub, ignored)
    else:
        layout = "class-folders"
        splits = {"all": _class_folder_records(root, ignored)}
    records = [r for rs in splits.values() for r in rs]
    if not records:
        if not any(name in config.CLASSES for name in subdirs):
            raise WbcError(
                f"no class folders in {root}: expected sub-folders named {', '.join(config.CLASSES)} "
                "(any letter case), or the Kaggle layout Train/ Test-A/ Test-B/"
            )
        raise WbcError(f"no image files in the class folders of {root}: add .jpg/.png/.bmp/.tif images")
    present = {config.CLASSES[r.label] for r in records if r.label is not None}
    missing = [c for c in config.CLASSES if c not in present]
    if missing and require_all_classes:
        raise WbcError(
            f"class folder(s) {', '.join(missing)} missing or empty in {root}: every class needs images to train on"
        )
    return DatasetIndex(root=root, layout=layout, splits=splits, ignored_classes=ignored)


def find_unlabelled(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of files to predict; raises on a missing path."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise WbcError(f"{p} does not exist: pass image files or folders that contain images")
        files.extend(list_files(p) if p.is_dir() else [p])
    if not files:
        raise WbcError(f"no image files found in {', '.join(map(str, paths))}")
    return files


# ---------------------------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------------------------


def _readable_digest(path: Path) -> str | None:
    """SHA-256 of a file that reads as an image, else None; remembered for the process by path, size and modification
    time: checking a folder against a model's training data reads its pool twice (``match_training_data``, then
    ``model_split``), and each trust command of a session (or the app) reads it again."""
    try:
        stat = path.stat()
    except OSError:
        return _read_digest(str(path), -1, -1)  # not remembered: _read_bytes says why it cannot be read
    return _remembered_digest(str(path), stat.st_size, stat.st_mtime_ns)


def _read_digest(path: str, size: int, mtime_ns: int) -> str | None:
    try:
        data = _read_bytes(Path(path))
        read_image(data)
    except UnreadableImage:
        return None
    return hashlib.sha256(data).hexdigest()


_remembered_digest = functools.lru_cache(maxsize=100_000)(_read_digest)


def readable_digests(records: Sequence[Record], desc: str) -> tuple[list[Record], list[str]]:
    """The records whose files read as images, and their SHA-256s, in order (threads): what a split and a data
    fingerprint need, without cutting any view (with the cell view's finder that took 12 minutes for PBC's pool,
    this takes about 30 s)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as threads:
        digests = list(
            tqdm(
                threads.map(_readable_digest, [r.path for r in records]),
                total=len(records),
                desc=desc,
                unit="img",
                leave=False,
                disable=len(records) < 50,
            )
        )
    kept = [(r, d) for r, d in zip(records, digests) if d is not None]
    return [r for r, _ in kept], [d for _, d in kept]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes: byte-identical duplicates share it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_records(
    records: Sequence[Record],
    digests: Sequence[str],
    fractions: dict[str, float],
    seed: int = config.SEED,
    calib_fraction: float = 0.0,
) -> dict[str, list[Record]]:
    """Stratified, seeded split that keeps byte-identical files (even with different labels) on one side.

    ``fractions`` maps split names other than "train" to their share, e.g. ``{"val": .15, "test": .15}``.
    Groups of identical files are split as units, stratified by the first member's class.
    ``calib_fraction`` > 0 then moves that share of "val" into "calib" the same way; done after the split, it leaves
    "train" and "test" exactly as without it (the held-out test files of older models stay theirs).
    """
    groups: dict[str, list[int]] = {}
    for i, digest in enumerate(digests):
        groups.setdefault(digest, []).append(i)
    keys = list(groups)
    strata = [records[groups[k][0]].label for k in keys]
    assignment: dict[str, list[str]] = {}
    remaining, remaining_strata, left = keys, strata, 1.0
    for name, share in fractions.items():
        try:
            remaining, taken, remaining_strata, _ = train_test_split(
                remaining, remaining_strata, test_size=share / left, stratify=remaining_strata, random_state=seed
            )
        except ValueError as exc:  # scikit-learn's words are about test_size; say it in the user's terms
            per_class = Counter(config.CLASSES[label] for label in strata)
            raise WbcError(
                f"too few images to split into training, validation and test sets stratified by class "
                f"({len(keys)} distinct images: {', '.join(f'{c} {n}' for c, n in sorted(per_class.items()))}; the "
                f"{name} split ({share:.0%}) needs at least one image of every class, so each class needs about "
                f"{int(1 / min(fractions.values())) + 1} or more). Add images, or adapt a trained model to a few "
                "labelled cells with wbc adapt --data DIR"
            ) from exc
        assignment[name] = taken
        left -= share
    assignment["train"] = remaining
    if calib_fraction > 0:
        assignment["calib"] = []
    if calib_fraction > 0 and len(assignment.get("val", [])) > 1:
        val_strata = [records[groups[k][0]].label for k in assignment["val"]]
        try:
            assignment["val"], assignment["calib"] = train_test_split(
                assignment["val"], test_size=calib_fraction, stratify=val_strata, random_state=seed
            )
        except ValueError:  # a class with a single group in a tiny validation split: split it unstratified
            assignment["val"], assignment["calib"] = train_test_split(
                assignment["val"], test_size=calib_fraction, random_state=seed
            )
    return {name: [records[i] for k in sorted(ks) for i in groups[k]] for name, ks in assignment.items()}


def split_plan(index: DatasetIndex) -> tuple[list[Record], dict[str, float], dict[str, list[Record]]]:
    """What training splits (the pool), into which shares besides "train", and the splits the layout fixes (Kaggle's
    Test-A/Test-B). ``wbc calibrate`` uses it to recompute a model's validation split."""
    if index.layout == "kaggle":
        return (
            index.splits["train"],
            {"val": config.VAL_FRACTION},
            {k: v for k, v in index.splits.items() if k != "train"},
        )
    return index.splits["all"], {"val": config.VAL_FRACTION, "test": config.TEST_FRACTION}, {}


def relative_paths(records: Iterable[Record], root: Path) -> list[str]:
    """Paths relative to the data root, as written to split.json and model metadata."""
    return [str(r.path.relative_to(root)) for r in records]


def model_labels(records: Sequence[Record], classes: Sequence[str]) -> np.ndarray:
    """Record labels (indices into ``config.CLASSES``) as indices into a model's own class list."""
    unknown = sorted({config.CLASSES[r.label] for r in records} - set(classes))
    if unknown:
        raise WbcError(
            f"the data has class(es) the model does not know ({', '.join(unknown)}): use a model trained "
            "on these classes, or data with the model's classes only"
        )
    return np.array([list(classes).index(config.CLASSES[r.label]) for r in records], dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Decode once, cache
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedImages:
    """Decoded, resized images of a list of records, plus the ones that could not be read."""

    records: list[Record]  # readable ones, aligned with ``images``
    images: torch.Tensor  # uint8 N×3×S×S
    digests: list[str]  # SHA-256 of each readable file
    unreadable: list[tuple[Path, str]]  # (path, reason)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([r.label if r.label is not None else -1 for r in self.records], dtype=torch.long)

    def subset(self, idx: Sequence[int]) -> LoadedImages:
        """The images at positions ``idx`` (a split of a decoded pool: nothing is decoded again)."""
        idx = list(idx)
        return LoadedImages([self.records[i] for i in idx], self.images[idx], [self.digests[i] for i in idx], [])

    def select(self, records: Iterable[Record]) -> LoadedImages:
        """The images of ``records`` (a split of this pool's records), in their order."""
        position = {r.path: i for i, r in enumerate(self.records)}
        return self.subset([position[r.path] for r in records])


def cache_dir() -> Path:
    """Where decoded images are cached: ``$WBC_CACHE_DIR`` or ``~/.cache/wbc-trust``."""
    return Path(os.environ.get("WBC_CACHE_DIR", Path.home() / ".cache" / "wbc-trust"))


def _decode(path: Path, crop: CropPolicy) -> tuple[torch.Tensor | None, str, str | None]:
    try:
        data = _read_bytes(path)
    except UnreadableImage as exc:
        return None, "", str(exc)
    digest = hashlib.sha256(data).hexdigest()
    try:
        return image_to_tensor(view_image(data, crop).image), digest, None
    except UnreadableImage as exc:
        return None, digest, str(exc)


def view_image(source: Path | bytes, crop: CropPolicy) -> CropResult:
    """One file (or its bytes) as the model sees it: read and checked (``read_image``), then cut by the model's crop
    policy (``crop.py``). Raises ``UnreadableImage``."""
    # a frame view decodes JPEGs at reduced scale (draft mode); the finder needs the full picture
    return crop.apply(read_image(source, crop.size if crop.kind == "frame" else None))


def as_policy(crop: CropPolicy | int) -> CropPolicy:
    """A crop policy, or an input size for a whole-frame view (the views of model files from before the finder)."""
    return crop if isinstance(crop, CropPolicy) else CropPolicy("frame", int(crop))


def _cache_key(paths: Sequence[Path], crop: CropPolicy) -> str:
    # a cell view's batch is cut at the magnification measured by the rule of ``crop.lab_scale``, so its constants too
    lab_rule = (
        config.LAB_SCALE_MIN_IMAGES,
        config.LAB_SCALE_MAX_SPREAD,
        config.LAB_SCALE_MIN_SHARE,
        config.CROP_TIGHT_FRAME_UM,
    )
    return _files_key(f"v1|{crop.size}" if crop.kind == "frame" else f"v3|{crop.key}|{lab_rule}", paths)


def load_images(
    records: Sequence[Record], crop: CropPolicy | int, desc: str = "decoding images", cache: bool = True
) -> LoadedImages:
    """Decode every image once and cut the model's view of it (``crop``: the model's policy, or an input size for a
    whole-frame view; threads), caching the result on disk for the next run.

    A cell view without its lab's scale reads the records at their batch's magnification (``batch_policy``).
    Unreadable files are reported (path and reason) and left out, never trained or evaluated on.
    """
    records = list(records)
    crop = as_policy(crop)
    size = crop.size
    # keyed by the policy as given: a cached batch is not measured again
    key_file = cache_dir() / f"{_cache_key([r.path for r in records], crop)}.pt" if cache else None
    if key_file is not None and key_file.exists():
        try:
            blob = torch.load(key_file, weights_only=True)
            ok = set(blob["ok"])
            return LoadedImages(
                records=[r for i, r in enumerate(records) if i in ok],
                images=blob["images"],
                digests=blob["digests"],
                unreadable=[(Path(p), why) for p, why in blob["unreadable"]],
            )
        except Exception:  # a damaged cache file is rebuilt, never trusted
            key_file.unlink(missing_ok=True)
    crop = batch_policy(crop, [r.path for r in records])
    # each image is copied into one preallocated tensor as it arrives: collecting per-image tensors and stacking
    # them needed twice the cache's memory, and the freed small blocks stayed resident through training
    # (bench/train_memory.py)
    images = torch.empty(len(records), 3, size, size, dtype=torch.uint8)
    ok_idx: list[int] = []
    digests: list[str] = []
    unreadable: list[tuple[Path, str]] = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        decoded = pool.map(lambda r: _decode(r.path, crop), records)
        for i, (tensor, digest, why) in enumerate(
            tqdm(decoded, total=len(records), desc=desc, unit="img", leave=False, disable=len(records) < 50)
        ):
            if tensor is None:
                unreadable.append((records[i].path, why))
            else:
                images[len(ok_idx)] = tensor
                ok_idx.append(i)
                digests.append(digest)
    images = images[: len(ok_idx)]  # a view: the unused tail slots of unreadable files were never touched
    loaded = LoadedImages(records=[records[i] for i in ok_idx], images=images, digests=digests, unreadable=unreadable)
    if key_file is not None:
        blob = {
            "ok": ok_idx,
            "images": images,
            "digests": loaded.digests,
            "unreadable": [(str(p), why) for p, why in loaded.unreadable],
        }
        atomic_write(key_file, lambda f: torch.save(blob, f))
    return loaded


def _fingerprint(records: Sequence[Record], digests: Sequence[str]) -> str:
    lines = sorted(f"{config.CLASSES[r.label]}\t{digest}\n" for r, digest in zip(records, digests))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def data_fingerprint(loaded: LoadedImages) -> str:
    """SHA-256 over the sorted (class, file SHA-256) pairs of the readable training pool: the same images with the
    same labels give the same fingerprint, whatever their names, order or folder; one changed pixel or label does not."""
    return _fingerprint(loaded.records, loaded.digests)


@dataclass
class TrainingDataMatch:
    """Whether a data folder is a model's training data, decided by content (never by its path)."""

    same: bool  # its training pool has the fingerprint stored in the model file: the very images and labels
    changed: bool  # not the same, but it is the training folder changed since (same path, or the model's test files)
    reason: str  # a sentence for the output


def match_training_data(index: DatasetIndex, meta: dict) -> TrainingDataMatch:
    """Compare a folder with the training data a model file describes (``meta["data"]``: class counts, fingerprint,
    held-out test files), so that the guard holds through a symlink, a copy, another checkout or another mount.

    The class counts are a free first test; then the SHA-256 of every file of the training pool (a second or two for
    PBC's 8,757 files). The stored fingerprint covers only the files training could read, so when the folder has
    files it cannot read the pool is decoded (``readable_digests``) to leave the same ones out.
    """
    trained = meta.get("data", {})
    pool, _, _ = split_plan(index)
    present = set(relative_paths(pool, index.root))
    test_files = trained.get("test_files", [])
    by_name = sum(f in present for f in test_files)
    looks_like = trained.get("root") == str(index.root) or (test_files and by_name >= len(test_files) / 2)
    if not trained.get("fingerprint"):
        return TrainingDataMatch(False, False, "the model file stores no fingerprint of its training data")
    same = trained.get("splits", {}).get("train" if index.layout == "kaggle" else "all") == _class_counts(pool)
    if same:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as threads:
            digests = list(threads.map(file_digest, [r.path for r in pool]))
        same = _fingerprint(pool, digests) == trained["fingerprint"]
        if not same:  # files training could not read are not in the fingerprint
            readable, readable_digest = readable_digests(pool, "comparing with the model's training data")
            same = len(readable) < len(pool) and _fingerprint(readable, readable_digest) == trained["fingerprint"]
    if same:
        return TrainingDataMatch(
            True,
            False,
            f"its {len(pool)} images and labels are the ones this model was trained "
            f"on: data fingerprint {trained['fingerprint'][:12]}…",
        )
    if looks_like:
        return TrainingDataMatch(
            False,
            True,
            f"it holds {by_name} of the model's {len(test_files)} held-out test files "
            "by name, but its images or labels differ from the training data",
        )
    return TrainingDataMatch(False, False, "its images are not this model's training data")


def model_split(index: DatasetIndex, meta: dict, purpose: str) -> dict[str, list[Record]]:
    """Recompute the split a model was trained with from a folder that holds its training data (same images and
    seed → ``split_records`` gives the same split): its parts (train, val, calib, test), nothing decoded for the
    model (``readable_digests``).

    ``purpose`` ends the error sentence when the folder changed since training and the split cannot be recomputed.
    """
    trained = meta.get("data", {})
    pool, fractions, _ = split_plan(index)
    readable, digests = readable_digests(pool, "recomputing the model's split")
    parts = split_records(
        readable,
        digests,
        fractions,
        seed=trained.get("seed", config.SEED),
        calib_fraction=trained.get("calib_fraction", 0.0),
    )
    if (
        "test" in parts
        and trained.get("test_files")
        and set(relative_paths(parts["test"], index.root)) != set(trained["test_files"])
    ):
        raise WbcError(
            f"the images in {index.root} changed since the model was trained, so its split cannot be "
            f"recomputed: {purpose}"
        )
    return parts


def validation_split(meta: dict, data: Path) -> tuple[LoadedImages, str]:
    """The images to calibrate on: the model's own calibration split (its validation split for models from before
    that split existed) when ``data`` holds its training data (by content, ``match_training_data``), otherwise every
    labelled image in ``data``.

    A model trained with ``--max-images`` used part of that split; the whole split is still unseen in training.
    """
    index = find_dataset(data, require_all_classes=False)
    trained = meta.get("data", {})
    match = match_training_data(index, meta)
    separate = "calibrate on a separate folder of held-out labelled images (--data)"
    if match.changed:
        raise WbcError(
            f"the images in {index.root} changed since the model was trained ({match.reason}), so its "
            f"validation split cannot be recomputed: {separate}"
        )
    if not match.same:
        records = [r for rs in index.splits.values() for r in rs]
        return load_images(records, CropPolicy.from_meta(meta), desc="reading images"), f"all images of {index.root}"
    parts = model_split(index, meta, separate)
    name = "calib" if "calib" in parts else "val"  # models from before the calibration split: their validation split
    policy = CropPolicy.from_meta(meta)
    crop = policy.with_lab_scale(policy.home_px_per_um)  # the model's own images, cut as they were in training
    return load_images(parts[name], crop, desc=f"decoding the {name} split"), (
        f"{'calibration' if name == 'calib' else 'validation'} split of {index.root} "
        f"(seed {trained.get('seed', config.SEED)})"
    )


# ---------------------------------------------------------------------------------------------------------------
# Augmentation and the training dataset
# ---------------------------------------------------------------------------------------------------------------


def train_transform(augment: str = "seed") -> v2.Transform:
    """Training augmentation (uint8 in, uint8 out). ``seed``: the seed's list, rotation ±20°, zoom 20 %, width/height
    shift 10 %, flips, brightness (``SeedAugment``, on whole batches). ``cross-lab``: the same with zoom up to 3×, blur
    and colour jitter (``config.CROSS_LAB_*``), for whole-frame models that must work on other labs' images.
    ``travel``: for models of the cell view (``--crop cell``, whose scale is already set by magnification, so zoom
    stays small): tight crops as other labs cut them, stain (HED jitter, scikit-image), another lab's look
    (``LabLookJitter``), colour and camera jitter, blur and JPEG (``config.TRAVEL_*``)."""
    if augment not in config.AUGMENTS:
        raise WbcError(f"unknown --augment {augment!r}: choose one of {', '.join(config.AUGMENTS)}")
    if augment == "seed":
        return SeedAugment()
    if augment == "cross-lab":
        before, zoom = [], config.CROSS_LAB_ZOOM
        after = [
            v2.RandomApply([PilGaussianBlur(config.CROSS_LAB_BLUR_SIGMA)], p=config.CROSS_LAB_BLUR_P),
            v2.ColorJitter(**config.CROSS_LAB_JITTER),
        ]
    else:
        # the tight crop first, while the cell is still centred in the view
        before = [v2.RandomApply([RandomTightCrop(config.TRAVEL_TIGHT_SHARE)], p=config.TRAVEL_TIGHT_P)]
        zoom = config.TRAVEL_ZOOM
        after = [
            v2.RandomApply([StainAugment(*config.TRAVEL_STAIN)], p=config.TRAVEL_STAIN_P),
            v2.RandomApply([LabLookJitter(config.TRAVEL_LOOK_SCALE, config.TRAVEL_LOOK_SHIFT)], p=config.TRAVEL_LOOK_P),
            v2.ColorJitter(**config.TRAVEL_JITTER),
            v2.RandomApply([PilGaussianBlur(config.TRAVEL_BLUR_SIGMA)], p=config.TRAVEL_BLUR_P),
            v2.RandomApply([PilJpeg(config.TRAVEL_JPEG_QUALITY)], p=config.TRAVEL_JPEG_P),
        ]
    return v2.Compose(
        [
            *before,
            v2.RandomAffine(
                degrees=config.AUG_ROTATION_DEG,
                translate=(config.AUG_SHIFT, config.AUG_SHIFT),
                scale=zoom,
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=_background_fill(),
            ),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            *after,
        ]
    )


class _PilTransform(v2.Transform):
    """A transform written for PIL images (the training dataset augments PIL images, ``ImageTensorDataset``) that
    also takes a uint8 tensor image, like torchvision's own, through PIL and back."""

    def forward(self, image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        if isinstance(image, torch.Tensor):
            return v2.functional.pil_to_tensor(self.pil(v2.functional.to_pil_image(image)))
        return self.pil(image)

    def pil(self, image: Image.Image) -> Image.Image:
        raise NotImplementedError


class RandomTightCrop(_PilTransform):
    """Keep a centred square of a random share of the view and fill the rest with its median colour: what the cell
    view of another lab's tight crop looks like (``crop.CropPolicy`` pads the crop with ``crop.background_colour`` to
    the physical window). Hand-written: no augmentation library models a crop padded out to a fixed physical size."""

    def __init__(self, share: tuple[float, float]) -> None:
        super().__init__()
        self.share = share

    def pil(self, image: Image.Image) -> Image.Image:
        low, high = self.share
        side = round(image.width * (low + (high - low) * float(torch.rand(()))))
        left, top = (image.width - side) // 2, (image.height - side) // 2
        kept = image.crop((left, top, left + side, top + side))
        canvas = Image.new("RGB", image.size, background_colour(kept))
        canvas.paste(kept, (left, top))
        return canvas


class PilGaussianBlur(_PilTransform):
    """Gaussian blur of a random sigma in ``sigma``, by Pillow. torchvision's ``GaussianBlur`` turns a PIL image into a
    tensor and convolves it with torch's threads: 26 ms per 160 px view on 2 shared cores, against under 1 ms here, and
    the augmentation runs once per image per epoch."""

    def __init__(self, sigma: tuple[float, float]) -> None:
        super().__init__()
        self.sigma = sigma

    def pil(self, image: Image.Image) -> Image.Image:
        low, high = self.sigma
        return image.filter(ImageFilter.GaussianBlur(low + (high - low) * float(torch.rand(()))))


def jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    """The image as a camera or a slide scanner's JPEG at ``quality`` would leave it (Pillow's libjpeg encoder).
    Pillow, not torchvision's ``jpeg``: torchvision deprecated its image codecs in 0.29."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


class PilJpeg(_PilTransform):
    """JPEG compression at a random quality in ``quality`` (inclusive), like torchvision's ``v2.JPEG``."""

    def __init__(self, quality: tuple[int, int]) -> None:
        super().__init__()
        self.quality = quality

    def pil(self, image: Image.Image) -> Image.Image:
        low, high = self.quality
        return jpeg_round_trip(image, int(torch.randint(low, high + 1, ())))


class StainAugment(_PilTransform):
    """Stain variation, the "HED jitter" of Tellez et al. (2018): the image is unmixed into haematoxylin, eosin and
    DAB optical densities (scikit-image's colour deconvolution, ``rgb2hed``), each scaled by a factor in 1 ± ``scale``
    and shifted by up to ± ``shift``, and mixed back. torchstain's Macenko augmentor was tried first: it fits the stain
    matrix twice per image and took 8-60 ms per 160 px view on these 2 cores, against 1.2 ms here. Random numbers come
    from torch's generator, which the training loop seeds per epoch and process (same seed, same augmentation)."""

    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift

    def pil(self, image: Image.Image) -> Image.Image:
        factor = 1 + self.scale * (2 * torch.rand(3).numpy() - 1)
        offset = self.shift * (2 * torch.rand(3).numpy() - 1)
        mixed = hed2rgb(rgb2hed(np.asarray(image)) * factor + offset)
        return Image.fromarray((np.clip(mixed, 0, 1) * 255 + 0.5).astype(np.uint8))


class LabLookJitter(_PilTransform):
    """Another lab's look: Reinhard's colour transfer (the one ``colour.ColourTransfer`` undoes for a known lab) to
    random target statistics. In CIELAB (kornia), each channel's spread about the view's mean is scaled by a factor
    drawn from ``scale`` and its mean shifted by up to ± ``shift``. Where HED jitter varies the stains' densities and
    ColorJitter the camera, this moves the whole picture as another lab's stain, lamp and camera do together (a paler,
    bluer smear has half the lightness spread). Hand-written as one affine map per channel: no augmentation library
    draws Reinhard targets (torchstain's Reinhard fits one image to one given target)."""

    def __init__(self, scale: Sequence[tuple[float, float]], shift: Sequence[float]) -> None:
        super().__init__()
        self.low = torch.tensor([low for low, _ in scale]).view(3, 1, 1)
        self.high = torch.tensor([high for _, high in scale]).view(3, 1, 1)
        self.shift = torch.tensor(shift).view(3, 1, 1)

    def pil(self, image: Image.Image) -> Image.Image:
        factor = self.low + (self.high - self.low) * torch.rand(3, 1, 1)
        offset = self.shift * (2 * torch.rand(3, 1, 1) - 1)
        with torch.no_grad():
            lab = rgb_to_lab(v2.functional.pil_to_tensor(image).float() / 255)
            mean = lab.mean((1, 2), keepdim=True)
            rgb = lab_to_rgb((lab - mean) * factor + mean + offset, clip=True)
        return v2.functional.to_pil_image((rgb * 255 + 0.5).to(torch.uint8))


def _background_fill() -> list[float]:
    """Fill revealed corners with a smear-background-like light pink instead of black."""
    return [225.0, 215.0, 205.0]


class SeedAugment(v2.Transform):
    """The seed's augmentation (``--augment seed``) on one uint8 image 3×H×W or a whole batch N×3×H×W, each image
    with its own draw: rotation, zoom and shift as one affine map, horizontal and vertical flips folded into it,
    revealed corners filled with the smear background, then brightness.

    The draws are torchvision's ``RandomAffine`` → ``RandomHorizontalFlip`` → ``RandomVerticalFlip`` →
    ``ColorJitter(brightness)``, which this replaced: angle U(±``AUG_ROTATION_DEG``), shifts rounded to whole pixels
    U(±``AUG_SHIFT``·width) and U(±``AUG_SHIFT``·height), scale U(1 ± ``AUG_ZOOM``), each flip with p = 0.5,
    brightness factor U(1 ± ``AUG_BRIGHTNESS``). Hand-written because the batch is what makes it fast and no library
    draws per image in one pass as fast: for 48 images at 160 px, Pillow one image at a time took 41.6 ms, kornia's
    batched ``RandomAffine`` + flips + ``ColorJitter`` 40.7 ms, one ``grid_sample`` of the batch 14.0 ms (medians of
    10; ``bench/train_speed.py``'s "data" column is the same work in training).
    """

    batched = True  # ImageTensorDataset.collate augments the whole batch at once

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images if images.ndim == 4 else images.unsqueeze(0)
        out = self.apply(batch, self.draw(len(batch), batch.shape[-1], batch.shape[-2]))
        return out if images.ndim == 4 else out[0]

    @staticmethod
    def draw(n: int, width: int, height: int) -> dict[str, torch.Tensor]:
        """Each image's parameters, from torch's global generator (so a checkpoint's RNG state repeats them)."""

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.empty(n).uniform_(low, high)

        dx, dy = config.AUG_SHIFT * width, config.AUG_SHIFT * height
        return {
            "angle": uniform(-config.AUG_ROTATION_DEG, config.AUG_ROTATION_DEG),
            "shift": torch.stack([uniform(-dx, dx), uniform(-dy, dy)], 1).round(),
            "scale": uniform(1 - config.AUG_ZOOM, 1 + config.AUG_ZOOM),
            "flip": torch.where(torch.rand(n, 2) < 0.5, -1.0, 1.0),  # x, y: -1 mirrors
            "brightness": uniform(1 - config.AUG_BRIGHTNESS, 1 + config.AUG_BRIGHTNESS),
        }

    @staticmethod
    def apply(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 N×3×H×W → uint8, with the drawn parameters. The output pixel q (centred pixel coordinates) is the
        flipped image's, so it reads the rotated, scaled and shifted image at F·q, which reads the input at
        R(−angle)·(F·q − shift) / scale; ``affine_grid`` takes that map in coordinates normalised to [−1, 1]."""
        n, _, height, width = images.shape
        half = torch.tensor([width / 2, height / 2])
        angle = torch.deg2rad(params["angle"])
        cos, sin = torch.cos(angle), torch.sin(angle)
        inverse_rotation = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # R(−angle)
        read = inverse_rotation / params["scale"].view(n, 1, 1)
        matrix = read * params["flip"].view(n, 1, 2) * half.view(1, 1, 2) / half.view(1, 2, 1)
        offset = -(read @ params["shift"].view(n, 2, 1)) / half.view(1, 2, 1)
        grid = torch.nn.functional.affine_grid(
            torch.cat([matrix, offset], 2), [n, 3, height, width], align_corners=False
        )
        fill = torch.tensor(_background_fill()).view(1, 3, 1, 1)
        moved = torch.nn.functional.grid_sample(
            images.float() - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        out = (moved + fill) * params["brightness"].view(n, 1, 1, 1)
        return out.clamp_(0, 255).round_().to(torch.uint8)


def augment(transform: v2.Transform, images: torch.Tensor) -> torch.Tensor:
    """A uint8 batch, augmented: by a batched transform (``SeedAugment``) at once, by any other one image at a time
    as a PIL image (on one small image torch's tensor kernels spend more time spreading work over threads than
    computing: ~15× slower on 2 cores than Pillow's C code for the same random transform)."""
    if getattr(transform, "batched", False):
        return transform(images)
    return torch.stack([v2.functional.pil_to_tensor(transform(v2.functional.to_pil_image(i))) for i in images])


class ImageTensorDataset(Dataset):
    """Cached uint8 images + labels → float [0, 1] batches (``collate``, the loader's ``collate_fn``), augmented
    when a transform is given (``augment``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def collate(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([image for image, _ in items])
        if self.transform is not None:
            images = augment(self.transform, images)
        return to_unit(images), torch.stack([label for _, label in items])
