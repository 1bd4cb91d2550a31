"""The seed's `python test_model.py --image sample.png`, now a thin wrapper over `wbc predict`.

Other arguments (--model, --csv, --json) are passed to `wbc predict` unchanged.
"""

import argparse
import sys

from wbc_trust.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Classify one white-cell image with the default model.")
    parser.add_argument("--image", required=True, help="image file to classify")
    known, rest = parser.parse_known_args()
    sys.argv = ["wbc", "predict", known.image, *rest]
    main()
