"""``wbc predict --ray local`` and ``wbc count --ray local``: a real local Ray cluster (two actors) gives the local
CSV (and count folder) row for row, unreadable file and input order included; without Ray, ``--ray`` says how to
install it."""

from __future__ import annotations

import csv
import filecmp
import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import CORRUPT_FILE, SHARED, pbc_files
from test_cli import wbc

from wbc_trust.cli import main
from wbc_trust.count import run_count
from wbc_trust.distributed_predict import cpus_per_actor
from wbc_trust.errors import WbcError
from wbc_trust.predict import Predictor

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed (pip install 'wbc-trust[ray]', also part of the dev extra)",
)


def assert_same_rows(on_ray: list[dict[str, str]], local: list[dict[str, str]]) -> None:
    """The same rows in the same order, every column the same string, except that ``ood_score`` (~1e3-1e4, printed
    to 0.01) may differ by one in its last printed digit: it is a distance over 1,280 float32 features, and an
    actor's torch (other threads, another process) can sum them in another order. CI saw 4087.40 against 4087.41
    when the distance itself was summed in float32 (it is float64 now, ``ood.MahalanobisOOD.score``), so a
    rounding step away is all that is allowed."""
    assert len(on_ray) == len(local) > 0
    for ray_row, local_row in zip(on_ray, local):
        assert {**ray_row, "ood_score": ""} == {**local_row, "ood_score": ""}
        if local_row["ood_score"]:
            assert float(ray_row["ood_score"]) == pytest.approx(float(local_row["ood_score"]), rel=0, abs=0.0101)


@needs_ray
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
    rows = list(csv.DictReader((tmp_path / "ray.csv").open()))
    assert_same_rows(rows, list(csv.DictReader((tmp_path / "local.csv").open())))
    assert [r["path"] for r in rows] == list(map(str, files))
    assert rows[3]["flag"].startswith("unreadable") and rows[3]["prediction"] == ""
    assert [r["prediction"] for r in rows if r["prediction"]] == ["neutrophil", "basophil"] * 4


@needs_ray
def test_ray_count_gives_the_local_count_folder(tmp_path: Path) -> None:
    # Real smear fields, not in sorted order, the broken file second: 4 files over 2 actors are two batches.
    fields = sorted((SHARED / "bccd-fields" / "JPEGImages").glob("*.jpg"))[:3]
    files = [fields[2], CORRUPT_FILE, fields[0], fields[1]]
    on_ray = wbc("count", *map(str, files), "--out", str(tmp_path / "ray"), "--ray", "local", "--ray-actors", "2")
    assert on_ray.returncode == 0, on_ray.stderr
    run_count(files, tmp_path / "local", progress=False)  # what `wbc count FILES --out` (no --ray) writes
    images = list(csv.DictReader((tmp_path / "ray" / "images.csv").open()))
    assert [r["image"] for r in images] == list(map(str, files))
    assert images[1]["flag"].startswith("unreadable") and images[1]["n_cells"] == "0"
    cells = list(csv.DictReader((tmp_path / "ray" / "cells.csv").open()))
    local_cells = list(csv.DictReader((tmp_path / "local" / "cells.csv").open()))
    assert len(cells) == sum(int(r["n_cells"]) for r in images) > 0
    assert_same_rows(cells, local_cells)
    # the rest of the folder: images.csv, the differential, the annotated fields, the gallery crops and the report
    ray_files = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*") if p.is_file())
    local_files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert ray_files == local_files and len(list((tmp_path / "ray" / "annotated").iterdir())) == 3
    rest = [str(p) for p in ray_files if p.name != "cells.csv"]
    _, differ, errors = filecmp.cmpfiles(tmp_path / "ray", tmp_path / "local", rest, shallow=False)
    assert not differ and not errors, (differ, errors)


def test_ray_missing_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails exactly as on a machine without Ray
    monkeypatch.setattr(sys, "argv", ["wbc", "predict", "--ray", "local", str(pbc_files("monocyte", 1)[0])])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("error: --ray needs Ray Data"), err
    assert err.rstrip().endswith("pip install 'wbc-trust[ray]'"), err  # the brackets survive Rich


def test_count_without_ray_says_so_before_writing_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    field = sorted((SHARED / "bccd-fields" / "JPEGImages").glob("*.jpg"))[0]
    monkeypatch.setattr(sys, "argv", ["wbc", "count", "--ray", "local", str(field), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: --ray needs Ray Data"), err
    assert not (tmp_path / "out").exists()


def test_actors_get_an_equal_share_that_fits_on_the_nodes() -> None:
    assert cpus_per_actor([2], 2) == 1
    assert cpus_per_actor([16], 2) == 8
    assert cpus_per_actor([8, 8, 8, 8], 2) == 8  # an actor lives on one node: 16 CPUs each would never be scheduled
    assert cpus_per_actor([1, 1, 4], 3) == 1  # 2 each would fit only two actors
    with pytest.raises(WbcError, match="--ray-actors 2 or fewer"):
        cpus_per_actor([2], 3)
