"""Raw folder → trained default model: wall time and held-out accuracy / macro-F1 (issue 14 targets: ≥ 99.5 % in ≤ 6 min).

    python bench/time_to_accuracy.py [--data ../shared/datasets/pbc-wbc] [--out runs/default] [--config C] [--install]

The clock starts before the first image is decoded (an empty decode cache is forced) and stops when the best model is
saved and calibrated (the time to a usable model); the evaluation on the held-out test split (seed 0: images the model
never saw, duplicates kept on one side) is timed separately.
``--install`` copies the result, weights in half precision (``modelfile.store_half``), to the shipped default model
(src/wbc_trust/assets/default_model.safetensors), which is made with ``--config travel --install`` (the cell view and
the travel augmentation: src/wbc_trust/assets/README.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from wbc_trust import config
from wbc_trust.modelfile import store_half
from wbc_trust.recipe import make_config
from wbc_trust.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/pbc-wbc"))
    parser.add_argument("--out", type=Path, default=Path("runs/default"))
    parser.add_argument(
        "--config",
        default="default",
        help="recipe (default: wbc train's defaults; the shipped model is --config travel)",
    )
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--install", action="store_true", help="copy the model to the shipped default")
    args = parser.parse_args()

    os.environ["WBC_CACHE_DIR"] = tempfile.mkdtemp(prefix="wbc-cache-")  # time the decoding too
    started = time.perf_counter()
    overrides = {"epochs": args.epochs} if args.epochs else {}
    result = train(make_config(args.config, data=args.data, out=args.out, **overrides))
    wall = time.perf_counter() - started
    shutil.rmtree(os.environ["WBC_CACHE_DIR"], ignore_errors=True)

    test = result["test"]
    print(
        f"\nmachine: {os.cpu_count()} CPU threads, torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    )
    to_model = result["seconds_to_model"]
    print(
        f"wall time, raw folder → trained and calibrated model: {to_model / 60:.1f} min ({to_model:.0f} s); "
        f"then held-out evaluation {wall - to_model:.0f} s"
    )
    print(
        f"held-out test split ({test['n_images']} images never trained on): "
        f"accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}"
    )
    print(f"best validation epoch {result['best_epoch']}: accuracy {result['val_accuracy']:.4f}")
    if args.install:
        store_half(args.out / "model.safetensors", config.DEFAULT_MODEL_PATH)
        print(f"installed as {config.DEFAULT_MODEL_PATH} (weights in half precision)")


if __name__ == "__main__":
    main()
