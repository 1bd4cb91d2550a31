"""``wbc adapt`` on a few labelled BCCD cells, end to end: the first N files of each BCCD class are the lab's labelled
cells, the other BCCD cells are read as ``wbc predict`` reads them with the adapted model, and scored.

    python bench/adapt_few.py [--per-class 10] [--unlabelled DIR] [--px-per-um X] [--model M] [--fine-tune-steps 80]
        [--keep RUN_DIR]

Prints and writes (``OUT/<name>.json``) accuracy, macro-F1, ECE, 95 % set coverage, mean set size, the unflagged share
and the unflagged answers' accuracy on the rest, per-class recall and the confusion matrix, and the seconds ``wbc adapt``
took; ``--keep`` keeps the adapted model for a closer look. BCCD has 3 basophils: at N ≥ 3 two of
them are labelled (all but one, so one is left to test on).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import confusion_matrix, f1_score  # noqa: E402

from wbc_trust import config  # noqa: E402
from wbc_trust.adapt import adapt  # noqa: E402
from wbc_trust.calibration import calibration_error  # noqa: E402
from wbc_trust.data import list_files  # noqa: E402
from wbc_trust.predict import Predictor  # noqa: E402

BCCD = ROOT.parent / "shared" / "datasets" / "bccd-wbc"


def score(predictor: Predictor, files: list[Path]) -> dict:
    """The trust columns of ``predictor`` on ``files``, whose folder names are their classes."""
    answers = predictor.predict_files(files)
    truth = [f.parent.name.lower() for f in files]
    unflagged = [(a, t) for a, t in zip(answers, truth) if not a.flag]
    classes = sorted(set(truth))
    predictions = [a.prediction for a in answers]
    matrix = confusion_matrix(truth, predictions, labels=classes)
    probs = torch.tensor([[a.probabilities[c] for c in predictor.classes] for a in answers])
    return {
        "images": len(files),
        "accuracy": sum(a.prediction == t for a, t in zip(answers, truth)) / len(files),
        "macro_f1": float(f1_score(truth, predictions, labels=classes, average="macro", zero_division=0)),
        "ece": calibration_error(probs, torch.tensor([predictor.classes.index(t) for t in truth])),
        "set_coverage": sum(t in (a.prediction_set or []) for a, t in zip(answers, truth)) / len(files),
        "mean_set_size": sum(len(a.prediction_set or []) for a in answers) / len(files),
        "unflagged_share": len(unflagged) / len(files),
        "unflagged_accuracy": sum(a.prediction == t for a, t in unflagged) / len(unflagged) if unflagged else None,
        "recall": {c: float(row[i] / row.sum()) for i, (c, row) in enumerate(zip(classes, matrix))},
        "confusion": {"classes (rows: truth, columns: prediction)": classes, "matrix": matrix.tolist()},
    }


def adapt_and_score(
    per_class: int,
    selection_seed: int | None = None,
    unlabelled: Path | None = None,
    model: Path | None = None,
    px_per_um: float | None = None,
    fine_tune_steps: int = config.ADAPT_FINE_TUNE_STEPS,
    keep: Path | None = None,
) -> dict:
    """Label ``per_class`` BCCD files of each class (the first ones, or a random draw with ``selection_seed``; at most
    all but one), run ``wbc adapt`` on them end to end, and score the adapted model on the other BCCD cells. With
    ``per_class`` 0, ``wbc adapt --unlabelled`` alone, scored on every BCCD cell."""
    rest: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        lab = Path(tmp) / "lab"
        for folder in sorted(p for p in BCCD.iterdir() if p.is_dir()):
            files = list_files(folder)
            if selection_seed is not None:
                files = [files[i] for i in np.random.default_rng(selection_seed).permutation(len(files))]
            n = min(per_class, len(files) - 1)
            (lab / folder.name).mkdir(parents=True)
            for f in files[:n]:
                shutil.copy(f, lab / folder.name / f.name)
            rest += files[n:]
        run = keep or Path(tmp) / "run"
        started = time.perf_counter()
        adapt(run, lab if per_class else None, model, unlabelled, px_per_um=px_per_um, fine_tune_steps=fine_tune_steps)
        seconds = time.perf_counter() - started
        return {**score(Predictor(run / "model.safetensors"), rest), "adapt_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--unlabelled", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--fine-tune-steps", type=int, default=config.ADAPT_FINE_TUNE_STEPS)
    parser.add_argument(
        "--px-per-um",
        type=float,
        default=None,
        help="the lab's magnification, as `wbc adapt --px-per-um` takes it (BCCD's: 14.67, its fields' median ruler)",
    )
    parser.add_argument(
        "--selection-seed",
        type=int,
        default=None,
        help="label N random files of each class drawn with this seed (default: the first N files); a selection other "
        "than the reported one is where a setting is chosen",
    )
    parser.add_argument(
        "--lab-augment",
        choices=config.AUGMENTS,
        default=config.ADAPT_LAB_AUGMENT,
        help="config.ADAPT_LAB_AUGMENT for this run: how the lab's cells are augmented while fine-tuning",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "adapt_few")
    parser.add_argument(
        "--keep", type=Path, default=None, help="write the adapted model here instead of a temporary folder"
    )
    args = parser.parse_args()
    config.ADAPT_LAB_AUGMENT = args.lab_augment
    result = adapt_and_score(
        args.per_class,
        args.selection_seed,
        args.unlabelled,
        args.model,
        args.px_per_um,
        args.fine_tune_steps,
        args.keep,
    )
    name = f"{args.per_class}-per-class-{args.fine_tune_steps}-steps" + ("-unlabelled" if args.unlabelled else "")
    name += "" if args.px_per_um is None else f"-{args.px_per_um}-px-per-um"
    name += "" if args.selection_seed is None else f"-selection{args.selection_seed}"
    name += "" if config.ADAPT_LAB_AUGMENT is None else f"-lab-{config.ADAPT_LAB_AUGMENT}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, **result}, indent=1, default=str)
    )
    print(name, json.dumps(result))


if __name__ == "__main__":
    main()
