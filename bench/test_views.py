"""Which test-time flips should a model's predictions average? Errors and log-loss of every set of views on the
model's validation split (where the choice is made) and on its held-out test split (reported, not used to choose).

    python bench/test_views.py [--model runs/default/model.safetensors] [--data ../shared/datasets/pbc-wbc]

The model must have been trained on ``--data`` (its metadata names the split). Each view's logits are computed once;
a set of views averages them, exactly as ``WbcClassifier.predict`` does. ``config.TEST_VIEWS`` is the choice.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from itertools import combinations
from pathlib import Path

import torch
from torch.nn import functional as F

from wbc_trust import config
from wbc_trust.data import validation_split
from wbc_trust.evaluate import load_test_images, model_labels
from wbc_trust.modelfile import load_model
from wbc_trust.models import VIEWS, WbcClassifier, logits_and_features, prepare_for_cpu


def view_logits(model: WbcClassifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of each single view."""
    logits = {}
    for view in VIEWS:
        model.views = (view,)
        logits[view] = logits_and_features(model, images, progress=True)[0]
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model file (default: the shipped model)")
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/pbc-wbc"))
    parser.add_argument("--top", type=int, default=12, help="how many sets to print, best on validation first")
    args = parser.parse_args()

    model, meta = load_model(args.model)
    model = prepare_for_cpu(model)
    val, val_description = validation_split(meta, args.data)
    test = load_test_images(meta, args.data)
    splits = {
        "validation": (view_logits(model, val.images), torch.from_numpy(model_labels(val.records, meta["classes"]))),
        "test": (view_logits(model, test.images), torch.from_numpy(test.labels)),
    }
    print(f"\n{val_description}; {test.description}")
    others = [v for v in VIEWS if v != "identity"]
    rows = []
    for k in range(len(others) + 1):
        for extra in combinations(others, k):
            views = ("identity", *extra)
            row: list = ["+".join(views)]
            for logits, labels in splits.values():
                mean = torch.stack([logits[v] for v in views]).mean(0)
                row += [int((mean.argmax(1) != labels).sum()), F.cross_entropy(mean, labels).item(), len(labels)]
            rows.append(row)
    # the choice is read on validation (errors, then log-loss); the rest of the sets' test columns are not looked at
    rows.sort(key=lambda r: (r[1], r[2]))
    shown = rows[: args.top] + [r for r in rows[args.top :] if r[0] in ("identity", "+".join(config.TEST_VIEWS))]
    print(
        f"{'views (best on validation first)':<60}{'val errors':>11}{'val log-loss':>14}{'test errors':>13}{'test':>9}"
    )
    for name, val_err, val_loss, _, test_err, _, n_test in shown:
        print(f"{name:<60}{val_err:>11}{val_loss:>14.4f}{test_err:>13}{1 - test_err / n_test:>9.2%}")
    print(f"\ncommand: python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
