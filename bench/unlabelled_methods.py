"""Which adaptation without labels: colour transfer, batch-norm statistics (AdaBN), both or neither, on BCCD.

    python bench/unlabelled_methods.py [--model M]

For each source of the lab's unlabelled images (BCCD's 351 crops, cut at their own scale since their rulers disagree;
BCCD's 334 fields, cut at the lab's 14.66 px/µm as ``wbc adapt`` measures it), each method is fitted as
``wbc adapt --unlabelled`` fits it (``colour.ColourTransfer`` from the views' CIELAB statistics to those of the
base model's replay images; ``adapt.reestimate_batchnorm`` on the views, after the transfer when both) and measured on
the 319 labelled bccd-fields (the finder's most confident cell, at the field's own scale) and on the 351 crops at
their own scale and at 14.66 px/µm. Labels are read only to score. Writes bench_out/unlabelled_methods.json.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from wbc_trust import config  # noqa: E402
from wbc_trust.adapt import reestimate_batchnorm, replay_cells  # noqa: E402
from wbc_trust.colour import ColourTransfer, LabStatistics  # noqa: E402
from wbc_trust.data import Record, find_dataset, image_to_tensor, load_images, read_image  # noqa: E402
from wbc_trust.finder import CellFinder  # noqa: E402
from wbc_trust.predict import Predictor  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets"
BCCD_PX_PER_UM = 14.66  # the median red-cell ruler of the 334 BCCD fields (wbc adapt --unlabelled measures it)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    base = Predictor(args.model)
    finder = CellFinder()
    with open(DATA / "bccd-fields" / "labels.csv", newline="") as f:
        labelled = [(DATA / "bccd-fields" / r["image"], r["wbc_class"]) for r in csv.DictReader(f) if r["wbc_class"]]
    field_views, field_truth = [], []
    for path, truth in labelled:
        image = read_image(path)
        found = finder.find(image)
        if found.cells:
            field_views.append(image_to_tensor(base.crop.cell_view(image, found, found.cells[0])))
            field_truth.append(truth)
    crops = find_dataset(DATA / "bccd-wbc").splits["all"]
    crop_truth = [config.CLASSES[r.label] for r in crops]
    at_lab = base.crop.with_lab_scale(BCCD_PX_PER_UM)
    tests = {
        "bccd-fields": (torch.stack(field_views), field_truth),
        "crops, own scale": (load_images(crops, base.crop.with_lab_scale(None), cache=False).images, crop_truth),
        "crops at 14.66": (load_images(crops, at_lab, cache=False).images, crop_truth),
    }
    sources = {
        "BCCD crops": load_images(crops, base.crop.with_lab_scale(None), cache=False).images,
        "BCCD fields": load_images(
            [Record(p, None) for p in sorted((DATA / "bccd-fields").rglob("*.jpg"))], at_lab, cache=False
        ).images,
    }
    replay, _ = replay_cells(base.meta, base.crop.with_lab_scale(base.crop.home_px_per_um))
    home = LabStatistics.of(replay.images)
    report: dict[str, dict] = {}
    for source, images in sources.items():
        for method in ("none", "colour", "batchnorm", "both"):
            predictor = copy.copy(base)
            predictor.model = copy.deepcopy(base.model)
            if method in ("colour", "both"):
                predictor.model.colour = ColourTransfer(LabStatistics.of(images), home)
            if method in ("batchnorm", "both"):
                reestimate_batchnorm(predictor.model, images)
            row = {}
            for name, (views, truth) in tests.items():
                answers = predictor.predict_views([""] * len(views), views)
                row[name] = sum(a.prediction == t for a, t in zip(answers, truth)) / len(truth)
            report[f"{source} · {method}"] = row
            print(f"{source} · {method}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    out = ROOT / "bench_out" / "unlabelled_methods.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
