"""The data-quality audit finds the real defects of PBC (on a copied subset that contains them) and nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import CONFLICTING_PAIR, CORRUPT_FILE, PBC, make_tree
from typer.testing import CliRunner

from wbc_trust.cli import app
from wbc_trust.trust.audit import run_audit

#: A real byte-identical pair filed under the same label, and a real near-duplicate pair (the same cell, shifted).
SAME_CLASS_COPIES = (PBC / "basophil" / "BA_20201.jpg", PBC / "basophil" / "BA_809918.jpg")
NEAR_DUPLICATES = (PBC / "eosinophil" / "EO_246684.jpg", PBC / "eosinophil" / "EO_409717.jpg")


@pytest.fixture(scope="module")
def defect_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 ordinary PBC images per class plus every kind of real defect PBC contains."""
    root = make_tree(tmp_path_factory.mktemp("audit"), 12)
    for src in (CORRUPT_FILE, *CONFLICTING_PAIR, *SAME_CLASS_COPIES, *NEAR_DUPLICATES):
        shutil.copy(src, root / src.parent.name / src.name)
    return root


@pytest.fixture(scope="module")
def audited(defect_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("audit_out")
    return run_audit(defect_tree, out), out


def _paths(group: dict) -> set[str]:
    return {f["path"] for f in group["files"]}


def test_audit_lists_the_file_that_is_not_an_image(audited: tuple[dict, Path]) -> None:
    result, _ = audited
    assert [u["path"] for u in result["unreadable"]] == ["neutrophil/.DS_169665.jpg"]
    assert "not an image" in result["unreadable"][0]["reason"]
    assert result["n_readable"] == result["n_files"] - 1


def test_audit_finds_exact_duplicates_and_the_conflicting_pair(audited: tuple[dict, Path]) -> None:
    result, _ = audited
    conflicting = {f"{p.parent.name}/{p.name}" for p in CONFLICTING_PAIR}
    same_class = {f"{p.parent.name}/{p.name}" for p in SAME_CLASS_COPIES}
    groups = [_paths(g) for g in result["exact_duplicates"]]
    assert sorted(groups, key=sorted) == sorted([conflicting, same_class], key=sorted)
    assert [_paths(g) for g in result["conflicting_labels"]] == [conflicting]
    assert result["conflicting_labels"][0]["labels"] == ["eosinophil", "neutrophil"]


def test_audit_finds_the_near_duplicate_and_no_chance_matches(audited: tuple[dict, Path]) -> None:
    """Only the shifted copy of one cell is a near-duplicate: 60 ordinary cells must not match each other, and
    byte-identical pairs are reported as exact duplicates, not again as near-duplicates."""
    result, _ = audited
    assert [_paths(p) for p in result["near_duplicates"]] == [{f"{p.parent.name}/{p.name}" for p in NEAR_DUPLICATES}]
    assert result["near_duplicates"][0]["same_label"]


def test_audit_counts_classes_and_writes_its_files(audited: tuple[dict, Path]) -> None:
    result, out = audited
    assert result["class_counts"] == {
        "basophil": 14,
        "eosinophil": 15,
        "lymphocyte": 12,
        "monocyte": 12,
        "neutrophil": 13,
    }
    assert json.loads((out / "audit.json").read_text())["class_counts"] == result["class_counts"]
    assert (out / "class_balance.png").stat().st_size > 5_000


def test_wbc_audit_command_prints_the_defects(defect_tree: Path, tmp_path: Path) -> None:
    done = CliRunner().invoke(app, ["audit", str(defect_tree), "--out", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert ".DS_169665.jpg" in done.output and "BNE_191112.jpg" in done.output and "EO_225902.jpg" in done.output
    assert "duplicates under different labels: 1" in done.output
    assert (tmp_path / "audit.json").exists()


def test_audit_of_a_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    from wbc_trust.errors import WbcError

    with pytest.raises(WbcError, match="does not exist"):
        run_audit(tmp_path / "nope", tmp_path / "out")
