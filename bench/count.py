"""`wbc count` on real data: field-level accuracy on bccd-fields, BCCD crop accuracy through the model's view, fields/s.

    python bench/count.py [--model M]                    # all three; ~10 min on 2 busy cores
    python bench/count.py --model old.safetensors --skip throughput   # "before": a model of whole frames

1. bccd-fields with a class in labels.csv: the field's most confident white cell (finder score), cut as the model's
   crop policy says (``crop.CropPolicy.cell_view``), must name the field's class (the issue's target: ≥ 80 % of fields).
2. bccd-wbc crops (351, the same lab): accuracy of ``wbc predict`` on each crop, i.e. through the model's view (a
   whole-frame model resizes the crop; a cell model finds the cell and cuts its window at one physical scale). Run it
   with the old and the new model for "before" and "after".
3. ``run_count`` end to end on the first --n-fields bccd-fields (files written to bench_out/count/run): fields/s.
Writes bench_out/count/count.json (one entry per model file name).
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from wbc_trust import config
from wbc_trust.count import run_count
from wbc_trust.crop import CropPolicy
from wbc_trust.data import find_dataset, image_to_tensor, read_image
from wbc_trust.finder import CellFinder
from wbc_trust.predict import Prediction, Predictor

DATA = ROOT.parent / "shared" / "datasets"
OUT = ROOT / "bench_out" / "count"


def field_answers(finder: CellFinder, predictor: Predictor) -> tuple[list[Prediction], list[str]]:
    """The answer for the most confident white cell of each labelled bccd-fields field (an answer without a
    prediction where the finder found none), and each field's class from labels.csv."""
    with open(DATA / "bccd-fields" / "labels.csv", newline="") as f:
        labelled = [(DATA / "bccd-fields" / r["image"], r["wbc_class"]) for r in csv.DictReader(f) if r["wbc_class"]]
    answers = []
    for path, _ in tqdm(labelled, desc="bccd-fields", unit="field"):
        image = read_image(path)
        found = finder.find(image)
        if not found.cells:
            answers.append(Prediction(path.name, None, None))
            continue
        view = predictor.crop.cell_view(image, found, found.cells[0])
        answers.append(predictor.predict_views([path.name], image_to_tensor(view)[None])[0])
    return answers, [truth for _, truth in labelled]


def field_accuracy(finder: CellFinder, predictor: Predictor) -> dict:
    """Share of labelled bccd-fields whose most confident white cell is classified as the field's class."""
    answers, truths = field_answers(finder, predictor)
    right = sum(a.prediction == truth for a, truth in zip(answers, truths))
    no_cell = sum(a.prediction is None for a in answers)
    return {"fields": len(answers), "no_cell_found": no_cell, "accuracy": right / len(answers)}


def crop_accuracy(predictor: Predictor, crop: CropPolicy | None = None) -> dict:
    """bccd-wbc: ``wbc predict`` on every crop (the model's own view of it, read as one folder; or by ``crop``)."""
    records = find_dataset(DATA / "bccd-wbc").splits["all"]
    answers = predictor.predict_files([r.path for r in records], crop=crop)
    right = sum(a.prediction == config.CLASSES[r.label] for a, r in zip(answers, records))
    flags: dict[str, int] = {}
    for a in answers:
        for flag in filter(None, a.flag.split("; ")):
            flags[flag] = flags.get(flag, 0) + 1
    return {"crops": len(records), "accuracy": right / len(records), "flags": flags}


def throughput(predictor: Predictor, n_fields: int) -> dict:
    fields = sorted((DATA / "bccd-fields" / "JPEGImages").glob("*.jpg"))[:n_fields]
    start = time.perf_counter()
    summary = run_count(fields, OUT / "run", progress=False, predictor=predictor)
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
    parser.add_argument("--model", type=Path, default=None, help="model file (default: the shipped model)")
    parser.add_argument("--n-fields", type=int, default=50, help="fields for the throughput run")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: fields, crops, throughput")
    args = parser.parse_args()
    # One thread: on the shared 2-core machine (load 8–15) one forward pass took 2.0 s with 2 threads (OpenMP
    # threads waiting on each other) and 0.21 s with 1.
    torch.set_num_threads(1)
    skip = set(args.skip.split(","))
    finder, predictor = CellFinder(), Predictor(args.model)
    name = str(args.model) if args.model else config.DEFAULT_MODEL_PATH.name
    report: dict = {"crop": predictor.crop.to_meta(), "command": f"python {shlex.join(sys.argv)}"}
    if "fields" not in skip:
        report["bccd_fields"] = field_accuracy(finder, predictor)
        print("bccd-fields field-level accuracy:", report["bccd_fields"])
    if "crops" not in skip:
        report["bccd_wbc_crops"] = crop_accuracy(predictor)
        print("bccd-wbc crops:", report["bccd_wbc_crops"])
    if "throughput" not in skip:
        report["throughput"] = throughput(predictor, args.n_fields)
        print("wbc count throughput:", report["throughput"])
    OUT.mkdir(parents=True, exist_ok=True)
    previous = json.loads((OUT / "count.json").read_text()) if (OUT / "count.json").exists() else {}
    previous = previous if all(isinstance(v, dict) and "crop" in v for v in previous.values()) else {}
    (OUT / "count.json").write_text(json.dumps({**previous, name: report}, indent=2) + "\n")
    print(f"written: {OUT / 'count.json'}")


if __name__ == "__main__":
    main()
