"""The seed's `python train.py`, now a thin wrapper over `wbc train`.

With no arguments it trains the default recipe (`wbc train`'s defaults, spelled out in
src/wbc_trust/recipes/default.yaml) on ../shared/datasets/pbc-wbc into runs/default; any arguments are passed to
`wbc train` unchanged (see `wbc train --help`; `--config cnn` picks a shipped recipe).
"""

import sys

from wbc_trust.cli import main

if __name__ == "__main__":
    args = sys.argv[1:] or ["--data", "../shared/datasets/pbc-wbc", "--out", "runs/default"]
    sys.argv = ["wbc", "train", *args]
    main()
