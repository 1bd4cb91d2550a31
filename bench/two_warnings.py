"""The two warnings on three folders, each read as ``wbc predict`` reads a folder: PBC's non-white cells (the
model's lab, not white cells: should say ``not a white cell``), BCCD's crops (another lab: ``white cell from an
unfamiliar lab``, and one notice up front) and the model's held-out PBC white cells (neither).

    python bench/two_warnings.py [--model M]

Prints, per folder, how many answers carry each warning ("other": only a view flag such as several white cells)
and whether the batch gets the one notice.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from wbc_trust.calibration import FLAG_NEW_LAB, FLAG_NOT_WBC, FLAG_UNCERTAIN  # noqa: E402
from wbc_trust.data import list_files  # noqa: E402
from wbc_trust.predict import Predictor  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets"


def warning(flag: str) -> str:
    for name, marker in (("new lab", FLAG_NEW_LAB), ("not a white cell", FLAG_NOT_WBC), ("uncertain", FLAG_UNCERTAIN)):
        if marker in flag:
            return name
    return "other" if flag else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    predictor = Predictor(args.model)
    folders = {
        "pbc-non-wbc": list_files(DATA / "pbc-non-wbc"),
        "bccd-wbc": list_files(DATA / "bccd-wbc"),
        "PBC held-out": [DATA / "pbc-wbc" / f for f in predictor.meta["data"]["test_files"]],
    }
    for name, files in folders.items():
        answers = predictor.predict_files(files, progress=False)
        counts = Counter(warning(a.flag) for a in answers)
        print(f"{name} ({len(files)}): {dict(counts)}; one notice: {predictor.batch_notice(answers) is not None}")


if __name__ == "__main__":
    main()
