"""The seed's `python train.py`, now a thin wrapper over `wbc train`.

With no arguments it trains the default recipe (EfficientNet-Lite0, ImageNet weights) on ../shared/datasets/pbc-wbc
into runs/default; any arguments are passed to `wbc train` unchanged (see `wbc train --help`).
"""

import sys

from wbc_trust.cli import main

if __name__ == "__main__":
    args = sys.argv[1:] or [
        "--data", "../shared/datasets/pbc-wbc", "--out", "runs/default", "--pretrained", "imagenet", "--frozen-stages", "4"
    ]
    sys.argv = ["wbc", "train", *args]
    main()
