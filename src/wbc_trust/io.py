"""Writing result files: every file the package writes goes through ``atomic_write`` (a temporary file in the same
folder, then a rename), so a crash or a full disk never leaves a half-written model, cache, CSV or JSON behind."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write via a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared like any written file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write`` for text files (JSON, CSV, reports)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: Path, rows: Iterable[Sequence | Mapping], fieldnames: Sequence[str]) -> None:
    """Atomically write a CSV file: the header ``fieldnames``, then one line per row (a sequence in that order, or a
    mapping read by those names). Built in memory first: result tables are small, and the rename needs whole bytes."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(fieldnames)
    writer.writerows([row[name] for name in fieldnames] if isinstance(row, Mapping) else row for row in rows)
    atomic_write_text(Path(path), buffer.getvalue())
