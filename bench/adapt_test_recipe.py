"""The recipe of ``tests/test_adapt.py``'s adapt test, scored: base model against `wbc adapt`, with and without the lab's
other cells as ``--unlabelled``.

    python bench/adapt_test_recipe.py [--selection first|SEED ...] [--steps 12]    # ~45 s a run on 2 cores

The lab labels 1 basophil and 5 cells of each other BCCD class (the first files of each class, or a draw with
``random.Random(SEED).shuffle``, as the test's fixture draws them); every other BCCD cell is scored, read as one folder
as `wbc predict` reads it. Prints the right answers out of the rest for the base model, for `wbc adapt --data FEW`,
and for `wbc adapt --data FEW --unlabelled REST`.
"""

from __future__ import annotations

import argparse
import random
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from wbc_trust.adapt import adapt  # noqa: E402
from wbc_trust.data import list_files  # noqa: E402
from wbc_trust.predict import Predictor  # noqa: E402

BCCD = ROOT.parent / "shared" / "datasets" / "bccd-wbc"
FEW = {"Basophil": 1, "Eosinophil": 5, "Lymphocyte": 5, "Monocyte": 5, "Neutrophil": 5}


def right(model: Path | None, files: list[Path]) -> int:
    """How many of ``files`` (their folder names are their classes) ``model`` names right, read as one folder."""
    answers = Predictor(model).predict_files(files, progress=False)
    return sum(a.prediction == f.parent.name.lower() for a, f in zip(answers, files))


def run(selection: str, steps: int) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        cells, rest_dir, rest = Path(tmp) / "cells", Path(tmp) / "rest", []
        rest_dir.mkdir()
        for name, n in FEW.items():
            files = list_files(BCCD / name)
            if selection != "first":
                random.Random(int(selection)).shuffle(files)
            (cells / name).mkdir(parents=True)
            for f in files[:n]:
                shutil.copy(f, cells / name / f.name)
            for f in files[n:]:
                shutil.copy(f, rest_dir / f.name)
            rest += files[n:]
        result = {"cells scored": len(rest), "base": right(None, rest)}
        for name, unlabelled in (("--data", None), ("--data --unlabelled", rest_dir)):
            out = Path(tmp) / name.replace(" ", "")
            adapt(out, cells, unlabelled=unlabelled, fine_tune_steps=steps)
            result[name] = right(out / "model.safetensors", rest)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--selection", nargs="+", default=["first", "0"], help="'first', or seeds of random draws")
    parser.add_argument("--steps", type=int, default=12, help="fine-tuning steps (the test's 12)")
    args = parser.parse_args()
    for selection in args.selection:
        print(f"selection {selection}: {run(selection, args.steps)}", flush=True)
    print(f"command: python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
