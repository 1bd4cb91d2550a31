"""Scaling out on this machine: ``wbc predict`` in one process against ``wbc predict --ray local`` (an actor pool),
``wbc train`` under ``torchrun`` with 1 against 2 processes, and (optional) ``wbc count`` against ``wbc count --ray``.

Each run is a fresh ``wbc predict FILES --csv OUT`` subprocess, as a user runs it, so the times include starting
Python, loading the model and (with ``--ray``) starting a Ray cluster and its actors. Each is run on a small and a
large set of the same real PBC images: the difference gives the marginal rate (images/s once everything is up),
the small run the fixed cost. The two CSVs of the large set must be identical. Last, the per-image cost of the two
halves of a prediction (decoding + resizing a JPEG; the network's forward pass with its test-time flips) is measured
on one thread, for the paper estimate of more workers and GPUs in the README.

Training: ``torchrun --standalone --nproc-per-node N -m wbc_trust.cli train`` (gloo on CPU) of the default recipe for
2 epochs on a small real tree (``--train-per-class`` PBC images per class), N = 1 and 2. The rate is the second
epoch's: training images / (its seconds, validation by rank 0 included), from ``history.json``.

Counting (``--count-fields N``, off by default): ``wbc count FIELDS --out OUT`` on the first N real bccd-fields, in
one process and with ``--ray local``, each also on the first ``--count-small`` fields for the fixed cost; fields/s,
and whether the two cells.csv/images.csv/differential.csv are identical (the actors' torch runs fewer threads, so
``ood_score``, printed to float32's 7 digits, can differ in its last one: its largest relative difference is shown).

    python bench/scale_out.py [--images 500] [--small 10] [--actors 2] [--train-per-class 60]  # ~6 min on 2 cores
    python bench/scale_out.py --images 0 --train-per-class 0 --count-fields 40  # the count part alone, ~4 min

On 2 cores, 2 actors (or processes) of one thread each do the same work as one process with two threads: expect
overhead (Ray's start, one model per actor, rows through the object store; DDP's gradient all-reduce), not a speed-up.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import chain, zip_longest
from pathlib import Path

import torch

from wbc_trust import config
from wbc_trust.modelfile import read_metadata
from wbc_trust.predict import Predictor

DATASETS = Path(os.environ.get("WBC_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "datasets"
SHARED = DATASETS / "pbc-wbc"
FIELDS = DATASETS / "bccd-fields" / "JPEGImages"


def pbc_images(n: int) -> list[Path]:
    """``n`` real PBC images, the classes taken in turn (sorted within each class; hidden files skipped)."""
    per_class = [sorted(p for p in (SHARED / c).iterdir() if not p.name.startswith(".")) for c in config.CLASSES]
    return [p for p in chain.from_iterable(zip_longest(*per_class)) if p is not None][:n]


def run_predict(files: list[Path], csv: Path, ray_actors: int | None) -> float:
    """Wall seconds of one ``wbc predict`` subprocess (with ``--ray local`` when ``ray_actors`` is given)."""
    command = [sys.executable, "-m", "wbc_trust.cli", "predict", *map(str, files), "--csv", str(csv)]
    if ray_actors:
        command += ["--ray", "local", "--ray-actors", str(ray_actors)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def run_count(fields: list[Path], out: Path, ray_actors: int | None) -> float:
    """Wall seconds of one ``wbc count`` subprocess (with ``--ray local`` when ``ray_actors`` is given)."""
    command = [sys.executable, "-m", "wbc_trust.cli", "count", *map(str, fields), "--out", str(out)]
    if ray_actors:
        command += ["--ray", "local", "--ray-actors", str(ray_actors)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def per_image_costs(files: list[Path]) -> dict[str, float]:
    """Milliseconds per image on one thread: decoding + resizing, and the forward pass (a batch of 64, with flips)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictor = Predictor()
        start = time.perf_counter()
        images = torch.stack([predictor.to_tensor(p) for p in files])
        decode = (time.perf_counter() - start) / len(files)
        predictor.probabilities(images[:8])  # warm-up: oneDNN builds its kernels on the first call
        start = time.perf_counter()
        predictor.probabilities(images)
        forward = (time.perf_counter() - start) / len(files)
    finally:
        torch.set_num_threads(threads)
    return {"decode_ms": decode * 1000, "forward_ms": forward * 1000}


def train_rate(tree: Path, out: Path, processes: int) -> dict[str, float]:
    """One 2-epoch ``wbc train`` under torchrun: the world size it records, wall seconds, second-epoch images/s.
    Each process gets an equal share of the cores as its torch threads (OMP_NUM_THREADS), as Ray gives its actors."""
    command = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc-per-node",
        str(processes),
        "-m",
        "wbc_trust.cli",
        "train",
        "--data",
        str(tree),
        "--out",
        str(out),
        "--epochs",
        "2",
    ]
    threads = str(max(1, (os.cpu_count() or 1) // processes))
    start = time.perf_counter()
    # own decode cache per run: both runs decode the images (wall time), neither reads the other's cache
    env = {**os.environ, "OMP_NUM_THREADS": threads, "WBC_CACHE_DIR": str(out.with_name(out.name + "-cache"))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"torchrun wbc train ({processes} processes) failed:\n{done.stderr[-3000:]}")
    world_size = read_metadata(out / "model.safetensors")["training"]["world_size"]
    history = json.loads((out / "history.json").read_text())
    n_train = len(json.loads((out / "split.json").read_text())["train"])
    epoch_seconds = history[1]["seconds"] - history[0]["seconds"]
    return {
        "world_size": world_size,
        "wall_seconds": wall,
        "train_images": n_train,
        "epoch2_seconds": epoch_seconds,
        "images_per_s": n_train / epoch_seconds,
    }


def copy_tree(root: Path, per_class: int) -> Path:
    """A class-folder tree of the first ``per_class`` real PBC images of each class."""
    for cls in config.CLASSES:
        (root / cls).mkdir(parents=True)
        for src in sorted(p for p in (SHARED / cls).iterdir() if not p.name.startswith("."))[:per_class]:
            shutil.copy(src, root / cls / src.name)
    return root


def save(report: dict, out: Path) -> None:
    """results.json, rewritten after each part (a failing training part keeps the prediction figures)."""
    out.mkdir(parents=True, exist_ok=True)
    temp = out / "results.json.tmp"
    temp.write_text(json.dumps({**report, "load_average": os.getloadavg()}, indent=2))
    temp.replace(out / "results.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500, help="images of the large run (0: skip prediction)")
    parser.add_argument("--small", type=int, default=10, help="images of the small run (fixed costs)")
    parser.add_argument("--actors", type=int, default=config.RAY_ACTORS, help="Ray actors")
    parser.add_argument(
        "--train-per-class", type=int, default=60, help="images per class of the training tree (0: skip training)"
    )
    parser.add_argument(
        "--count-fields", type=int, default=0, help="bccd fields of the large wbc count run (0: skip counting)"
    )
    parser.add_argument("--count-small", type=int, default=4, help="fields of the small wbc count run (fixed costs)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/scale_out"), help="folder for results.json")
    args = parser.parse_args()
    command = f"python {shlex.join(sys.argv)}"
    # a run of one part (--images 0 or --train-per-class 0) keeps the other part's figures of an earlier run
    earlier = args.out / "results.json"
    report: dict = json.loads(earlier.read_text()) if earlier.exists() else {}
    report.update({"cpus": os.cpu_count(), "command": command})
    if args.images:
        predict_part(args, report)
    if args.train_per_class:
        train_part(args, report)
    if args.count_fields:
        count_part(args, report)
    print(f"load average at the end (the machine is shared): {os.getloadavg()[0]:.1f}")
    print(f"command: {command}")
    if args.images and not report["same_csv"]:
        sys.exit("the --ray CSV differs from the local one")
    if args.count_fields and not report["count"]["same_but_ood_score"]:
        sys.exit("the wbc count --ray cells.csv differs from the local one")


def predict_part(args: argparse.Namespace, report: dict) -> None:
    """1 process against Ray: wall times, rates, identical CSVs, per-image costs; into ``report`` and results.json."""
    large, small = pbc_images(args.images), pbc_images(args.small)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, actors in (("1 process", None), (f"Ray, {args.actors} actors", args.actors)):
            t_small = run_predict(small, Path(tmp) / "small.csv", actors)
            t_large = run_predict(large, Path(tmp) / f"{bool(actors)}.csv", actors)
            results[name] = {
                "seconds_small": t_small,
                "seconds_large": t_large,
                "images_per_s": len(large) / t_large,
                "marginal_images_per_s": (len(large) - len(small)) / (t_large - t_small),
            }
        same_csv = (Path(tmp) / "False.csv").read_text() == (Path(tmp) / "True.csv").read_text()
    costs = per_image_costs(large[:64])
    report.update(
        {
            "images": len(large),
            "small": len(small),
            "predict": results,
            "same_csv": same_csv,
            "per_image_one_thread": costs,
            "predict_command": report["command"],
        }
    )
    save(report, args.out)
    print(
        f"wbc predict on {len(large)} (and {len(small)}) real PBC images, {os.cpu_count()} CPUs, "
        f"default model; each run a fresh subprocess"
    )
    print(
        f"{'':<18}{'s (' + str(len(small)) + ')':>10}{'s (' + str(len(large)) + ')':>10}{'images/s':>10}"
        f"{'marginal':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:<18}{r['seconds_small']:>10.1f}{r['seconds_large']:>10.1f}{r['images_per_s']:>10.1f}"
            f"{r['marginal_images_per_s']:>10.1f}"
        )
    print(f"CSV of --ray identical to the local one: {same_csv}")
    print(
        f"per image on one thread: decode + resize {costs['decode_ms']:.1f} ms, forward (with test-time flips) "
        f"{costs['forward_ms']:.1f} ms",
        flush=True,
    )


def train_part(args: argparse.Namespace, report: dict) -> None:
    """torchrun with 1 and 2 processes on the same tree; into ``report`` and results.json."""
    training: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tree = copy_tree(Path(tmp) / "tree", args.train_per_class)
        for n in (1, 2):
            training[f"{n} process{'es' if n > 1 else ''}"] = train_rate(tree, Path(tmp) / f"run{n}", n)
    report["train"] = {"per_class": args.train_per_class, "epochs": 2, "command": report["command"], **training}
    save(report, args.out)
    print(f"torchrun wbc train, default recipe, 2 epochs, {args.train_per_class} images per class")
    print(f"{'':<18}{'world':>6}{'wall s':>9}{'epoch 2 s':>11}{'images/s':>10}")
    for name, r in training.items():
        print(
            f"{name:<18}{r['world_size']:>6}{r['wall_seconds']:>9.1f}{r['epoch2_seconds']:>11.1f}"
            f"{r['images_per_s']:>10.1f}"
        )


def count_part(args: argparse.Namespace, report: dict) -> None:
    """``wbc count`` in 1 process against Ray: wall times, fields/s, identical CSVs; into ``report`` and results.json."""
    fields = sorted(FIELDS.glob("*.jpg"))
    large, small = fields[: args.count_fields], fields[: args.count_small]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, actors in (("1 process", None), (f"Ray, {args.actors} actors", args.actors)):
            t_small = run_count(small, Path(tmp) / "small", actors)
            t_large = run_count(large, Path(tmp) / f"ray{bool(actors)}", actors)
            results[name] = {
                "seconds_small": t_small,
                "seconds_large": t_large,
                "fields_per_s": len(large) / t_large,
                "marginal_fields_per_s": (len(large) - len(small)) / (t_large - t_small),
            }
        identical = {
            f: (Path(tmp) / "rayFalse" / f).read_text() == (Path(tmp) / "rayTrue" / f).read_text()
            for f in ("cells.csv", "images.csv", "differential.csv")
        }
        ood = ood_difference(Path(tmp) / "rayFalse" / "cells.csv", Path(tmp) / "rayTrue" / "cells.csv")
    same = all(identical.values())
    report["count"] = {
        "fields": len(large),
        "small": len(small),
        **results,
        "same_files": same,
        "same_but_ood_score": ood is not None and identical["images.csv"] and identical["differential.csv"],
        "ood_score_max_relative_difference": ood,
        "command": report["command"],
    }
    save(report, args.out)
    print(f"wbc count on {len(large)} (and {len(small)}) real bccd fields, {os.cpu_count()} CPUs; fresh subprocesses")
    print(
        f"{'':<18}{'s (' + str(len(small)) + ')':>10}{'s (' + str(len(large)) + ')':>10}{'fields/s':>10}{'marginal':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:<18}{r['seconds_small']:>10.1f}{r['seconds_large']:>10.1f}{r['fields_per_s']:>10.2f}"
            f"{r['marginal_fields_per_s']:>10.2f}"
        )
    print(f"cells.csv, images.csv, differential.csv of --ray identical to the local ones: {same}")
    if ood is None:
        print("cells.csv of --ray differs from the local one in other columns than ood_score", flush=True)
    else:
        print(
            "cells.csv the same in every other column; ood_score's largest relative difference (float32 sums in "
            f"another order: the actors run fewer torch threads): {ood:.1e}",
            flush=True,
        )


def ood_difference(local: Path, ray: Path) -> float | None:
    """The largest relative difference of ``ood_score`` between two cells.csv, or None when they differ elsewhere."""
    with local.open(newline="") as a, ray.open(newline="") as b:
        rows = list(zip_longest(csv.DictReader(a), csv.DictReader(b)))
    if any(x is None or y is None or {**x, "ood_score": ""} != {**y, "ood_score": ""} for x, y in rows):
        return None
    return max((abs(float(x["ood_score"]) / float(y["ood_score"]) - 1) for x, y in rows), default=0.0)


if __name__ == "__main__":
    main()
