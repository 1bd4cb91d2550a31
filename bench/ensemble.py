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
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from count import DATA, field_answers  # noqa: E402  (bench/count.py)

from wbc_trust import config  # noqa: E402
from wbc_trust.data import Record, find_dataset, model_split  # noqa: E402
from wbc_trust.finder import CellFinder  # noqa: E402
from wbc_trust.modelfile import read_metadata  # noqa: E402
from wbc_trust.predict import Prediction, Predictor  # noqa: E402

OUT = ROOT / "bench_out" / "ensemble.json"


def as_rows(answers: list[Prediction]) -> torch.Tensor:
    """Calibrated probabilities N×C in ``config.CLASSES`` order; zeros where a file was unreadable or had no cell
    (scored as wrong)."""
    return torch.tensor([[a.probabilities.get(c, 0.0) for c in config.CLASSES] for a in answers])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="model files to average with the shipped default")
    args = parser.parse_args()
    models = {"shipped": None, **{path.parent.name: path for path in args.models}}
    meta = read_metadata(config.DEFAULT_MODEL_PATH)
    split = model_split(find_dataset(Path(meta["data"]["root"])), meta, "run this beside the model's training data")
    parts: dict[str, list[Record]] = {
        "pbc_val_calib": split["val"] + split.get("calib", []),
        "bccd_crops": find_dataset(DATA / "bccd-wbc").splits["all"],
    }
    truth = {name: torch.tensor([r.label for r in records]) for name, records in parts.items()}
    finder, probs = CellFinder(), {}
    for name, path in models.items():
        predictor = Predictor(path)
        probs[name] = {part: as_rows(predictor.predict_files([r.path for r in rs])) for part, rs in parts.items()}
        answers, field_classes = field_answers(finder, predictor)
        probs[name]["bccd_fields"] = as_rows(answers)
        truth["bccd_fields"] = torch.tensor([config.CLASSES.index(c) for c in field_classes])
        print(f"{name}: read", flush=True)
    report = {}
    for k in range(1, len(models) + 1):
        for subset in itertools.combinations(models, k):
            row = {}
            for part, labels in truth.items():
                averaged = torch.stack([probs[m][part] for m in subset]).mean(0)
                right = int(((averaged.argmax(1) == labels) & (averaged.sum(1) > 0)).sum())
                row[part] = {"right": right, "of": len(labels), "accuracy": round(right / len(labels), 4)}
            report[" + ".join(subset)] = row
            print(" + ".join(subset), json.dumps({p: r["right"] for p, r in row.items()}), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"models": {n: str(p) for n, p in models.items()}, "averaged": report}, indent=2) + "\n")
    print(f"written: {OUT}")


if __name__ == "__main__":
    main()
