"""The lab statistic's scores (``lab.py``) on images of the model's own lab and of another, against its threshold.

    python bench/lab_scores.py [--model M] [--per-set 60]

Sets: the model's held-out PBC white cells (every 4th), each class of ``pbc-non-wbc`` (same lab, not white cells:
these must read as the model's lab), BCCD crops and BCCD fields (another lab: these must not). Each set is read as
``wbc predict`` reads a folder (``Predictor.batch_policy``). Prints quantiles and the share above the threshold, and
above the thresholds that other accept rates would give (refitted on the model's calibration split when
``--refit`` is given). Writes bench_out/lab_scores/<model's folder name>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from wbc_trust.data import Record, list_files, load_images, validation_split  # noqa: E402
from wbc_trust.lab import LabShift  # noqa: E402
from wbc_trust.predict import Predictor  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets"
OUT = ROOT / "bench_out" / "lab_scores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--per-set", type=int, default=60, help="images per pbc-non-wbc class (100 per BCCD set)")
    parser.add_argument("--refit", default="", help="comma-separated accept rates to refit the threshold at")
    args = parser.parse_args()
    predictor = Predictor(args.model)
    lab = predictor.calibration.lab
    thresholds = {f"accept {lab.accept}": lab.threshold}
    if args.refit:
        calib, _ = validation_split(predictor.meta, Path(predictor.meta["data"]["root"]))
        for accept in map(float, args.refit.split(",")):
            thresholds[f"accept {accept}"] = LabShift.fit(calib.images, accept=accept).threshold

    def scores(files: list[Path]) -> np.ndarray:
        crop = predictor.batch_policy(files)
        return lab.score(load_images([Record(f, None) for f in files], crop, cache=False).images).numpy()

    rng = random.Random(0)
    sets = {"PBC held-out white cells": [DATA / "pbc-wbc" / f for f in predictor.meta["data"]["test_files"]][::4]}
    sets.update({f"PBC {d.name}": list_files(d)[: args.per_set] for d in sorted((DATA / "pbc-non-wbc").iterdir())})
    sets["BCCD crops"] = rng.sample(list_files(DATA / "bccd-wbc"), 100)
    sets["BCCD fields"] = sorted((DATA / "bccd-fields").rglob("*.jpg"))[:100]
    report = {"thresholds": thresholds, "sets": {}}
    for name, files in sets.items():
        s = scores(files)
        row = {
            "n": len(s),
            "q05": float(np.quantile(s, 0.05)),
            "median": float(np.median(s)),
            "q95": float(np.quantile(s, 0.95)),
        }
        row.update({f"flagged at {k}": float(np.mean(s > t)) for k, t in thresholds.items()})
        report["sets"][name] = row
        print(name, json.dumps(row), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"{Path(args.model).parent.name if args.model else 'default'}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"thresholds {thresholds}\nwritten: {out}")


if __name__ == "__main__":
    main()
