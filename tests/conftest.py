"""Shared fixtures: real images from ../shared/datasets, small trees in temp dirs, one tiny real training run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from wbc_trust import config

SHARED = Path(os.environ.get("WBC_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "datasets"
PBC = SHARED / "pbc-wbc"
PBC_NON_WBC = SHARED / "pbc-non-wbc"
BCCD = SHARED / "bccd-wbc"
CORRUPT_FILE = PBC / "neutrophil" / ".DS_169665.jpg"
#: A real byte-identical pair in PBC filed under two labels.
CONFLICTING_PAIR = (PBC / "neutrophil" / "BNE_191112.jpg", PBC / "eosinophil" / "EO_225902.jpg")


def pbc_files(cls: str, n: int, offset: int = 0) -> list[Path]:
    """The first ``n`` real PBC images of a class (sorted, skipping ``offset``), excluding the broken file."""
    files = sorted(p for p in (PBC / cls).iterdir() if p.name != CORRUPT_FILE.name)
    return files[offset : offset + n]


def make_tree(root: Path, per_class: int, folder_names: dict[str, str] | None = None, offset: int = 0) -> Path:
    """Copy ``per_class`` real PBC images per class into ``root/<folder name>/`` (folder names may change case)."""
    for cls in config.CLASSES:
        target = root / (folder_names or {}).get(cls, cls)
        target.mkdir(parents=True, exist_ok=True)
        for src in pbc_files(cls, per_class, offset):
            shutil.copy(src, target / src.name)
    return root


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Decoded-image cache in a temp dir, so tests never depend on a developer's cache."""
    os.environ["WBC_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 real PBC images per class in lower-case class folders."""
    return make_tree(tmp_path_factory.mktemp("small"), 24)


@pytest.fixture(scope="session")
def tiny_run(small_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 1-epoch training run of the seed CNN at 64 px on the small tree; returns its run folder."""
    from wbc_trust.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(data=small_tree, out=out, arch="cnn", epochs=1, batch_size=16, img_size=64))
    return out


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The shipped default model."""
    assert config.DEFAULT_MODEL_PATH.exists(), "the default model must ship with the package"
    return config.DEFAULT_MODEL_PATH
