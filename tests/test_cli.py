"""The `wbc` command as a user runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CORRUPT_FILE, make_tree, pbc_files

ROOT = Path(__file__).resolve().parents[1]


def wbc(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wbc_trust.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_predict_folder_with_a_broken_file_exits_0_and_writes_csv(tmp_path: Path, tiny_run: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for src in pbc_files("lymphocyte", 2) + [CORRUPT_FILE]:
        shutil.copy(src, folder / src.name)
    result = wbc(
        "predict", str(folder), "--model", str(tiny_run / "model.safetensors"), "--csv", str(tmp_path / "p.csv")
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 3 and sum(r["flag"].startswith("unreadable") for r in rows) == 1


def test_predict_nothing_readable_exits_non_zero(tmp_path: Path, tiny_run: Path) -> None:
    result = wbc("predict", str(CORRUPT_FILE), "--model", str(tiny_run / "model.safetensors"))
    assert result.returncode == 2 and "none of the files" in result.stderr


#: Per case: what the one error line must name (the problem itself, not some other complaint about the input).
BAD_INPUT = {
    "no-class-folders": "no class folders in",
    "missing-class": "basophil missing or empty",
    "empty": "no class folders in",
    "not-there": "does not exist",
    "wrong-model": "not a safetensors model file",
    "bad-view": "unknown view(s) rotate45",
    "bad-augment": "unknown --augment 'heavy'",
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_one_line_error_exit_2(tmp_path: Path, case: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    extra: list[str] = []
    if case == "no-class-folders":
        shutil.copy(pbc_files("basophil", 1)[0], data / "x.jpg")
    elif case == "missing-class":
        make_tree(data, 2)
        shutil.rmtree(data / "basophil")
    elif case == "not-there":
        data = tmp_path / "absent"
    elif case in ("wrong-model", "bad-view", "bad-augment"):  # valid data: only the option itself is wrong
        make_tree(data, 2)
    if case == "wrong-model":
        bad = tmp_path / "model.safetensors"
        bad.write_bytes(b"\x00" * 64)
        extra = ["--model", str(bad)]
    command = ["evaluate", "--data", str(data), "--out", str(tmp_path / "o"), *extra]
    if case == "missing-class":
        command = ["train", "--data", str(data), "--out", str(tmp_path / "o"), "--arch", "cnn"]
    quick = ["--arch", "cnn", "--epochs", "1", "--img-size", "32"]  # were the option accepted, a short run
    if case == "bad-augment":
        command = ["train", "--data", str(data), "--out", str(tmp_path / "o"), *quick, "--augment", "heavy"]
    if case == "bad-view":
        command = [
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            *quick,
            "--test-views",
            "identity,rotate45",
        ]
    result = wbc(*command)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert BAD_INPUT[case] in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_seed_scripts_are_thin_wrappers(tmp_path: Path) -> None:
    image = pbc_files("basophil", 1)[0]
    result = subprocess.run(
        [sys.executable, "test_model.py", "--image", str(image)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "basophil" in result.stdout
