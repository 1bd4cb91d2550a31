"""Proof that the influence ranking finds mislabelled training images (issue 3, item 4; target ≥70 %, random = 10 %).

    python bench/influence_flip.py [--data ../shared/datasets/pbc-wbc] [--seed 0] [--images 1000]
                                   [--fine-tune-epochs 0] [--with-ekfac]

``--images`` random PBC images (seeded) → 90 % training + 10 % test images; the labels of 10 % of the training
images are flipped to another class at random. A model is trained on the noisy labels: EfficientNet-Lite0 with
ImageNet weights at 128 px, either its last layer on the frozen features (SGD with Nesterov momentum and a cosine
schedule, ``head_recipe``: a recipe of its own, unlike the replay's AdamW) or, with ``--fine-tune-epochs N``, the
whole network fine-tuned for N epochs with the seed's augmentation. Either way the last layer's weights after every
epoch are kept: the model's real checkpoints (after fine-tuning, TracIn pairs them with the final model's features,
as the product would with checkpoints saved by ``wbc train``). Then the training images are ranked by:
  - TracInCP self-influence (captum TracInCPFast) over those real checkpoints, each weighted by its learning rate;
  - TracInCP self-influence over the *replayed* last layer, which is what `wbc trust influence` computes from the
    model file alone (a fresh head re-trained with ``replay_head`` on the final model's features);
  - grad_dot self-influence ‖g‖²: the last-layer gradient's squared norm at the final model (the diagonal of the
    seed project's −g_train·g_test);
  - grad_dot summed over the test images: Σ_test −g_train·g_test at the final model (the seed project's score as it
    is defined: how much up-weighting the training image would raise the test loss);
  - the plain loss of each image under the final model;
  - with ``--with-ekfac``: kronfluence EK-FAC self-influence on the same last layer (``pip install kronfluence``, the
    ``bench`` extra), damping 0.1 × the mean eigenvalue (kronfluence's heuristic; see ``ekfac_self_influence``).
Printed: the fraction of flipped images among the top 10 % of each ranking, each ranking's Spearman correlation with
‖g‖² and the share of its top 10 % that ‖g‖²'s top 10 % holds too (a ranking that merely repeats ‖g‖² shows 1.000 and
100 %), plus times.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from captum.influence import TracInCPFast
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from wbc_trust import config
from wbc_trust.data import ImageTensorDataset, find_dataset, load_images, train_transform
from wbc_trust.models import autocast, build_model, prepare_for_cpu
from wbc_trust.trust.influence import InfluenceIndex, extract_features, found_in_top, last_linear, replay_head

IMG_SIZE = 128
#: The frozen-features model's own recipe (not the replay's AdamW 1e-3, batch 32, 30 epochs).
HEAD_EPOCHS, HEAD_LR, HEAD_BATCH, HEAD_MOMENTUM = 12, 0.05, 64, 0.9

Checkpoint = dict[str, torch.Tensor]


def _state(layer: nn.Linear) -> Checkpoint:
    return {k: v.detach().float().clone() for k, v in layer.state_dict().items()}


def head_recipe(
    features: torch.Tensor, labels: torch.Tensor, head: nn.Linear, seed: int
) -> tuple[list[Checkpoint], list[float]]:
    """Train ``head`` on fixed features: SGD, Nesterov momentum, learning rate annealed by a cosine per step. Returns
    the weights after every epoch and the mean learning rate of that epoch (TracIn's η_t)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=HEAD_LR, momentum=HEAD_MOMENTUM, nesterov=True, weight_decay=config.WEIGHT_DECAY
    )
    steps = HEAD_EPOCHS * math.ceil(len(features) / HEAD_BATCH)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    checkpoints, rates = [], []
    for _ in range(HEAD_EPOCHS):
        used = []
        for batch in torch.randperm(len(features), generator=generator).split(HEAD_BATCH):
            used.append(schedule.get_last_lr()[0])
            loss = F.cross_entropy(head(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        checkpoints.append(_state(head))
        rates.append(float(np.mean(used)))
    return checkpoints, rates


def fine_tune(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int
) -> tuple[list[Checkpoint], list[float]]:
    """The whole network on the noisy labels, with the seed's augmentation (AdamW, bf16 autocast where native).
    Returns the last layer's weights after every epoch and the learning rate (constant)."""
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.LEARNING_RATE, weight_decay=config.WEIGHT_DECAY)
    dataset = ImageTensorDataset(images, labels, train_transform())
    loader = DataLoader(
        dataset,
        batch_size=32,
        collate_fn=dataset.collate,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    checkpoints = []
    for epoch in range(epochs):
        model.train()
        for x, y in tqdm(loader, desc=f"fine-tuning epoch {epoch + 1}/{epochs}", unit="batch", leave=False):
            with autocast():
                logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        checkpoints.append(_state(last_linear(model)))
    model.eval()
    return checkpoints, [config.LEARNING_RATE] * epochs


def tracin_self_influence(
    features: torch.Tensor, labels: torch.Tensor, checkpoints: list[Checkpoint], rates: list[float]
) -> np.ndarray:
    """captum TracInCPFast self-influence Σ_t η_t ‖g(t)‖² over the given last-layer checkpoints, each with its own
    learning rate (the index in the product keeps one rate for all)."""
    out_features, in_features = checkpoints[0]["weight"].shape
    model = nn.Sequential(nn.Linear(in_features, out_features))

    def load(net: nn.Module, t: int) -> float:
        net[0].load_state_dict(checkpoints[t])
        return rates[t]

    tracer = TracInCPFast(
        model,
        model[0],
        TensorDataset(features, labels),
        list(range(len(checkpoints))),
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=config.INFLUENCE_TRAIN_CHUNK,
    )
    return tracer.self_influence(DataLoader(TensorDataset(features, labels), batch_size=4096)).detach().numpy()


def ekfac_self_influence(features: torch.Tensor, labels: torch.Tensor, head: nn.Linear) -> np.ndarray:
    """kronfluence EK-FAC self-influence g(H + λI)⁻¹g of the last layer at the final model.

    Damping λ = 0.1 × the mean eigenvalue (kronfluence's heuristic, ``damping_factor=None``). On this last layer it
    ranks like ‖g‖²: with fewer training images than features (900 < 1,280) the activation factor A = E[f fᵀ] has
    rank n, and every training image has about the same leverage fᵀ(A + λI)⁻¹f (≈ n at small λ: std/mean 0.8 % on
    360 PBC images in a side check), so g(H + λI)⁻¹g keeps mostly the residual term (p − y)ᵀS⁻¹(p − y), which orders
    images as ‖p − y‖² and ‖g‖² do (Spearman 0.98 with kronfluence's default damping 1e-8, 0.9997 with the
    heuristic, same top 10 % in that check). The identical numbers of the earlier README were that degeneracy, not a copy; the printed Spearman and
    top-10 % overlap with ‖g‖² show it.
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

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
    model = prepare_model(nn.Sequential(copy).float(), HeadTask())
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer("flip", model, HeadTask(), cpu=True, output_dir=folder, disable_tqdm=True)
        dataset = TensorDataset(features, labels)
        analyzer.fit_all_factors("ekfac", dataset, per_device_batch_size=256, factor_args=FactorArguments("ekfac"))
        analyzer.compute_self_scores(
            "self", "ekfac", dataset, per_device_train_batch_size=256, score_args=ScoreArguments(damping_factor=None)
        )
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
    order = rng.permutation(len(loaded.records))
    train, test = order[:n_train], order[n_train:]
    images, true = loaded.images[train], loaded.labels[train]
    noisy = true.clone()
    flipped = rng.choice(n_train, round(args.flip * n_train), replace=False)
    for i in flipped:
        noisy[i] = int(rng.choice([c for c in range(len(config.CLASSES)) if c != int(true[i])]))
    is_flipped = np.zeros(n_train, dtype=bool)
    is_flipped[flipped] = True
    print(
        f"{len(loaded.records)} images read ({len(loaded.unreadable)} unreadable), {n_train} for training, "
        f"{len(test)} test images, {is_flipped.sum()} training labels flipped (seed {args.seed})"
    )

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model = prepare_for_cpu(build_model("efficientnet_lite0", pretrained="imagenet", freeze_backbone=True))
    if args.fine_tune_epochs:
        checkpoints, rates = fine_tune(model, images, noisy, args.fine_tune_epochs, args.seed)
        recipe = f"whole network fine-tuned {args.fine_tune_epochs} epochs (AdamW {config.LEARNING_RATE:g})"
    else:
        features = extract_features(model, images, desc="ImageNet features")
        checkpoints, rates = head_recipe(features, noisy, last_linear(model), args.seed)
        recipe = (
            f"last layer trained {HEAD_EPOCHS} epochs on frozen ImageNet features (SGD, Nesterov momentum, "
            f"cosine from {HEAD_LR:g}, batch {HEAD_BATCH})"
        )
    print(f"trained ({recipe}) in {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    if args.fine_tune_epochs:  # the backbone changed: the final model's features (frozen: the ones trained on)
        features = extract_features(model, images, desc="final features")
    head = last_linear(model).float()
    # what build_index does (features + replay), reusing the features instead of a second forward pass
    index = InfluenceIndex(
        paths=[str(loaded.records[i].path) for i in train],
        labels=noisy,
        features=features,
        final_head=_state(head),
        checkpoints=replay_head(features, noisy, len(config.CLASSES)),
        classes=list(config.CLASSES),
        img_size=IMG_SIZE,
    )
    build_seconds = time.perf_counter() - started
    with torch.no_grad():
        logits = head(index.features)
    print(
        f"training accuracy against the noisy labels {(logits.argmax(1) == noisy).float().mean():.3f}, "
        f"against the true labels {(logits.argmax(1) == true).float().mean():.3f}"
    )
    test_features = extract_features(model, loaded.images[test], desc="test features")
    test_labels = loaded.labels[test]
    with torch.no_grad():
        print(f"test accuracy {(head(test_features).argmax(1) == test_labels).float().mean():.3f}")

    rankings: dict[str, tuple[np.ndarray, float]] = {}

    def timed(name: str, score) -> None:
        begun = time.perf_counter()
        rankings[name] = (np.asarray(score()), time.perf_counter() - begun)

    timed(
        f"TracInCP, the {len(checkpoints)} real checkpoints",
        lambda: tracin_self_influence(index.features, noisy, checkpoints, rates),
    )
    timed(f"TracInCP, {len(index.checkpoints)}-epoch replay (product)", lambda: index.self_influence("tracin").numpy())
    timed("grad_dot self-influence ‖g‖²", lambda: index.self_influence("grad_dot").numpy())
    # harm to the test set: Σ_test −g_train·g_test (index.scores gives +g_train·g_test)
    timed(
        f"grad_dot Σ over {len(test)} test images",
        lambda: -index.scores(test_features, test_labels, "grad_dot").sum(0).numpy(),
    )
    rankings["plain loss"] = (F.cross_entropy(logits, noisy, reduction="none").numpy(), 0.0)
    if args.with_ekfac:
        timed("kronfluence EK-FAC self-influence", lambda: ekfac_self_influence(index.features, noisy, head))

    print(
        f"\nindex build ({'final features + ' if args.fine_tune_epochs else ''}{len(index.checkpoints)}-epoch "
        f"last-layer replay): {build_seconds:.1f} s"
    )
    norm2 = rankings["grad_dot self-influence ‖g‖²"][0]
    top_norm2 = set(np.argsort(-norm2, kind="stable")[: round(0.1 * n_train)])
    print(
        f"{'ranking':42s} {'flipped in top 10%':>18s} {'Spearman vs ‖g‖²':>17s} {'top 10% shared with ‖g‖²':>25s} "
        f"{'seconds':>8s}"
    )
    for name, (scores, seconds) in rankings.items():
        rho = spearmanr(scores, norm2).statistic
        shared = len(top_norm2 & set(np.argsort(-scores, kind="stable")[: len(top_norm2)])) / len(top_norm2)
        print(f"{name:42s} {found_in_top(scores, is_flipped, 0.1):18.1%} {rho:17.3f} {shared:25.1%} {seconds:8.2f}")
    print(f"{'random order (expected)':42s} {args.flip:18.1%}")


if __name__ == "__main__":
    main()
