"""What a lab's folders hold, made from real PBC cells: each file is read correctly or refused with its reason.

"Read correctly" is checked on the pixels (EXIF rotation gives the rotated size and pixels, 16-bit keeps its
relative brightness, CMYK stays close to the RGB original, multi-frame files give their first frame). "Refused" is
checked in every entry point: ``read_image``, ``load_images`` (training, ``wbc evaluate``), ``evaluate``,
``Predictor.predict_files`` (``wbc predict``) and ``Predictor.predict_bytes`` (the app).
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tree, pbc_files
from PIL import Image

from wbc_trust import config
from wbc_trust.data import Record, UnreadableImage, load_images, read_image
from wbc_trust.evaluate import evaluate
from wbc_trust.predict import Predictor

CELL_FILE = pbc_files("eosinophil", 1)[0]


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pixels(source: bytes | Image.Image, size: int | None = None) -> np.ndarray:
    """RGB pixels as float: read through ``read_image`` when given bytes."""
    image = read_image(source, size) if isinstance(source, bytes) else source
    return np.asarray(image, dtype=np.float64)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def cell() -> Image.Image:
    """A real PBC eosinophil (360×363 RGB)."""
    return Image.open(CELL_FILE).convert("RGB")


def _sof_size(jpeg: bytes, height: int, width: int) -> bytes:
    """The same JPEG with its frame header claiming another size (how a decompression bomb looks to a reader)."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming ``width×height``, followed by a tiny IDAT: a bomb in 60 bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _tiff_taller_than_its_data(cell: Image.Image) -> bytes:
    """An uncompressed TIFF of the cell whose ImageLength says twice its height: Pillow alone reads a black half."""
    data = bytearray(encode(cell, "TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack("<H", data[ifd : ifd + 2])[0], 12):
        tag, kind = struct.unpack("<HH", data[entry : entry + 4])
        if tag == 257:  # ImageLength
            fmt = "<H" if kind == 3 else "<I"
            data[entry + 8 : entry + 8 + struct.calcsize(fmt)] = struct.pack(fmt, 2 * cell.height)
    return bytes(data)


#: name → (bytes made from the real cell, words the reason must contain)
BAD_FILES: dict[str, tuple[Callable[[Image.Image], bytes], str]] = {
    "zero-byte": (lambda c: b"", "empty file"),
    "truncated-jpeg": (lambda c: CELL_FILE.read_bytes()[: len(CELL_FILE.read_bytes()) // 2], "truncated"),
    "truncated-png": (lambda c: encode(c, "PNG")[:20_000], "truncated"),
    "random-bytes": (lambda c: np.random.default_rng(0).bytes(5000), "not an image"),
    "text": (lambda c: b"cell_id,label\n1,eosinophil\n", "not an image"),
    "html": (lambda c: b"<!DOCTYPE html><html><head><title>404 Not Found</title></head></html>", "not an image"),
    "bomb-jpeg-4-gigapixels": (lambda c: _sof_size(CELL_FILE.read_bytes(), 65535, 65535), "decompression bomb"),
    "bomb-jpeg-81-megapixels": (lambda c: _sof_size(CELL_FILE.read_bytes(), 9000, 9000), "decompression bomb"),
    "bomb-png-10-gigapixels": (lambda c: _png_header_only(100_000, 100_000), "decompression bomb"),
    "32-bit-integer-tiff": (
        lambda c: encode(Image.fromarray(np.asarray(c.convert("L"), dtype=np.int32)), "TIFF"),
        "brightness range",
    ),
    "float-tiff": (
        lambda c: encode(Image.fromarray(np.asarray(c.convert("L"), dtype=np.float32) / 255), "TIFF"),
        "brightness range",
    ),
    "tiff-with-missing-strips": (_tiff_taller_than_its_data, "damaged TIFF: its data covers 130,680 of its 261,360"),
    "21-to-1-strip": (lambda c: encode(c.resize((2100, 100)), "PNG"), "not a cell image"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_is_refused_with_its_reason(cell: Image.Image, name: str) -> None:
    make, reason = BAD_FILES[name]
    with pytest.raises(UnreadableImage, match=reason):
        read_image(make(cell), 64)


def test_every_truncation_of_a_real_jpeg_and_png_is_refused_or_read_exactly(cell: Image.Image) -> None:
    """No silent half-read: a cut file either gives exactly the full image (a PNG missing only its end chunk) or is
    refused."""
    for data in (CELL_FILE.read_bytes(), encode(cell, "PNG")):
        full = pixels(data, 64)
        for cut in [*range(1, len(data), len(data) // 97), *range(len(data) - 16, len(data))]:
            try:
                assert np.array_equal(pixels(data[:cut], 64), full), f"cut at {cut} of {len(data)} read wrongly"
            except UnreadableImage as exc:
                assert str(exc)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_exact(cell: Image.Image, monkeypatch: pytest.MonkeyPatch) -> None:
    """config.MAX_IMAGE_PIXELS is the limit itself (Pillow's own guard only raises at twice its value)."""
    data = encode(cell.resize((200, 100)), "PNG")
    monkeypatch.setattr(config, "MAX_IMAGE_PIXELS", 20_000)
    assert read_image(data).size == (200, 100)
    monkeypatch.setattr(config, "MAX_IMAGE_PIXELS", 19_999)
    with pytest.raises(UnreadableImage, match="200×100 = 20,000 pixels"):
        read_image(data)


def test_file_size_limit_refuses_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "huge.jpg"
    shutil.copy(CELL_FILE, path)
    monkeypatch.setattr(config, "MAX_IMAGE_FILE_BYTES", path.stat().st_size - 1)
    with pytest.raises(UnreadableImage, match="file too large"):
        read_image(path)
    loaded = load_images([Record(path, 1)], 32, cache=False)
    assert len(loaded.unreadable) == 1 and "file too large" in loaded.unreadable[0][1]


def test_missing_file_and_folder_are_reported(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImage, match="cannot read file"):
        read_image(tmp_path / "gone.jpg")
    with pytest.raises(UnreadableImage, match="cannot read file"):
        read_image(tmp_path)


# --- files that must be read, and read right ------------------------------------------------------------------------


def test_one_pixel_image() -> None:
    data = encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")
    assert np.array_equal(pixels(data, 8), np.tile([10, 200, 30], (8, 8, 1)))


def test_very_large_valid_image_reads_like_the_original(cell: Image.Image) -> None:
    """An 8000×7800 JPEG (62 megapixels, under the limit) of the real cell: read fast at reduced scale, same content."""
    big = encode(cell.resize((8000, 7800), Image.Resampling.BICUBIC), "JPEG", quality=85)
    assert mean_abs_diff(pixels(big, 64), pixels(CELL_FILE.read_bytes(), 64)) < 3


def test_grayscale_is_replicated_to_three_channels(cell: Image.Image) -> None:
    gray = cell.convert("L")
    out = pixels(encode(gray, "PNG"))
    assert np.array_equal(out[..., 0], np.asarray(gray)) and np.array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_become_white_and_opaque_ones_keep_their_colour(cell: Image.Image, mode: str) -> None:
    image = cell.convert(mode)
    alpha = np.full(cell.size[::-1], 255, dtype=np.uint8)
    alpha[:, :100] = 0  # the left 100 columns fully transparent
    image.putalpha(Image.fromarray(alpha))
    out = pixels(encode(image, "PNG"))
    assert (out[:, :100] == 255).all()
    expected = pixels(cell if mode == "RGBA" else cell.convert("L").convert("RGB"))
    assert np.array_equal(out[:, 100:], expected[:, 100:])


def test_palette_image_keeps_its_colours(cell: Image.Image) -> None:
    paletted = cell.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    assert mean_abs_diff(pixels(encode(paletted, "PNG")), pixels(paletted.convert("RGB"))) == 0
    assert mean_abs_diff(pixels(encode(paletted, "GIF")), pixels(cell)) < 3


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "PPM"])
def test_16_bit_keeps_relative_brightness(cell: Image.Image, fmt: str) -> None:
    """A bright and a 4× darker 16-bit copy of the real cell: read at the cell's 8-bit values and a quarter of them
    (Pillow alone would clip both to white; a per-image stretch would make them equal)."""
    gray = np.asarray(cell.convert("L"), dtype=np.uint16)
    bright = pixels(encode(Image.fromarray(gray * 257), fmt))[..., 0]
    dark = pixels(encode(Image.fromarray(gray * 257 // 4), fmt))[..., 0]
    assert np.abs(bright - gray).max() <= 1
    assert np.abs(dark - gray / 4).max() <= 1
    assert 3.9 < bright.mean() / dark.mean() < 4.1


def test_cmyk_jpeg_colours_are_close_to_the_rgb_original(cell: Image.Image) -> None:
    cmyk = encode(cell.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    assert mean_abs_diff(pixels(cmyk), pixels(cell)) < 3


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_file_gives_its_first_frame(cell: Image.Image, fmt: str) -> None:
    frames = [cell, Image.new("RGB", cell.size, (0, 0, 0)), cell.rotate(90)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert mean_abs_diff(pixels(data), pixels(cell)) < 3


@pytest.mark.parametrize(
    "orientation, transpose",
    [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)],
)
def test_exif_rotated_photo_comes_out_upright(cell: Image.Image, orientation: int, transpose: Image.Transpose) -> None:
    """A non-square crop saved with an EXIF orientation tag, as phones do: the rotated size and the rotated pixels."""
    crop = cell.crop((0, 0, 360, 200))
    plain = encode(crop, "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = encode(crop, "JPEG", quality=95, exif=exif.tobytes())
    out = read_image(tagged)
    assert out.size == (crop.size if orientation == 3 else crop.size[::-1])
    assert mean_abs_diff(pixels(out), pixels(read_image(plain).transpose(transpose))) < 1


@pytest.mark.parametrize("fmt", ["BMP", "WEBP", "TIFF", "JPEG"])
def test_common_formats_read_close_to_the_original(cell: Image.Image, fmt: str) -> None:
    options = {"quality": 95} if fmt in ("WEBP", "JPEG") else {}
    assert mean_abs_diff(pixels(encode(cell, fmt, **options)), pixels(cell)) < 3


# --- every entry point: training/evaluation (load_images, evaluate), wbc predict, the app ---------------------------


@pytest.fixture(scope="module")
def mixed_tree(cell: Image.Image, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[Path, str]]:
    """A labelled tree of real cells plus every bad file (under image names) in the eosinophil folder."""
    root = make_tree(tmp_path_factory.mktemp("mixed"), 2)
    bad = {}
    for i, (name, (make, reason)) in enumerate(BAD_FILES.items()):
        path = root / "eosinophil" / f"{name}{sorted(config.IMAGE_EXTENSIONS)[i % len(config.IMAGE_EXTENSIONS)]}"
        path.write_bytes(make(cell))
        bad[path] = reason
    return root, bad


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_files_are_reported_in_every_entry_point(
    mixed_tree: tuple[Path, dict[Path, str]], tiny_run: Path, tmp_path: Path
) -> None:
    root, bad = mixed_tree
    files = sorted(p for p in root.rglob("*") if p.is_file())
    good = [p for p in files if p not in bad]

    loaded = load_images([Record(p, 1) for p in files], 64, cache=False)  # what training and evaluation decode
    reasons = dict(loaded.unreadable)
    assert set(reasons) == set(bad) and [r.path for r in loaded.records] == good
    for path, reason in bad.items():
        assert reason in reasons[path], (path.name, reasons[path])

    metrics = evaluate(tiny_run / "model.safetensors", root, tmp_path)  # wbc evaluate
    assert metrics["n_unreadable"] == len(bad) and metrics["n_images"] == len(good)
    assert json.loads((tmp_path / "metrics.json").read_text())["n_unreadable"] == len(bad)

    predictor = Predictor(tiny_run / "model.safetensors")
    rows = predictor.predict_files(files, progress=False)  # wbc predict
    for path, row in zip(files, rows):
        if path in bad:
            assert row.prediction is None and bad[path] in row.flag, (path.name, row.flag)
        else:
            assert row.prediction in config.CLASSES and not row.flag.startswith("unreadable")
    for path in files:  # the app's uploads
        answer = predictor.predict_bytes(path.read_bytes(), name=path.name)
        assert (answer.prediction is None) == (path in bad)
        if path in bad:
            assert answer.flag.startswith("unreadable: ") and bad[path] in answer.flag
