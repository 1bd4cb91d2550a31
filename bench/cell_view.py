"""A cell-view model at chosen scales: PBC's held-out split, BCCD's crops and bccd-fields, zero labels.

    python bench/cell_view.py --model RUN/model.safetensors [--scales batch,own,14.66] [--parts valcal,pbc,fields,crops]

``batch``: as ``wbc predict`` reads a folder (at the folder's measured magnification, ``data.batch_policy``) and
``wbc count`` a field (at its own red cells); ``own``: each image at its own scale; a number: every image cut at that
many px/µm (a lab's magnification, as ``wbc adapt --px-per-um`` would store). ``valcal``: the model's validation and
calibration splits (recomputed, ``data.model_split``), where recipes are chosen; ``pbc``: the model's held-out files
as ``wbc evaluate`` picks them (``evaluate.choose_records``), read once a recipe is chosen; ``fields`` and ``crops``:
``bench/count.py``'s field-level and crop accuracy.
Writes bench_out/cell_view/<model's folder name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from count import crop_accuracy, field_accuracy  # noqa: E402  (bench/count.py)

from wbc_trust import config  # noqa: E402
from wbc_trust.crop import CropPolicy  # noqa: E402
from wbc_trust.data import Record, find_dataset, model_split  # noqa: E402
from wbc_trust.evaluate import choose_records  # noqa: E402
from wbc_trust.finder import CellFinder  # noqa: E402
from wbc_trust.predict import Predictor  # noqa: E402

OUT = ROOT / "bench_out" / "cell_view"


def held_out(predictor: Predictor, records: list[Record], crop: CropPolicy | None) -> dict:
    """Accuracy on PBC files ``records`` of the model's own split (read as one folder, or by ``crop``)."""
    answers = predictor.predict_files([r.path for r in records], crop=crop)
    right = sum(a.prediction == config.CLASSES[r.label] for a, r in zip(answers, records))
    return {"images": len(records), "right": right, "accuracy": right / len(records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--scales", default="batch", help="comma-separated: batch, own, or px/µm values")
    parser.add_argument("--parts", default="pbc,fields,crops", help="comma-separated: valcal, pbc, fields, crops")
    args = parser.parse_args()
    parts, finder, report = args.parts.split(","), CellFinder(), {}
    if "pbc" in parts or "valcal" in parts:
        meta = Predictor(args.model).meta
        index = find_dataset(Path(meta["data"]["root"]))
    if "pbc" in parts:  # as wbc evaluate picks them (it checks the folder's content against the model's, once)
        records = choose_records(index, meta).records
    if "valcal" in parts:
        split = model_split(index, meta, "run this on the folder the model was trained on, unchanged")
        chosen_on = split["val"] + split.get("calib", [])
    for scale in args.scales.split(","):
        predictor = Predictor(args.model)
        if scale not in ("batch", "own"):
            predictor.crop = predictor.crop.with_lab_scale(float(scale))
        crop = predictor.crop if scale == "own" else None  # a given policy is not measured on the batch
        result = {}
        home = scale in ("batch", "own")  # PBC cut at another lab's magnification would measure nothing
        if "valcal" in parts and home:
            result["pbc_val_calib"] = held_out(predictor, chosen_on, crop)
        if "pbc" in parts and home:
            result["pbc_held_out"] = held_out(predictor, records, crop)
        if "fields" in parts:
            result["bccd_fields"] = field_accuracy(finder, predictor)
        if "crops" in parts:
            result["bccd_crops"] = crop_accuracy(predictor, crop)
        report[scale] = result
        print(scale, json.dumps(result), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"{args.model.parent.name}.json"
    out.write_text(json.dumps({"model": str(args.model), **report}, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
