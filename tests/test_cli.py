"""The `wbc` command as a user runs it: exit codes, one-line errors, files written. Real subprocesses, except for
the bad-input cases: those run ``cli.main`` (what the ``wbc`` script calls) with their arguments in this process,
since each fresh interpreter spends ~7 s importing torch before it can refuse the input; one case also runs as a
subprocess."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CORRUPT_FILE, make_tree, pbc_files

from wbc_trust.cli import main

ROOT = Path(__file__).resolve().parents[1]


def wbc(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wbc_trust.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def wbc_here(
    *args: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int | str | None, str]:
    """``wbc ARGS`` through ``cli.main`` in this process: its exit code and what it wrote to stderr."""
    monkeypatch.setattr(sys, "argv", ["wbc", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


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


def _bad_input_command(tmp_path: Path, case: str) -> list[str]:
    """The command line of one BAD_INPUT case, with the folder it reads made in ``tmp_path``."""
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
    return command


def _assert_one_line_error(code: int | str | None, stderr: str, case: str) -> None:
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert BAD_INPUT[case] in lines[0], lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_one_line_error_exit_2(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    command = _bad_input_command(tmp_path, case)
    _assert_one_line_error(*wbc_here(*command, monkeypatch=monkeypatch, capsys=capsys), case)


def test_bad_input_in_a_fresh_process_is_one_line_too(tmp_path: Path) -> None:
    result = wbc(*_bad_input_command(tmp_path, "missing-class"))
    _assert_one_line_error(result.returncode, result.stderr, "missing-class")


def test_seed_scripts_are_thin_wrappers(tmp_path: Path) -> None:
    image = pbc_files("basophil", 1)[0]
    result = subprocess.run(
        [sys.executable, "test_model.py", "--image", str(image)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "basophil" in result.stdout
