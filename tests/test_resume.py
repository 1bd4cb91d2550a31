"""Interrupted training: a real ``wbc train`` is SIGKILLed in the middle of an epoch, ``--resume`` loses at most that
epoch and finishes with exactly the result of an uninterrupted run; no half-written file is ever left as a model."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tree
from safetensors.torch import load_file

from wbc_trust.errors import WbcError
from wbc_trust.modelfile import load_model, read_metadata
from wbc_trust.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
#: Seed CNN at 64 px, batch 2: an epoch is ~17 steps, so a kill after step 1 of epoch 2 lands mid-epoch.
SETTINGS = {"arch": "cnn", "img_size": 64, "batch_size": 2, "epochs": 2, "seed": 0}
#: A tqdm bar line of epoch 2 with at least one batch done: "epoch 2/2:  12%|█▏   | 2/17 [...".
EPOCH_2_PROGRESS = re.compile(r"epoch 2/2:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("resume_data"), 10)


def wbc_train(data: Path, out: Path, *extra: str) -> list[str]:
    options = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    return [sys.executable, "-m", "wbc_trust.cli", "train", "--data", str(data), "--out", str(out), *options, *extra]


def kill_mid_epoch_2(command: list[str], timeout: float = 300) -> str:
    """Start ``wbc train`` and SIGKILL it as soon as its epoch-2 progress bar shows a finished batch of an unfinished
    epoch; returns everything it printed. TQDM_MININTERVAL=0 makes tqdm report every batch."""
    env = {**os.environ, "TQDM_MININTERVAL": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    output, deadline = "", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            chunk = os.read(proc.stdout.fileno(), 65536).decode(errors="replace") if ready else ""
            if ready and not chunk:
                break  # the process ended by itself: the test below fails
            output += chunk
            if any(1 <= int(done) < int(total) for done, total in EPOCH_2_PROGRESS.findall(chunk)):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"training was not killed mid-epoch:\n{output[-2000:]}"
    return output


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run_and_refuses_other_data(
    tree: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    kill_mid_epoch_2(wbc_train(tree, run))

    # What the kill left: epoch 1 complete and loadable, epoch 2 lost, no half-written file posing as a model.
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert [row["epoch"] for row in json.loads((run / "history.json").read_text())] == [1]
    model, meta = load_model(run / "model.safetensors")
    assert meta["validation"]["epoch"] == 1
    assert [p.name for p in run.glob("*.safetensors")] == ["model.safetensors"]
    assert all(
        p.name.startswith(".") and p.name.endswith(".tmp")
        for p in run.iterdir()
        if p.name not in {"model.safetensors", "checkpoint.pt", "history.json", "curves.png", "split.json"}
    )

    resumed = subprocess.run(wbc_train(tree, run, "--resume"), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch 1" in resumed.stdout

    reference = tmp_path / "reference"
    train(TrainConfig(data=tree, out=reference, **SETTINGS))
    history, expected = (json.loads((d / "history.json").read_text()) for d in (run, reference))
    assert [row["epoch"] for row in history] == [1, 2]
    without_time = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    assert without_time(history) == without_time(expected)
    assert json.loads((run / "test" / "metrics.json").read_text()) == json.loads(
        (reference / "test" / "metrics.json").read_text()
    )
    weights, expected_weights = (load_file(str(d / "model.safetensors")) for d in (run, reference))
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)

    # A checkpoint is tied to its data fingerprint: resuming on other images would silently mix two datasets.
    split = (run / "split.json").read_text()
    other = make_tree(tmp_path / "other", 10, offset=10)
    with pytest.raises(WbcError, match="belongs to other data"):
        train(TrainConfig(data=other, out=run, resume=True, **SETTINGS))
    assert (run / "split.json").read_text() == split


KILLED_WRITER = """
import sys, time
from pathlib import Path
from wbc_trust.io import atomic_write

new_model = Path(sys.argv[2]).read_bytes()

def write_half_then_hang(f):
    f.write(new_model[: len(new_model) // 2])
    f.flush()
    print("half written", flush=True)
    time.sleep(120)

atomic_write(Path(sys.argv[1]), write_half_then_hang)
"""


def test_a_kill_during_a_model_write_leaves_the_previous_model_intact(tiny_run: Path, tmp_path: Path) -> None:
    """save_model and the checkpoint go through data.atomic_write: SIGKILL in the middle of writing the bytes."""
    target = tmp_path / "model.safetensors"
    target.write_bytes((tiny_run / "model.safetensors").read_bytes())
    before = read_metadata(target)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target), str(tiny_run / "checkpoint.pt")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout.readline().strip() == "half written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".model.safetensors.")
    assert leftovers[0].suffix == ".tmp" and 0 < leftovers[0].stat().st_size
    assert read_metadata(target) == before
    load_model(target)
