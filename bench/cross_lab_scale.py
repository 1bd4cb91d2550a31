"""How much of the cross-lab gap is scale? The default model on BCCD's white-cell crops, each padded with its own
border colour to 1-3× its size before the usual resize, so the cell covers less of the frame, as in a PBC image.

    python bench/cross_lab_scale.py [--data ../shared/datasets/bccd-wbc] [--model M]

BCCD's crops are tight around the cell (it fills the frame); PBC's 360×363 images show the cell at about a third of
the width. Prints accuracy and the confusion matrix (rows = truth) per padding factor.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from wbc_trust.data import find_dataset, image_to_tensor, read_image
from wbc_trust.evaluate import compute_metrics, model_labels
from wbc_trust.modelfile import load_model
from wbc_trust.models import logits_and_features, prepare_for_cpu

FACTORS = (1.0, 1.5, 2.0, 2.5, 3.0)


def padded(image: Image.Image, factor: float) -> Image.Image:
    """``image`` centred on a canvas about ``factor`` times its size, filled with the median colour of its border."""
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    fill = tuple(int(v) for v in np.median(border, 0))
    return ImageOps.expand(image, border=int(min(image.size) * (factor - 1) / 2), fill=fill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/bccd-wbc"))
    parser.add_argument("--model", type=Path, default=None, help="model file (default: the shipped model)")
    args = parser.parse_args()

    model, meta = load_model(args.model)
    model = prepare_for_cpu(model)
    records = find_dataset(args.data, require_all_classes=False).splits["all"]
    labels = model_labels(records, meta["classes"])
    originals = [read_image(r.path) for r in records]
    size = (meta["img_size"], meta["img_size"])
    print(f"{len(records)} images of {args.data}; rows of each confusion matrix = truth in the order {meta['classes']}")
    for factor in FACTORS:
        images = torch.stack(
            [image_to_tensor(padded(im, factor).resize(size, Image.Resampling.BILINEAR)) for im in originals]
        )
        logits, _ = logits_and_features(model, images)
        metrics = compute_metrics(labels, logits.argmax(1).numpy(), meta["classes"])
        print(f"padding ×{factor:g}: accuracy {metrics['accuracy']:.1%}  confusion {metrics['confusion_matrix']}")
    print(f"command: python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
