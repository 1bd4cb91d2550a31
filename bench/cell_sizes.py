"""How large is a white cell in µm in each lab's smears, and what does a folder of tight crops say of its lab's scale?

    python bench/cell_sizes.py    # ~1 min

1. txl-fields (both splits), per source lab: each image's ruler is the median of its annotated red cells that lie whole
   in the frame (their mean side over ``config.RED_CELL_DIAMETER_UM``); each whole annotated white cell's long side
   over that ruler. The median of the labs' medians is ``config.CROP_TIGHT_FRAME_UM``, the white cell that a tight
   crop's frame is taken to be (``crop.lab_scale``). Boxes only: no class label is read.
2. bccd-wbc (tight crops cut from BCCD's fields): its magnification as ``wbc predict`` and ``wbc adapt`` measure it
   (``data.measure_scale``), against the red-cell ruler of bccd-fields, the same lab's whole fields.
"""

from __future__ import annotations

import shlex
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finder import BCCD, LABS, TXL, whole  # noqa: E402  (bench/finder.py)

from wbc_trust import config  # noqa: E402
from wbc_trust.data import find_dataset, measure_scale  # noqa: E402
from wbc_trust.finder import read_yolo  # noqa: E402

WHITE, RED = 0, 1
MIN_RED_CELLS = 3


def white_cells_um() -> dict[str, list[float]]:
    """Per lab, the long side in µm of every whole annotated white cell of a txl-fields image with a ruler."""
    sizes: dict[str, list[float]] = defaultdict(list)
    for path in sorted((TXL / "images").glob("*/*")):
        with Image.open(path) as image:
            size = image.size
        boxes, _ = read_yolo(TXL / "labels" / path.parent.name / f"{path.stem}.txt", *size)
        red = whole(boxes.get(RED, np.zeros((0, 4))), *size)
        white = whole(boxes.get(WHITE, np.zeros((0, 4))), *size)
        if len(red) < MIN_RED_CELLS or not len(white):
            continue
        px_per_um = np.median((red[:, 2] - red[:, 0] + red[:, 3] - red[:, 1]) / 2) / config.RED_CELL_DIAMETER_UM
        long_sides = np.maximum(white[:, 2] - white[:, 0], white[:, 3] - white[:, 1])
        sizes[LABS.get(size, "other")].extend((long_sides / px_per_um).tolist())
    return sizes


def main() -> None:
    sizes = white_cells_um()
    medians = {lab: float(np.median(v)) for lab, v in sorted(sizes.items()) if lab != "other"}
    for lab, median in medians.items():
        q1, q3 = np.percentile(sizes[lab], [25, 75])
        print(f"txl-fields {lab}: {len(sizes[lab])} white cells, median {median:.1f} µm (quartiles {q1:.1f}-{q3:.1f})")
    print(
        f"median of the labs: {np.median(list(medians.values())):.1f} µm (config.CROP_TIGHT_FRAME_UM = "
        f"{config.CROP_TIGHT_FRAME_UM:g})"
    )
    crops = [r.path for r in find_dataset(BCCD.parent / "bccd-wbc", require_all_classes=False).splits["all"]]
    fields = sorted((BCCD / "JPEGImages").glob("*.jpg"))
    for name, paths in (("bccd-wbc crops", crops), ("bccd-fields", fields)):
        scale, why = measure_scale(paths, f"reading {name}")
        print(f"{name}: {'no scale' if scale is None else f'{scale:.2f} px/µm'} ({why})")
    print(f"command: python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
