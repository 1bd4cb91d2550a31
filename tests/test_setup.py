"""Setting up and testing a fresh clone as a new user would: a Python without its venv module (Debian, Ubuntu) gets a
message that names the package to install, and a clone without ../shared skips the tests that need it, with the
reason, instead of crashing at collection."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_without_the_shared_datasets_tests_skip_with_the_reason(tmp_path: Path) -> None:
    """test_onnx.py reads PBC images while it is imported; test_trust_fisher.py has one test on no data at all."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests/test_onnx.py",
            "tests/test_trust_fisher.py",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "WBC_SHARED": str(tmp_path)},
    )
    summary = result.stdout.splitlines()[-1]
    assert result.returncode == 0, result.stdout[-3000:]
    assert "error" not in summary and "failed" not in summary and "passed" in summary, summary
    assert f"needs the shared datasets, not found at {tmp_path / 'datasets' / 'pbc-wbc'}" in result.stdout
    assert "WBC_SHARED" in result.stdout  # the message says how to point the tests at the datasets


def test_setup_names_the_missing_venv_package(tmp_path: Path) -> None:
    """A Python like Debian's without python3-venv: `python3 -m venv` fails, `import ensurepip` fails."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    python = tmp_path / "python3"
    python.write_text(f"""#!/bin/sh
case "$*" in
    *ensurepip*|*venv*) echo "The virtual environment was not created successfully because ensurepip is not available." >&2
                        exit 1 ;;
esac
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    result = subprocess.run(
        ["bash", "scripts/setup.sh"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(python)},
    )
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert result.returncode == 1, result.stderr
    assert f"apt-get install python{version}-venv" in result.stderr and "PYTHON=" in result.stderr, result.stderr
    assert not (tmp_path / ".venv").exists()


def test_package_metadata_has_an_spdx_license_and_no_deprecation(tmp_path: Path) -> None:
    """The project table as setuptools builds it (the installed setuptools, as `pip install .` would use)."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "src" / "wbc_trust").mkdir(parents=True)
    (tmp_path / "src" / "wbc_trust" / "__init__.py").write_text("")
    (tmp_path / "meta").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; "
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))",
            str(tmp_path / "meta"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    metadata = (tmp_path / "meta" / result.stdout.split()[-1] / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata.splitlines()
    assert "deprecated" not in result.stderr.lower(), result.stderr
