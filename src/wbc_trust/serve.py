"""Serving the web app: the one Streamlit command line that ``wbc app``, the Docker image, the tests and the load
benchmark all use, and a context manager that runs it in the background until it is healthy.

Kept apart from ``app.py`` so that starting the server does not import torch and Streamlit's caches first.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from wbc_trust import config

#: The Streamlit script of the app (the same page as ``app_streamlit.py`` in the repository root).
APP_SCRIPT = Path(__file__).resolve().with_name("app.py")
#: Debian's Chromium, which the browser tests and the load benchmark drive headless through Playwright, and flags that
#: keep it off the network and working without a GPU or a sandbox (CI containers).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def streamlit_command(
    port: int = config.APP_PORT,
    address: str = "localhost",
    model: Path | None = None,
    models_dir: Path | None = None,
    influence_index: Path | None = None,
    allow_server_paths: bool = False,
) -> list[str]:
    """The command that serves this app (``wbc app``, the Docker image, the tests), with the options of config.py.
    ``allow_server_paths`` lets visitors type server folders and index paths into the page (off by default: with
    ``--address 0.0.0.0`` any visitor could browse the server's model files)."""
    options = [
        f"--{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in config.APP_STREAMLIT_OPTIONS.items()
    ]
    script_args = [
        f"--{name}={value}"
        for name, value in (("model", model), ("models-dir", models_dir), ("influence-index", influence_index))
        if value
    ]
    script_args += ["--allow-server-paths"] if allow_server_paths else []
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_SCRIPT),
        f"--server.port={port}",
        f"--server.address={address}",
        *options,
        "--",
        *script_args,
    ]


def free_port() -> int:
    """A localhost TCP port nobody listens on right now (for tests and benchmarks that serve the app)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(
    command: Sequence[str], url: str, log: Path, timeout: float = 120.0, cwd: Path | None = None
) -> Iterator[None]:
    """Run a command that serves the app (in ``cwd``, output to ``log``) until the block ends; enter once ``url`` is
    healthy.

    Health is Streamlit's ``/_stcore/health`` endpoint, the one the Docker HEALTHCHECK polls.
    """
    with open(log, "wb") as out:
        process = subprocess.Popen(list(command), cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(url):
                if process.poll() is not None:
                    raise RuntimeError(f"the app exited with code {process.returncode}: see {log}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the app at {url} was not healthy after {timeout:.0f} s: see {log}")
                time.sleep(0.3)
            yield
        finally:
            process.terminate()
            process.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.read() == b"ok"
    except OSError:
        return False


def launch(
    port: int,
    address: str,
    model: Path | None,
    models_dir: Path | None,
    influence_index: Path | None,
    allow_server_paths: bool = False,
) -> NoReturn:
    """Become the Streamlit server (exec, not a child process: Ctrl+C and Docker's SIGTERM reach it directly)."""
    if model is not None:
        from wbc_trust.modelfile import read_metadata  # imports torch: only when there is a model to check

        read_metadata(model)  # a wrong --model fails here, as one line, instead of inside the browser
    command = streamlit_command(port, address, model, models_dir, influence_index, allow_server_paths)
    os.execv(command[0], command)
