"""Influence speed (issue 5, item 4): index build time against one training epoch, and the time of one query
(top-k helpful and harmful over every training image). Targets: build ≤ one epoch, ≤1 s per query.

    python bench/influence_speed.py [--data ../shared/datasets/pbc-wbc] [--images N] [--queries 20]

Both sides run in this one process on the same images: N PBC images (seeded, stratified by the folder order; default
all of them) are linked into a temporary folder; `wbc train`'s own code trains the default recipe
(EfficientNet-Lite0, ImageNet weights, 160 px, first 4 stages frozen) for one epoch on its training split, then `wbc trust influence`'s code
builds the index over the model's training images (features + last-layer replay). A query is what the app does for one
uploaded image: its features, then TracInCP top-k over every training image in the index
(``influential_training_images``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wbc_trust import config
from wbc_trust.crop import CropPolicy
from wbc_trust.data import find_dataset, load_images
from wbc_trust.modelfile import load_model
from wbc_trust.train import TrainConfig, train
from wbc_trust.trust.influence import INDEX_FILE, InfluenceIndex, influential_training_images, run_influence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/pbc-wbc")
    parser.add_argument("--images", type=int, default=None, help="use this many images (default: all)")
    parser.add_argument("--queries", type=int, default=20, help="single-image queries to time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("command: python bench/influence_speed.py " + " ".join(sys.argv[1:]))
    print(f"torch threads: {torch.get_num_threads()}")

    records = find_dataset(args.data).splits["all"]
    if args.images and args.images < len(records):
        rng = np.random.default_rng(args.seed)
        records = [records[i] for i in sorted(rng.choice(len(records), args.images, replace=False))]
    with tempfile.TemporaryDirectory() as tmp:
        folder, run, out = Path(tmp) / "data", Path(tmp) / "run", Path(tmp) / "influence"
        for r in records:
            target = folder / r.path.parent.name / r.path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(r.path)
        size = config.DEFAULT_IMG_SIZE["efficientnet_lite0"]
        load_images(find_dataset(folder).splits["all"], size, desc="warming the decode cache")  # same for both sides

        result = train(
            TrainConfig(
                data=folder,
                out=run,
                arch="efficientnet_lite0",
                pretrained="imagenet",
                img_size=size,
                frozen_stages=4,
                epochs=1,
                seed=args.seed,
            )
        )
        model_path = run / "model.safetensors"
        meta = load_model(model_path)[1]
        epoch_seconds, n_epoch = result["train_seconds"], meta["data"]["n_train"]

        summary = run_influence(model_path, folder, out, train_data=folder)
        index = InfluenceIndex.load(out / INDEX_FILE)
        model = load_model(model_path)[0]
        held_out = set(meta["data"]["test_files"])
        test = load_images(
            [r for r in find_dataset(folder).splits["all"] if str(r.path.relative_to(folder.resolve())) in held_out][
                : args.queries
            ],
            CropPolicy.from_meta(meta),
        )
        influential_training_images(model, test.images[0], index)  # first call: one-off set-up
        times = []
        for image in test.images:
            started = time.perf_counter()
            influential_training_images(model, image, index, k=config.INFLUENCE_TOP_K)
            times.append(time.perf_counter() - started)

    build = summary["index_build_seconds"]
    print(
        f"\n{len(records)} images; the model trained on {n_epoch} (+ validation), the index holds "
        f"{summary['n_train']} training images ({summary['n_checkpoints']} replayed checkpoints)"
    )
    print(
        f"one training epoch (wbc train, incl. validation pass): {epoch_seconds:8.1f} s "
        f"({epoch_seconds / n_epoch * 1000:.1f} ms per training image)"
    )
    print(
        f"influence index build:                                {build:8.1f} s "
        f"({build / summary['n_train'] * 1000:.1f} ms per indexed image)"
    )
    print(
        f"build / epoch: {build / epoch_seconds:.2f}x   (per image: "
        f"{(build / summary['n_train']) / (epoch_seconds / n_epoch):.2f}x; target ≤ 1)"
    )
    print(
        f"one query, top-{config.INFLUENCE_TOP_K} helpful + harmful over {len(index.paths)} training images: "
        f"p50 {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms over {len(times)} queries "
        "(target ≤ 1000 ms)"
    )
    print(
        f"batched queries inside `wbc trust influence` (both methods): {summary['seconds_per_query'] * 1000:.0f} ms "
        "per test image"
    )


if __name__ == "__main__":
    main()
