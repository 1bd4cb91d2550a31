"""Shared fixtures: real images from ../shared/datasets, small trees in temp dirs, one tiny real training run.

Without the shared datasets (a clone on its own), every test that needs them is skipped with a message that says where
they were looked for; the tests on the shipped model and sample still run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import CodeType

import pytest

from wbc_trust import config

SHARED = Path(os.environ.get("WBC_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "datasets"
PBC = SHARED / "pbc-wbc"
PBC_NON_WBC = SHARED / "pbc-non-wbc"
BCCD = SHARED / "bccd-wbc"
CORRUPT_FILE = PBC / "neutrophil" / ".DS_169665.jpg"
#: A real byte-identical pair in PBC filed under two labels.
CONFLICTING_PAIR = (PBC / "neutrophil" / "BNE_191112.jpg", PBC / "eosinophil" / "EO_225902.jpg")
SHARED_MISSING = (
    f"needs the shared datasets, not found at {PBC}: put them in ../shared beside the repository, or "
    "point WBC_SHARED at the folder that holds datasets/"
)
#: Names that mark a test (or one of its fixtures) as reading ../shared.
_SHARED_NAMES = frozenset(
    {"SHARED", "PBC", "PBC_NON_WBC", "BCCD", "CORRUPT_FILE", "CONFLICTING_PAIR", "pbc_files", "make_tree"}
)


def require_shared() -> None:
    """Skip the calling test, or the whole test module when called while it is imported, without the datasets."""
    if not PBC.is_dir():
        pytest.skip(SHARED_MISSING, allow_module_level=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without the shared datasets, skip (with the reason) each test whose code or fixtures name them."""
    if PBC.is_dir():
        return
    for item in items:
        if _names_shared_data(item):
            item.add_marker(pytest.mark.skip(reason=SHARED_MISSING))


def _names_shared_data(item: pytest.Item) -> bool:
    functions: list[Callable] = [getattr(item, "function", None)]
    fixture_info = getattr(item, "_fixtureinfo", None)  # pytest's record of the fixtures the test uses, transitively
    if fixture_info is not None:
        functions += [d.func for defs in fixture_info.name2fixturedefs.values() for d in defs]
    return any(_SHARED_NAMES & set(_global_names(f.__code__)) for f in functions if hasattr(f, "__code__"))


def _global_names(code: CodeType) -> Iterator[str]:
    """Names a function's code reads, its nested comprehensions and lambdas included."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _global_names(const)


def pbc_files(cls: str, n: int, offset: int = 0) -> list[Path]:
    """The first ``n`` real PBC images of a class (sorted, skipping ``offset``), excluding the broken file."""
    require_shared()
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
