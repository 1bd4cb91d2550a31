"""`wbc count` on real data: field-level accuracy on bccd-fields, BCCD crop accuracy before/after the new crop, fields/s.

    python bench/count.py                      # all three on the shipped model; ~10 min on 2 busy cores
    python bench/count.py --shares 0.3,0.375,0.45,0.55   # which crop share to use (config.COUNT_CELL_SHARE)

1. bccd-fields with a class in labels.csv: the field's most confident white cell (finder score), cropped with
   ``count.crop_cell`` at each share, must name the field's class (the issue's target: ≥ 80 % of fields).
2. bccd-wbc crops (351, the same lab): accuracy of the model on the crop as it is ("before") and on the finder's most
   confident cell in it, re-cropped the new way ("after"; the whole crop where the finder finds no cell).
3. ``run_count`` end to end on the first --n-fields bccd-fields (files written to bench_out/count/run): fields/s.
Writes bench_out/count/count.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from wbc_trust import config
from wbc_trust.count import _lossless_bytes, crop_cell, run_count
from wbc_trust.data import find_dataset, read_image
from wbc_trust.finder import CellFinder
from wbc_trust.predict import Predictor

DATA = ROOT.parent / "shared" / "datasets"
OUT = ROOT / "bench_out" / "count"


def classify(predictor: Predictor, image: Image.Image) -> str | None:
    return predictor.predict_bytes(_lossless_bytes(image)).prediction


def field_accuracy(finder: CellFinder, predictor: Predictor, shares: list[float]) -> dict:
    """Share of labelled bccd-fields whose most confident white cell is classified as the field's class, per share."""
    with open(DATA / "bccd-fields" / "labels.csv", newline="") as f:
        labelled = [(DATA / "bccd-fields" / r["image"], r["wbc_class"]) for r in csv.DictReader(f) if r["wbc_class"]]
    right = {s: 0 for s in shares}
    no_cell = 0
    for path, truth in tqdm(labelled, desc="bccd-fields", unit="field"):
        image = read_image(path)
        cells = finder.find(image).cells
        if not cells:
            no_cell += 1
            continue
        for share in shares:
            right[share] += classify(predictor, crop_cell(image, cells[0].box, share, predictor.img_size)) == truth
    return {
        "fields": len(labelled),
        "no_cell_found": no_cell,
        "accuracy_by_share": {str(s): right[s] / len(labelled) for s in shares},
    }


def crop_accuracy(finder: CellFinder, predictor: Predictor, share: float) -> dict:
    """bccd-wbc: the crop as it is vs the finder's most confident cell re-cropped at ``share``."""
    index = find_dataset(DATA / "bccd-wbc")
    records = index.splits["all"]
    before = after = not_found = 0
    for record in tqdm(records, desc="bccd-wbc", unit="crop"):
        image = read_image(record.path)
        truth = config.CLASSES[record.label]
        before += classify(predictor, image) == truth
        cells = finder.find(image).cells
        if cells:
            image = crop_cell(image, cells[0].box, share, predictor.img_size)
        else:
            not_found += 1
        after += classify(predictor, image) == truth
    return {
        "crops": len(records),
        "accuracy_before": before / len(records),
        "accuracy_after": after / len(records),
        "no_cell_found": not_found,
        "share": share,
    }


def throughput(n_fields: int) -> dict:
    fields = sorted((DATA / "bccd-fields" / "JPEGImages").glob("*.jpg"))[:n_fields]
    start = time.perf_counter()
    summary = run_count(fields, OUT / "run", progress=False)
    seconds = time.perf_counter() - start
    return {
        "fields": len(fields),
        "seconds": seconds,
        "fields_per_s": len(fields) / seconds,
        "cells": summary.n_cells,
        "flagged": summary.n_flagged,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", default=str(config.COUNT_CELL_SHARE), help="comma-separated crop shares to try")
    parser.add_argument("--n-fields", type=int, default=50, help="fields for the throughput run")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: fields, crops, throughput")
    args = parser.parse_args()
    import torch

    # One thread: on the shared 2-core machine (load 8–15) one forward pass took 2.0 s with 2 threads (OpenMP
    # threads waiting on each other) and 0.21 s with 1.
    torch.set_num_threads(1)
    shares = [float(s) for s in args.shares.split(",")]
    skip = set(args.skip.split(","))
    finder, predictor = CellFinder(), Predictor()
    report: dict = {"model": str(config.DEFAULT_MODEL_PATH.name)}
    if "fields" not in skip:
        report["bccd_fields"] = field_accuracy(finder, predictor, shares)
        print("bccd-fields field-level accuracy by crop share:", report["bccd_fields"])
    if "crops" not in skip:
        report["bccd_wbc_crops"] = crop_accuracy(finder, predictor, config.COUNT_CELL_SHARE)
        print("bccd-wbc crops:", report["bccd_wbc_crops"])
    if "throughput" not in skip:
        report["throughput"] = throughput(args.n_fields)
        print("wbc count throughput:", report["throughput"])
    OUT.mkdir(parents=True, exist_ok=True)
    previous = json.loads((OUT / "count.json").read_text()) if (OUT / "count.json").exists() else {}
    (OUT / "count.json").write_text(json.dumps({**previous, **report}, indent=2) + "\n")
    print(f"written: {OUT / 'count.json'}")


if __name__ == "__main__":
    main()
