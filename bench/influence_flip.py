"""Proof that the influence ranking finds mislabelled training images (issue 3, item 4; target ≥70 %, random = 10 %).

    python bench/influence_flip.py [--data ../shared/datasets/pbc-wbc] [--seed 0] [--fine-tune-epochs 0] [--with-ekfac]

1,000 random PBC images (seeded) → 900 training + 100 test images; the labels of 10 % of the training images are
flipped to another class at random. A model is trained on the noisy labels: EfficientNet-Lite0 with ImageNet weights
at 128 px, its last layer trained on the frozen features (or, with ``--fine-tune-epochs N``, the whole network
fine-tuned for N epochs with the seed's augmentation first). Then the training images are ranked by:
  - the seed's method: self-influence ‖g‖² of the last-layer gradient at the final model;
  - ours: TracInCP self-influence (captum TracInCPFast) over the replayed last-layer checkpoints, as `wbc trust
    influence` computes it from the model alone (the replay uses another seed than the training);
  - the plain loss of each image under the final model;
  - with ``--with-ekfac``: kronfluence EK-FAC self-influence on the same last layer (needs `pip install kronfluence`).
Printed: the fraction of flipped images among the top 10 % of each ranking, plus times.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from wbc_trust import config
from wbc_trust.data import ImageTensorDataset, find_dataset, load_images, train_transform
from wbc_trust.models import autocast, build_model, prepare_for_cpu
from wbc_trust.trust.influence import build_index, extract_features, found_in_top, last_linear, replay_head

IMG_SIZE = 128


def fine_tune(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> None:
    """The whole network on the noisy labels, with the seed's augmentation (AdamW, bf16 autocast where native)."""
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.LEARNING_RATE, weight_decay=config.WEIGHT_DECAY)
    loader = DataLoader(ImageTensorDataset(images, labels, train_transform()), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    for epoch in range(epochs):
        model.train()
        for x, y in tqdm(loader, desc=f"fine-tuning epoch {epoch + 1}/{epochs}", unit="batch", leave=False):
            with autocast():
                logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()


def ekfac_self_influence(features: torch.Tensor, labels: torch.Tensor, head: nn.Linear) -> np.ndarray:
    """kronfluence EK-FAC self-influence of the last layer at the final model (the alternative we measured)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class HeadTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # the true Fisher: labels drawn from the model's own predictions
                with torch.no_grad():
                    y = torch.multinomial(logits.detach().softmax(-1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    copy = nn.Linear(head.in_features, head.out_features)
    copy.load_state_dict(head.state_dict())
    model = prepare_model(nn.Sequential(copy), HeadTask())
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer("flip", model, HeadTask(), cpu=True, output_dir=folder, disable_tqdm=True)
        dataset = TensorDataset(features, labels)
        analyzer.fit_all_factors("ekfac", dataset, per_device_batch_size=256, factor_args=FactorArguments("ekfac"))
        analyzer.compute_self_scores("self", "ekfac", dataset, per_device_train_batch_size=256)
        return analyzer.load_self_scores("self")["all_modules"].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets/pbc-wbc")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--flip", type=float, default=0.1, help="fraction of training labels flipped")
    parser.add_argument("--fine-tune-epochs", type=int, default=0, help="fine-tune the whole network first")
    parser.add_argument("--with-ekfac", action="store_true", help="also rank by kronfluence EK-FAC self-influence")
    args = parser.parse_args()
    print("command: python bench/influence_flip.py " + " ".join(sys.argv[1:]))
    print(f"torch threads: {torch.get_num_threads()}")

    rng = np.random.default_rng(args.seed)
    records = find_dataset(args.data).splits["all"]
    picked = [records[i] for i in rng.choice(len(records), args.images, replace=False)]
    loaded = load_images(picked, IMG_SIZE, desc="decoding images")  # the one non-image file may be among them
    n_train = round(0.9 * len(loaded.records))
    train = rng.permutation(len(loaded.records))[:n_train]
    images, true = loaded.images[train], loaded.labels[train]
    noisy = true.clone()
    flipped = rng.choice(n_train, round(args.flip * n_train), replace=False)
    for i in flipped:
        noisy[i] = int(rng.choice([c for c in range(len(config.CLASSES)) if c != int(true[i])]))
    is_flipped = np.zeros(n_train, dtype=bool)
    is_flipped[flipped] = True
    print(f"{len(loaded.records)} images read ({len(loaded.unreadable)} unreadable), {n_train} for training, "
          f"{is_flipped.sum()} labels flipped (seed {args.seed})")

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model = prepare_for_cpu(build_model("efficientnet_lite0", pretrained="imagenet", freeze_backbone=True))
    if args.fine_tune_epochs:
        fine_tune(model, images, noisy, args.fine_tune_epochs, args.seed)
        recipe = f"whole network fine-tuned {args.fine_tune_epochs} epochs"
    else:
        features = extract_features(model, images, desc="ImageNet features")
        trained = replay_head(features, noisy, len(config.CLASSES), seed=args.seed + 1)[-1]
        last_linear(model).load_state_dict(trained)
        recipe = f"last layer trained {config.INFLUENCE_REPLAY_EPOCHS} epochs on frozen ImageNet features"
    print(f"trained ({recipe}) in {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    paths = [str(loaded.records[i].path) for i in train]
    index = build_index(model, images, noisy, paths, config.CLASSES, IMG_SIZE)
    build_seconds = time.perf_counter() - started
    head = last_linear(model)
    with torch.no_grad():
        logits = head(index.features)
    print(f"training accuracy against the noisy labels {(logits.argmax(1) == noisy).float().mean():.3f}, "
          f"against the true labels {(logits.argmax(1) == true).float().mean():.3f}")

    rankings: dict[str, tuple[np.ndarray, float]] = {}
    for name, method in (("seed: −g·g self-influence ‖g‖²", "seed"), ("ours: TracInCP self-influence", "tracin")):
        started = time.perf_counter()
        scores = index.self_influence(method).numpy()
        rankings[name] = (scores, time.perf_counter() - started)
    rankings["plain loss"] = (F.cross_entropy(logits, noisy, reduction="none").numpy(), 0.0)
    if args.with_ekfac:
        started = time.perf_counter()
        scores = ekfac_self_influence(index.features, noisy, head)
        rankings["kronfluence EK-FAC self-influence"] = (scores, time.perf_counter() - started)

    print(f"\nindex build (features + {len(index.checkpoints)}-epoch last-layer replay): {build_seconds:.1f} s")
    print(f"{'ranking':38s} {'flipped in top 10%':>18s} {'seconds':>8s}")
    for name, (scores, seconds) in rankings.items():
        print(f"{name:38s} {found_in_top(scores, is_flipped, 0.1):18.1%} {seconds:8.2f}")
    print(f"{'random order (expected)':38s} {args.flip:18.1%}")


if __name__ == "__main__":
    main()
