"""Several models' calibrated probabilities averaged (an ensemble): PBC validation + calibration, BCCD zero labels.

    python bench/ensemble.py RUN_A/model.safetensors RUN_B/model.safetensors ...   # with the shipped default

Every model and every subset of two or more, each image's probabilities averaged over the subset's models: PBC's
validation and calibration images (the shipped default's split, recomputed with ``data.model_split``: every model
must have been trained on that split, or it has seen some of them), BCCD's crops read as one folder
(``Predictor.predict_files``), and the finder's most confident cell of each labelled bccd-fields field (as
``bench/count.py`` reads them). Each model reads with its own crop policy and test-time views. Labels are read only
to score. Writes bench_out/ensemble.json. The question it answers: does averaging runs remove their cross-lab scatter
(docs/another-lab.md, "Session 23: the seed-0 runs on disk averaged")?
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from wbc_trust import config  # noqa: E402
from wbc_trust.data import Record, find_dataset, image_to_tensor, model_split, read_image  # noqa: E402
from wbc_trust.finder import CellFinder  # noqa: E402
from wbc_trust.predict import Prediction, Predictor  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets"
OUT = ROOT / "bench_out" / "ensemble.json"


def as_rows(answers: list[Prediction]) -> torch.Tensor:
    """Calibrated probabilities N×C in ``config.CLASSES`` order (uniform where a file was unreadable or had no cell)."""
    uniform = {c: 1.0 / len(config.CLASSES) for c in config.CLASSES}
    return torch.tensor([[(a.probabilities or uniform)[c] for c in config.CLASSES] for a in answers])


def field_answers(predictor: Predictor, finder: CellFinder, fields: list[Path]) -> list[Prediction]:
    """The model's answer for each field's most confident white cell (an empty answer where none was found)."""
    answers = []
    for path in fields:
        image = read_image(path)
        found = finder.find(image)
        if not found.cells:
            answers.append(Prediction(path.name, None, None))
            continue
        view = image_to_tensor(predictor.crop.cell_view(image, found, found.cells[0]))[None]
        answers.append(predictor.predict_views([path.name], view)[0])
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="model files to average with the shipped default")
    args = parser.parse_args()
    models = {"shipped": None, **{path.parent.name: path for path in args.models}}
    meta = Predictor().meta
    split = model_split(find_dataset(Path(meta["data"]["root"])), meta, "run this beside the model's training data")
    parts: dict[str, list[Record]] = {
        "pbc_val_calib": split["val"] + split.get("calib", []),
        "bccd_crops": find_dataset(DATA / "bccd-wbc").splits["all"],
    }
    with open(DATA / "bccd-fields" / "labels.csv", newline="") as f:
        fields = [(DATA / "bccd-fields" / r["image"], r["wbc_class"]) for r in csv.DictReader(f) if r["wbc_class"]]
    truth = {name: torch.tensor([r.label for r in records]) for name, records in parts.items()}
    truth["bccd_fields"] = torch.tensor([config.CLASSES.index(c) for _, c in fields])
    finder, probs = CellFinder(), {}
    for name, path in models.items():
        predictor = Predictor(path)
        probs[name] = {part: as_rows(predictor.predict_files([r.path for r in rs])) for part, rs in parts.items()}
        probs[name]["bccd_fields"] = as_rows(field_answers(predictor, finder, [p for p, _ in fields]))
        print(f"{name}: read", flush=True)
    report = {}
    for k in range(1, len(models) + 1):
        for subset in itertools.combinations(models, k):
            row = {}
            for part, labels in truth.items():
                right = int((torch.stack([probs[m][part] for m in subset]).mean(0).argmax(1) == labels).sum())
                row[part] = {"right": right, "of": len(labels), "accuracy": round(right / len(labels), 4)}
            report[" + ".join(subset)] = row
            print(" + ".join(subset), json.dumps({p: r["right"] for p, r in row.items()}), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"models": {n: str(p) for n, p in models.items()}, "averaged": report}, indent=2) + "\n")
    print(f"written: {OUT}")


if __name__ == "__main__":
    main()
