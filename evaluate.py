"""The seed's `python evaluate.py`, now a thin wrapper over `wbc evaluate`.

With no arguments it evaluates the default model on the shipped sample into eval_out/; any arguments are passed to
`wbc evaluate` unchanged (see `wbc evaluate --help`).
"""

import sys

from wbc_trust import config
from wbc_trust.cli import main

if __name__ == "__main__":
    args = sys.argv[1:] or ["--data", str(config.SAMPLE_DATA_DIR), "--out", "eval_out"]
    sys.argv = ["wbc", "evaluate", *args]
    main()
