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

from wbc_trust.train import TrainConfig, train

#: name → (settings, the equivalent `wbc train` options shown in the table)
RECIPES: dict[str, tuple[dict, str]] = {
    "cnn": (dict(arch="cnn", epochs=8, lr=2e-3), "--arch cnn --epochs 8 --lr 2e-3"),
    "resnet50": (dict(arch="resnet50", img_size=128, epochs=4), "--arch resnet50 --img-size 128 --epochs 4"),
    "efficientnet_lite0": (dict(arch="efficientnet_lite0", pretrained="imagenet", frozen_stages=4),
                           "--arch efficientnet_lite0 --pretrained imagenet --frozen-stages 4"),
    "efficientnet_lite0_cross_lab": (dict(arch="efficientnet_lite0", pretrained="imagenet", frozen_stages=4,
                                          augment="cross-lab"),
                                     "--arch efficientnet_lite0 --pretrained imagenet --frozen-stages 4 --augment cross-lab"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/pbc-wbc"))
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--only", default=",".join(RECIPES), help="comma-separated subset of " + ", ".join(RECIPES))
    args = parser.parse_args()

    rows = []
    for name in args.only.split(","):
        settings, options = RECIPES[name]
        started = time.perf_counter()
        train(TrainConfig(data=args.data, out=args.out / name, **settings))
        minutes = (time.perf_counter() - started) / 60
        metrics = json.loads((args.out / name / "test" / "metrics.json").read_text())
        rows.append((name, metrics["accuracy"], metrics["macro_f1"], metrics["per_class"]["basophil"]["recall"],
                     minutes, f"wbc train --data {args.data} --out {args.out / name} {options}"))
    print("\n| model | held-out accuracy | macro-F1 | basophil recall | training time | command |")
    print("|---|---|---|---|---|---|")
    for name, acc, f1, baso, minutes, command in rows:
        print(f"| `{name}` | {acc:.2%} | {f1:.2%} | {baso:.2%} | {minutes:.1f} min | `{command}` |")


if __name__ == "__main__":
    main()
