"""The README's results table: train each architecture on the same seed-0 split of pbc-wbc and report held-out
accuracy, macro-F1, basophil recall and training time.

    python bench/compare_models.py [--data ../shared/datasets/pbc-wbc] [--out runs/compare] [--only cnn,resnet50]

Every number comes from the held-out test split (images the model never saw; duplicates kept on one side).
Training time is the wall time of `train()` (decoding the images included; the decode cache is per size).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from wbc_trust.recipe import make_config
from wbc_trust.train import train

#: row name in the README table → shipped recipe (src/wbc_trust/recipes/NAME.yaml)
RECIPES: dict[str, str] = {
    "cnn": "cnn",
    "resnet50": "resnet50",
    "efficientnet_lite0": "default",
    "efficientnet_lite0_cross_lab": "cross_lab",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/pbc-wbc"))
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--only", default=",".join(RECIPES), help="comma-separated subset of " + ", ".join(RECIPES))
    args = parser.parse_args()

    rows = []
    for name in args.only.split(","):
        recipe = RECIPES[name]
        started = time.perf_counter()
        train(make_config(recipe, data=args.data, out=args.out / name))
        minutes = (time.perf_counter() - started) / 60
        metrics = json.loads((args.out / name / "test" / "metrics.json").read_text())
        rows.append(
            (
                name,
                metrics["accuracy"],
                metrics["macro_f1"],
                metrics["per_class"]["basophil"]["recall"],
                minutes,
                f"wbc train --config {recipe} --data {args.data} --out {args.out / name}",
            )
        )
    print("\n| model | held-out accuracy | macro-F1 | basophil recall | training time | command |")
    print("|---|---|---|---|---|---|")
    for name, acc, f1, baso, minutes, command in rows:
        print(f"| `{name}` | {acc:.2%} | {f1:.2%} | {baso:.2%} | {minutes:.1f} min | `{command}` |")


if __name__ == "__main__":
    main()
