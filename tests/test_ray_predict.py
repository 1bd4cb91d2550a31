"""``wbc predict --ray local``: a real local Ray cluster (two actors) gives the local CSV byte for byte, unreadable
file and input order included; without Ray, ``--ray`` says how to install it."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import CORRUPT_FILE, pbc_files
from test_cli import wbc

from wbc_trust.cli import main
from wbc_trust.distributed_predict import cpus_per_actor
from wbc_trust.errors import WbcError
from wbc_trust.predict import Predictor


@pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed (pip install 'wbc-trust[ray]', also part of the dev extra)",
)
def test_ray_local_gives_the_local_csv_row_for_row(tmp_path: Path) -> None:
    # Classes interleaved and the broken file in the middle: sorting by path or by class would change the order,
    # and 9 files over 2 actors are two batches, so the rows come back from two processes.
    files = [f for pair in zip(pbc_files("neutrophil", 4), pbc_files("basophil", 4)) for f in pair]
    files.insert(3, CORRUPT_FILE)
    on_ray = wbc("predict", *map(str, files), "--csv", str(tmp_path / "ray.csv"), "--ray", "local", "--ray-actors", "2")
    assert on_ray.returncode == 0, on_ray.stderr
    # The local run in this process: what `wbc predict FILES --csv` (no --ray) computes and writes.
    predictor = Predictor()
    predictor.write_csv(predictor.predict_files(files, progress=False), tmp_path / "local.csv")
    assert (tmp_path / "ray.csv").read_text() == (tmp_path / "local.csv").read_text()
    rows = list(csv.DictReader((tmp_path / "ray.csv").open()))
    assert [r["path"] for r in rows] == list(map(str, files))
    assert rows[3]["flag"].startswith("unreadable") and rows[3]["prediction"] == ""
    assert [r["prediction"] for r in rows if r["prediction"]] == ["neutrophil", "basophil"] * 4


def test_ray_missing_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails exactly as on a machine without Ray
    monkeypatch.setattr(sys, "argv", ["wbc", "predict", "--ray", "local", str(pbc_files("monocyte", 1)[0])])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("error: --ray needs Ray Data"), err
    assert err.rstrip().endswith("pip install 'wbc-trust[ray]'"), err  # the brackets survive Rich


def test_actors_get_an_equal_share_that_fits_on_the_nodes() -> None:
    assert cpus_per_actor([2], 2) == 1
    assert cpus_per_actor([16], 2) == 8
    assert cpus_per_actor([8, 8, 8, 8], 2) == 8  # an actor lives on one node: 16 CPUs each would never be scheduled
    assert cpus_per_actor([1, 1, 4], 3) == 1  # 2 each would fit only two actors
    with pytest.raises(WbcError, match="--ray-actors 2 or fewer"):
        cpus_per_actor([2], 3)
