"""Fuzzing the image intake: thousands of malformed files made from real PBC images, zero unhandled exceptions.

Every generated file must either be read (an RGB image of the requested size) or be refused with ``UnreadableImage``
and a reason — through ``read_image``, through ``load_images`` (training, evaluation), through
``Predictor.predict_files`` (``wbc predict``) and through the ``wbc predict`` command itself. Hypothesis generates
the mutations (truncation, byte flips, insertions, deletions, extreme header numbers, format magic on random bytes,
text) on seeds that are real cells saved in every supported format; each case is a few hundred bytes to 16 kB, so a
thousand cases take seconds. ``bench/fuzz_atheris.py`` runs a coverage-guided fuzzer on the same target for longer.
"""

from __future__ import annotations

import base64
import csv
import io
import random
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import pbc_files
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from wbc_trust import config
from wbc_trust.data import Record, UnreadableImage, load_images, read_image
from wbc_trust.modelfile import read_metadata
from wbc_trust.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # decode target for read_image cases: small, so each case is cheap

#: Magic numbers of the formats Pillow knows, put in front of random bytes so the fuzzer reaches each parser.
MAGIC = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"GIF89a",
    b"II*\x00",
    b"MM\x00*",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBP",
    b"P5\n",
    b"P6\n",
    b"\x00\x00\x01\x00",
    b"8BPS",
    b"\x59\xa6\x6a\x95",
]
TEXTS = [
    b"",
    b"hello",
    b"<!DOCTYPE html><html><body><img src=x></body></html>",
    b"\xef\xbb\xbfcell,label\n1,2\n",
    b"%PDF-1.4\n",
    b'{"not": "an image"}',
]


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _seeds() -> list[bytes]:
    """Real cells (one full-size PBC JPEG, and small crops) in every format and mode the intake handles."""
    original = pbc_files("monocyte", 1)[0]
    cell = Image.open(original).convert("RGB")
    small = cell.resize((24, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90°
    gray16 = Image.fromarray(np.asarray(small.convert("L")).astype(np.uint16) * 257)
    frames = [small, small.rotate(90), small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return [
        original.read_bytes(),
        _encode(small, "JPEG", quality=90),
        _encode(small, "JPEG", progressive=True),
        _encode(small.crop((0, 0, 24, 12)), "JPEG", exif=exif.tobytes()),
        _encode(small.convert("CMYK"), "JPEG"),
        _encode(small, "PNG"),
        _encode(small.convert("RGBA"), "PNG"),
        _encode(small.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0),
        _encode(gray16, "PNG"),
        _encode(small.convert("LA"), "PNG"),
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:], compression="tiff_lzw"),
        _encode(gray16, "TIFF"),
        _encode(small, "BMP"),
        _encode(small, "WEBP"),
        _encode(small.convert("L"), "PPM"),
    ]


SEEDS = _seeds()


def _mutate(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    """Apply mutation operations: (kind, position as a fraction of 2**16 of the length, payload)."""
    buffer = bytearray(data)
    for kind, where, payload in ops:
        at = where * len(buffer) // 65536
        if kind == "truncate":
            del buffer[at:]
        elif kind == "flip":
            buffer[at : at + len(payload)] = bytes(a ^ b for a, b in zip(buffer[at : at + len(payload)], payload))
        elif kind == "insert":
            buffer[at:at] = payload
        elif kind == "delete":
            del buffer[at : at + len(payload)]
        elif kind == "number":  # an extreme 16/32-bit integer where a header field (width, length, offset) may be
            value = int.from_bytes(payload[:1] or b"\x00", "big") % 4
            extreme = (0, 1, 0xFFFF, 0xFFFFFFFF)[value]
            buffer[at : at + 4] = struct.pack(">I", extreme)
    return bytes(buffer)


#: Hypothesis favours small numbers; an odd multiplier spreads them over the whole file, past the first header bytes.
_POSITION = st.integers(0, 65535).map(lambda x: x * 40503 % 65536)
_OPS = st.lists(
    st.tuples(
        st.sampled_from(["truncate", "flip", "insert", "delete", "number"]),
        _POSITION,
        st.binary(min_size=1, max_size=16),
    ),
    min_size=1,
    max_size=6,
)
#: One malformed file: a mutated real image, format magic + random bytes, or text/HTML.
MALFORMED = st.one_of(
    st.builds(_mutate, st.sampled_from(SEEDS), _OPS),
    st.builds(bytes.__add__, st.sampled_from(MAGIC), st.binary(max_size=512)),
    st.builds(bytes.__add__, st.sampled_from(TEXTS), st.binary(max_size=64)),
)
EXTENSIONS = sorted(config.IMAGE_EXTENSIONS | {".JPG", ".Png"})


def _check_read(data: bytes) -> str | None:
    """Read one file's bytes; None when it was read (and is a proper RGB SIZE×SIZE image), else the reason."""
    try:
        image = read_image(data, SIZE)
    except UnreadableImage as exc:
        assert str(exc), "a refusal must say why"
        return str(exc)
    assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    return None


#: Inputs bench/fuzz_atheris.py found, kept as regression examples: a 179-byte TIFF declaring 1×33,594,392 pixels
#: (13 s and 2.4 GB to "read" a black strip) and a TIFF whose float strip offset made Pillow's load() raise TypeError.
ATHERIS_FINDINGS = [
    base64.b64decode(text)
    for text in (
        "SUkqAAgAAAAJAAABBAABAP//GAAAAAEBBAABAAAAGJwAAgIBAwABAAAAEAAAAAMBAwABAAAAAQAAAQABAwABAAAAAQAAABEBBAABAAAAegAAABYB"
        "BAABAAAAAQAAAAAAAL6+vroAAQAAAIAEAAAcAQMAAQAAAAEAAAAA/////////////////////////6qqp6eioqOj2dmwsK+vAQCnvb3o6OPjx8e1"
        "tbOz0dHo6OTks7M=",
        "SUkqAAgAAAAJAAABBAABAAAAGAAAAAEBBAABAAAAGAAAAGIAZAAAAAAAEAAAAAMBAwABAAAAAQAAAAYBAwABAAAAAQAAABEBDAABAAAAegAAABYB"
        "BAABAAAAGAAAABcBBABEAAAAgAQAABwBAwABAAAAAQAAAAAAAADSd3l5enpzc5SUxcXR0cjIwcG/v9LS6BjR0bCwt7fe3unp6enr6+vr6enq6unp"
        "6Ojc3LOztbXExLe3qanKyujo5+fr6+rq6enk5NPT3d3l5cPDt7fT0+fn5ubb29vCoKCenqen4eHGxqWlqana2uXlwMC0tMLCubmxsdvb5eWwsOvr"
        "6uro6MTEpaWsrKqqp6eioqOj2dmwsK+vp6e9vejo5+PHx7W1s7HR0ejo5OSzsw==",
    )
]


@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(MALFORMED)
@example(ATHERIS_FINDINGS[0])
@example(ATHERIS_FINDINGS[1])
def test_read_image_never_raises_anything_but_unreadable(data: bytes) -> None:
    _check_read(data)


@pytest.fixture(scope="module")
def predictor(tiny_run: Path) -> Predictor:
    """The tiny real run's seed CNN at 64 px: cheap enough to classify a thousand files in seconds."""
    return Predictor(tiny_run / "model.safetensors")


def _write_files(folder: Path, blobs: list[bytes], extensions: list[str]) -> list[Path]:
    paths = []
    for i, (blob, ext) in enumerate(zip(blobs, extensions)):
        path = folder / f"case{i}{ext}"
        path.write_bytes(blob)
        paths.append(path)
    return paths


@settings(
    max_examples=130,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.tuples(MALFORMED, st.sampled_from(EXTENSIONS)), min_size=8, max_size=8))
def test_predict_and_load_images_report_every_malformed_file(
    predictor: Predictor, files: list[tuple[bytes, str]]
) -> None:
    """≥1,040 malformed files on disk: a row (or a reason) for every one, in order, and the batch goes on."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = _write_files(Path(tmp), [b for b, _ in files], [e for _, e in files])
        refused = {p for p in paths if _unreadable(p, predictor.img_size)}
        rows = predictor.predict_files(paths, progress=False)
        assert [r.path for r in rows] == [str(p) for p in paths]
        for path, row in zip(paths, rows):
            if path in refused:
                assert row.prediction is None and row.flag.startswith("unreadable: ") and len(row.flag) > 13
            else:
                assert row.prediction in predictor.classes and abs(sum(row.probabilities.values()) - 1) < 1e-3
        loaded = load_images([Record(p, 0) for p in paths], SIZE, cache=False)
        assert {p for p, _ in loaded.unreadable} | {r.path for r in loaded.records} == set(paths)
        assert len(loaded.records) == len(loaded.images) == len(loaded.digests)
        assert all(reason for _, reason in loaded.unreadable)


def _unreadable(path: Path, size: int) -> bool:
    try:
        read_image(path, size)
    except UnreadableImage:
        return True
    return False


def test_wbc_predict_command_on_a_folder_of_malformed_files(tmp_path: Path, tiny_run: Path) -> None:
    """The command a user runs: exit 0 (a real cell is among them), one CSV row per file, no traceback."""
    rng = random.Random(0)
    blobs = []
    for _ in range(60):
        ops = [
            (
                rng.choice(["truncate", "flip", "insert", "delete", "number"]),
                rng.randrange(65536),
                rng.randbytes(rng.randint(1, 16)),
            )
            for _ in range(rng.randint(1, 4))
        ]
        blobs.append(_mutate(rng.choice(SEEDS), ops))
    blobs += TEXTS + [pbc_files("basophil", 1)[0].read_bytes()]
    paths = _write_files(tmp_path, blobs, [rng.choice(EXTENSIONS) for _ in blobs])
    model = tiny_run / "model.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wbc_trust.cli",
            "predict",
            str(tmp_path),
            "--model",
            str(model),
            "--csv",
            str(tmp_path / "out.csv"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert sorted(r["path"] for r in rows) == sorted(map(str, paths))
    img_size = read_metadata(model)["img_size"]
    expected_unreadable = {str(p) for p in paths if _unreadable(p, img_size)}
    assert {r["path"] for r in rows if r["flag"].startswith("unreadable")} == expected_unreadable
    assert all(r["prediction"] in config.CLASSES for r in rows if r["path"] not in expected_unreadable)
    assert str(paths[-1]) not in expected_unreadable  # the real cell is read
