"""Influence of training images: which training images help or hurt one prediction, and which look mislabelled.

Both methods work on the gradient of the cross-entropy loss with respect to the weights of the model's last linear
layer. For a linear head that gradient has a closed form, ∂L/∂W = (softmax − onehot) ⊗ features, so the dot
product of two images' gradients is ((p_i − y_i)·(p_j − y_j)) × (f_i·f_j): a gradient is never materialised and a
query against every training image costs one matrix product over the cached features (cheap: milliseconds for
thousands of images). captum's ``TracInCPFast`` implements exactly this factorisation: self-influence runs on it;
queries use the same closed form with the training side cached in the index (``InfluenceIndex.scores``).

(a) ``grad_dot``, the seed project's approximation: score(train, test) = −g_train·g_test at the final model (Koh &
    Liang's influence −g_testᵀ H⁻¹ g_train with the Hessian replaced by the identity). Positive = up-weighting the
    training image raises the test loss (harmful), negative = helpful. Its self-influence ‖g‖² ranks suspicious
    training images.
(b) TracInCP (Pruthi et al. 2020, captum ``TracInCPFast``): the same dot product summed over checkpoints along the
    training trajectory, Σ_t η_t g_train(t)·g_test(t). A mislabelled image keeps a large gradient through most of
    training, while a hard but correct one is learnt early, so summing over the trajectory separates them better than
    any single model state. ``wbc train`` stores the last layer after every epoch in the model file
    (``modelfile.head_checkpoints``), and TracInCP then sums over those real checkpoints (with the final features: the
    usual last-layer approximation). Files without them (the shipped default model predates them) fall back on a
    *replay*: a fresh copy of the head retrained on the model's own fixed features for a few seconds, every epoch kept
    as a checkpoint; the summary says which (``checkpoints``).

Why TracInCP over a replay, and not kronfluence's EK-FAC (the other library method measured): on 900 PBC training
images with 10 % of the labels flipped (``bench/influence_flip.py --with-ekfac``: EfficientNet-Lite0, ImageNet
weights, 128 px; last layer trained on the frozen features with a recipe of its own, SGD for 12 epochs), the share of
flipped images among the top 10 % of each ranking was: TracInCP over the replay 82.2 %, TracInCP over the model's own
12 epoch checkpoints 60.0 %, ‖g‖² at the final model 57.8 %, loss 57.8 %, EK-FAC 57.8 % (2026-12-01,
bench_out/influence_flip/). EK-FAC on the last layer degenerates here: with fewer training images than features
every image has about the same leverage under its activation factor, so it ranks like ‖g‖² (Spearman 0.999); and it
costs more (31 s against 3 s for TracIn's self-influence on those 900 images, 2 busy shared cores). The replay beats
the real trajectory (also on a fine-tuned model in an earlier prototype: 92 % against 64 % over 3 real epoch
checkpoints), likely because its slower AdamW keeps many checkpoints early in learning, where flipped labels resist.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from captum.influence import TracInCPFast
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from wbc_trust import config, plots
from wbc_trust.crop import CropPolicy
from wbc_trust.data import (
    DatasetIndex,
    Record,
    find_dataset,
    load_images,
    match_training_data,
    model_labels,
    model_split,
    to_unit,
)
from wbc_trust.errors import WbcError
from wbc_trust.evaluate import choose_records
from wbc_trust.io import atomic_write, write_csv, write_json
from wbc_trust.modelfile import head_checkpoints, load_model
from wbc_trust.models import WbcClassifier, autocast, prepare_for_cpu

#: ``tracin``: TracInCP over the checkpoints; ``grad_dot``: −g_train·g_test at the final model (see above).
METHODS: tuple[str, ...] = ("tracin", "grad_dot")
INDEX_FILE = "influence_index.safetensors"


def last_linear(model: WbcClassifier) -> nn.Linear:
    """The model's final ``nn.Linear`` (the classifier layer whose gradients both methods use)."""
    return model.last_linear()


@torch.no_grad()  # not inference_mode: captum differentiates through these features later
def extract_features(
    model: nn.Module, images: torch.Tensor, batch_size: int = config.INFLUENCE_BATCH_SIZE, desc: str = "features"
) -> torch.Tensor:
    """The inputs of the last linear layer (N×D float32) for uint8 images, in eval mode, under bf16 where native."""
    model = prepare_for_cpu(model.eval())
    captured: list[torch.Tensor] = []
    handle = last_linear(model).register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].float()))
    try:
        for start in tqdm(
            range(0, len(images), batch_size), desc=desc, unit="batch", leave=False, disable=len(images) <= batch_size
        ):
            batch = to_unit(images[start : start + batch_size]).contiguous(memory_format=torch.channels_last)
            with autocast():
                model(batch)
    finally:
        handle.remove()
    return torch.cat(captured) if captured else torch.empty(0, last_linear(model).in_features)


def _fresh_head(weights: dict[str, torch.Tensor]) -> nn.Linear:
    out_features, in_features = weights["weight"].shape
    head = nn.Linear(in_features, out_features)
    head.load_state_dict(weights)
    return head


def replay_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    epochs: int = config.INFLUENCE_REPLAY_EPOCHS,
    lr: float = config.INFLUENCE_REPLAY_LR,
    seed: int = config.SEED,
) -> list[dict[str, torch.Tensor]]:
    """Retrain a fresh last layer on fixed features and keep its weights after every epoch: TracIn's checkpoints.

    Plain minibatch AdamW on cross-entropy, seeded; a few seconds for thousands of images.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], n_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=config.WEIGHT_DECAY)
    checkpoints = []
    for _ in tqdm(range(epochs), desc="replaying the last layer", unit="epoch", leave=False):
        for batch in torch.randperm(len(features), generator=generator).split(config.INFLUENCE_REPLAY_BATCH):
            loss = nn.functional.cross_entropy(head(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        checkpoints.append({k: v.detach().clone() for k, v in head.state_dict().items()})
    return checkpoints


def _residuals(weights: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """softmax − onehot of a last layer: the loss gradient with respect to its outputs."""
    with torch.no_grad():
        logits = _fresh_head(weights)(features)
    return logits.softmax(1) - nn.functional.one_hot(labels, logits.shape[1]).float()


def _fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """Identifies the model an index was built for (hash of its last layer's weights)."""
    return hashlib.sha256(weights["weight"].float().numpy().tobytes()).hexdigest()[:16]


@dataclass
class InfluenceIndex:
    """Everything a query needs, saved beside the results: training features, labels, the final last layer and the
    replayed checkpoints. Built once per model and training set; each query then takes milliseconds."""

    paths: list[str]
    labels: torch.Tensor  # N, class index in ``classes``
    features: torch.Tensor  # N×D float32
    final_head: dict[str, torch.Tensor]
    checkpoints: list[dict[str, torch.Tensor]]
    classes: list[str]
    img_size: int
    _train_residuals: dict[str, list[torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def save(self, path: Path) -> None:
        """One safetensors file (tensors only, so loading it can never run code) with the paths in its metadata."""
        tensors = {
            "features": self.features.contiguous(),
            "labels": self.labels.contiguous(),
            **{f"final.{k}": v.contiguous() for k, v in self.final_head.items()},
        }
        for i, state in enumerate(self.checkpoints):
            tensors.update({f"checkpoint{i}.{k}": v.contiguous() for k, v in state.items()})
        meta = {
            "paths": self.paths,
            "classes": self.classes,
            "img_size": self.img_size,
            "n_checkpoints": len(self.checkpoints),
            "replay_lr": config.INFLUENCE_REPLAY_LR,
        }
        blob = save_safetensors(tensors, metadata={"wbc_trust_influence": json.dumps(meta)})
        atomic_write(Path(path), lambda f: f.write(blob))

    @classmethod
    def load(cls, path: Path) -> InfluenceIndex:
        """Read an index written by ``save`` (``wbc trust influence`` leaves one in its output folder)."""
        path = Path(path)
        if not path.exists():
            raise WbcError(f"influence index {path} does not exist: build it with `wbc trust influence`")
        try:
            with safe_open(str(path), "pt") as handle:
                meta = json.loads(handle.metadata()["wbc_trust_influence"])
            tensors = load_safetensors(path.read_bytes())
        except Exception as exc:
            raise WbcError(f"{path} is not an influence index ({exc}): rebuild it with `wbc trust influence`") from exc
        return cls(
            paths=meta["paths"],
            labels=tensors["labels"],
            features=tensors["features"],
            final_head={k: tensors[f"final.{k}"] for k in ("weight", "bias")},
            checkpoints=[
                {k: tensors[f"checkpoint{i}.{k}"] for k in ("weight", "bias")} for i in range(meta["n_checkpoints"])
            ],
            classes=meta["classes"],
            img_size=meta["img_size"],
        )

    def tracer(self, method: str) -> TracInCPFast:
        """captum's TracInCPFast over the index: the checkpoints ("tracin") or the final layer ("grad_dot")."""
        checkpoints, rate = self._trajectory(method)
        model = nn.Sequential(_fresh_head(self.final_head))

        def load_checkpoint(net: nn.Module, state: dict[str, torch.Tensor]) -> float:
            net[0].load_state_dict(state)
            return rate

        return TracInCPFast(
            model,
            model[0],
            TensorDataset(self.features, self.labels),
            checkpoints,
            checkpoints_load_func=load_checkpoint,
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=config.INFLUENCE_TRAIN_CHUNK,
        )

    def self_influence(self, method: str = "tracin") -> torch.Tensor:
        """Per training image, Σ_t η_t ‖g(t)‖² (TracIn) or ‖g‖² at the final model (grad_dot): high = suspicious."""
        loader = DataLoader(TensorDataset(self.features, self.labels), batch_size=config.INFLUENCE_TRAIN_CHUNK)
        return self.tracer(method).self_influence(loader).detach()

    def _trajectory(self, method: str) -> tuple[list[dict[str, torch.Tensor]], float]:
        if method not in METHODS:
            raise WbcError(f"unknown influence method {method!r}: choose one of {', '.join(METHODS)}")
        if method == "tracin":
            return self.checkpoints, config.INFLUENCE_REPLAY_LR
        return [self.final_head], 1.0

    def scores(self, features: torch.Tensor, labels: torch.Tensor, method: str = "tracin") -> torch.Tensor:
        """TracIn scores Σ_t η_t g_train(t)·g_query(t) of every (query, training image) pair, Q×N.

        The same numbers as captum's ``TracInCPFast.influence`` (the tests check it), computed from the closed form
        ((p_q − y_q)·(p_i − y_i)) × (f_q·f_i) with the training side cached in the index: captum recomputes the
        training images' residuals for every query (≈2 s per query for 6,000 images on 2 busy cores), and its
        precomputing variant ``TracInCPFastRandProj`` needs the ``annoy`` package for its top-k search.
        """
        states, rate = self._trajectory(method)
        if method not in self._train_residuals:
            self._train_residuals[method] = [_residuals(s, self.features, self.labels) for s in states]
        products = sum(
            _residuals(s, features, labels) @ train.T for s, train in zip(states, self._train_residuals[method])
        )
        return rate * products * (features @ self.features.T)

    def top_k(
        self, features: torch.Tensor, labels: torch.Tensor, k: int, method: str = "tracin"
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """For each query (features, label), the k most helpful and most harmful training images.

        Scores follow Koh & Liang's sign: the estimated change of the query's loss when the training image is
        up-weighted, so helpful images have negative scores and harmful ones positive.
        """
        change = -self.scores(features, labels, method)
        k = min(k, change.shape[1])
        helpful, harmful = torch.topk(-change, k, dim=1), torch.topk(change, k, dim=1)
        return {"helpful": (helpful.indices, -helpful.values), "harmful": (harmful.indices, harmful.values)}

    def check_model(self, model: nn.Module) -> None:
        """Refuse an index built for another model: its features and checkpoints would be meaningless."""
        weights = {k: v.detach().float() for k, v in last_linear(model).state_dict().items()}
        if _fingerprint(weights) != _fingerprint(self.final_head):
            raise WbcError(
                "the influence index was built for another model: rebuild it with `wbc trust influence "
                "--model <this model>`"
            )


def build_index(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    paths: Sequence[str],
    classes: Sequence[str],
    img_size: int,
    checkpoints: list[dict[str, torch.Tensor]] | None = None,
) -> InfluenceIndex:
    """One forward pass over the training images (no backward, no augmentation), then TracIn's checkpoints: the
    model's own last layer after each training epoch when ``wbc train`` stored them in the model file
    (``modelfile.head_checkpoints``: influence then explains the model's real training), else a few seconds of
    last-layer replay (model files without them, e.g. the shipped default). Cheaper than one training epoch."""
    features = extract_features(model, images, desc="training-image features")
    final = {k: v.detach().float().clone() for k, v in last_linear(model).state_dict().items()}
    if not checkpoints:
        checkpoints = replay_head(features, labels.long(), len(classes))
    return InfluenceIndex(
        paths=list(paths),
        labels=labels.long(),
        features=features,
        final_head=final,
        checkpoints=[{k: v.float() for k, v in c.items()} for c in checkpoints],
        classes=list(classes),
        img_size=img_size,
    )


def influential_training_images(
    model: nn.Module,
    image: torch.Tensor,
    index: InfluenceIndex,
    k: int = config.INFLUENCE_TOP_K,
    method: str = "tracin",
) -> dict:
    """For one uint8 image (3×S×S, as ``Predictor.to_tensor`` gives it): the k training images that most supported
    and most opposed the model's answer. The image has no label, so influence is measured on the predicted class.

    Returns ``{"prediction": class, "helpful": [{path, label, score}], "harmful": [...]}``; for the app.
    """
    index.check_model(model)
    features = extract_features(model, image[None])
    prediction = _fresh_head(index.final_head)(features).argmax(1)
    found = index.top_k(features, prediction, k, method)
    return {
        "prediction": index.classes[int(prediction)],
        **{kind: _described(index, idx[0], scores[0]) for kind, (idx, scores) in found.items()},
    }


def _described(index: InfluenceIndex, idx: torch.Tensor, scores: torch.Tensor) -> list[dict]:
    return [
        {"path": index.paths[int(i)], "label": index.classes[int(index.labels[i])], "score": float(s)}
        for i, s in zip(idx, scores)
    ]


# ---------------------------------------------------------------------------------------------------------------
# wbc trust influence
# ---------------------------------------------------------------------------------------------------------------


def training_records(index: DatasetIndex, meta: dict) -> list[Record]:
    """The images a model trained on in a folder: the Kaggle train split, or, when the folder holds the model's own
    training data (recognised by content wherever it lies, ``data.match_training_data``), exactly its training split:
    its held-out test images and its validation and calibration images (which chose and calibrated the model, but
    never moved its weights) are left out. Any other folder: all of its images."""
    if "train" in index.splits:
        return index.splits["train"]
    pool = index.splits.get("all", [])
    match = match_training_data(index, meta)
    if match.same:
        parts = model_split(index, meta, "pass the folder the model was trained on as it was (--train-data)")
        return parts["train"]
    if match.changed:  # its split cannot be recomputed: at least its held-out test files stay out
        held_out = set(meta.get("data", {}).get("test_files", []))
        return [r for r in pool if str(r.path.relative_to(index.root)) not in held_out]
    return pool


def _subsample(records: list[Record], limit: int | None) -> list[Record]:
    """Evenly spaced, so every class keeps its share (folders are sorted by class)."""
    if not limit or len(records) <= limit:
        return records
    return [records[i] for i in np.linspace(0, len(records) - 1, limit).round().astype(int)]


def found_curve(scores: np.ndarray, flagged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inspect images from the highest score down: (fraction inspected, fraction of flagged images found)."""
    order = np.argsort(-scores, kind="stable")
    found = np.concatenate([[0.0], np.cumsum(flagged[order]) / max(1, flagged.sum())])
    return np.arange(len(scores) + 1) / len(scores), found


def found_in_top(scores: np.ndarray, flagged: np.ndarray, fraction: float = 0.1) -> float:
    """Fraction of the flagged images among the top ``fraction`` of the ranking (precision at that depth)."""
    top = np.argsort(-scores, kind="stable")[: max(1, round(fraction * len(scores)))]
    return float(flagged[top].mean())


def run_influence(
    model_path: Path | None,
    data: Path,
    out: Path,
    *,
    train_data: Path,
    max_train: int | None = None,
    max_test: int | None = None,
) -> dict:
    """Rank the training images of ``train_data`` by self-influence and explain each test image of ``data`` by its
    most helpful and harmful training images. Writes train_influence.csv, test_influence.json, influence_curve.png,
    influence_harmful.png and the reusable influence_index.safetensors into ``out``; returns a summary."""
    out = Path(out)
    model, meta = load_model(model_path)
    classes, size, crop = meta["classes"], meta["img_size"], CropPolicy.from_meta(meta)
    train_index = find_dataset(train_data, require_all_classes=False)
    train = load_images(_subsample(training_records(train_index, meta), max_train), crop, desc="training images")
    test = load_images(
        _subsample(choose_records(find_dataset(data, require_all_classes=False), meta).records, max_test),
        crop,
        desc="test images",
    )
    if not train.records or not test.records:
        raise WbcError(f"no readable images in {train_data if not train.records else data}: pass labelled folders")
    train_labels = torch.from_numpy(model_labels(train.records, classes))
    test_labels = torch.from_numpy(model_labels(test.records, classes))
    train_paths = [str(r.path) for r in train.records]

    started = time.perf_counter()
    trained_heads = head_checkpoints(model_path)
    index = build_index(model, train.images, train_labels, train_paths, classes, size, checkpoints=trained_heads)
    build_seconds = time.perf_counter() - started
    index.save(out / INDEX_FILE)

    head = _fresh_head(index.final_head)
    with torch.no_grad():
        train_logits = head(index.features)
    predictions = train_logits.argmax(1)
    scores = {m: index.self_influence(m).numpy() for m in METHODS}
    loss = nn.functional.cross_entropy(train_logits, train_labels, reduction="none").numpy()
    _write_train_csv(out / "train_influence.csv", index, scores, predictions)

    test_features = extract_features(model, test.images, desc="test-image features")
    started = time.perf_counter()
    explained = _explain_tests(index, test.records, test_features, test_labels, head)
    query_seconds = (time.perf_counter() - started) / len(test.records)
    write_json(
        out / "test_influence.json",
        {
            "method": "TracInCP (captum TracInCPFast) over the replayed last-layer checkpoints; grad_dot_* = "
            "−g_train·g_test at the final model",
            "score": "estimated change of the test image's loss if the training image were up-weighted: "
            "negative = helpful, positive = harmful",
            "images": explained,
        },
    )

    # On real data nobody knows which labels are wrong; the training images the model itself disagrees with are the
    # best available stand-in for "should be inspected".
    flagged = (predictions != train_labels).numpy()
    curves = {
        name: found_curve(s, flagged)
        for name, s in (
            ("TracInCP self-influence", scores["tracin"]),
            ("‖g‖² at the final model", scores["grad_dot"]),
            ("loss", loss),
        )
    }
    plots.influence_curve(
        curves,
        out / "influence_curve.png",
        title=f"{int(flagged.sum())} of {len(flagged)} training images disagree with the model",
    )
    _harmful_gallery(index, train.images, scores["tracin"], predictions, out / "influence_harmful.png")
    order = np.argsort(-scores["tracin"], kind="stable")
    return {
        "method": "tracin",
        "n_train": len(train.records),
        "n_test": len(test.records),
        "n_checkpoints": len(index.checkpoints),
        "checkpoints": (
            "the model's last layer after each training epoch"
            if trained_heads
            else "replayed: the model file stores no training checkpoints"
        ),
        "index_build_seconds": round(build_seconds, 2),
        "seconds_per_query": round(query_seconds, 4),
        "n_disagreeing_train": int(flagged.sum()),
        "disagreeing_in_top_10pct": {
            "tracin": found_in_top(scores["tracin"], flagged),
            "grad_dot": found_in_top(scores["grad_dot"], flagged),
            "loss": found_in_top(loss, flagged),
        }
        if flagged.any()
        else None,
        "most_harmful": [index.paths[i] for i in order[: config.INFLUENCE_GALLERY]],
        "unreadable": [str(p) for p, _ in train.unreadable + test.unreadable],
    }


def _write_train_csv(
    path: Path, index: InfluenceIndex, scores: dict[str, np.ndarray], predictions: torch.Tensor
) -> None:
    write_csv(
        path,
        (
            [
                index.paths[i],
                index.classes[int(index.labels[i])],
                f"{scores['tracin'][i]:.6g}",
                index.classes[int(predictions[i])],
                f"{scores['grad_dot'][i]:.6g}",
            ]
            for i in np.argsort(-scores["tracin"], kind="stable")
        ),
        ["path", "label", "score", "prediction", "grad_dot_self_influence"],
    )


def _explain_tests(
    index: InfluenceIndex, records: Sequence[Record], features: torch.Tensor, labels: torch.Tensor, head: nn.Linear
) -> list[dict]:
    """Top-k helpful and harmful training images per test image, by both methods."""
    with torch.no_grad():
        predictions = head(features).argmax(1)
    explained = []
    for start in tqdm(
        range(0, len(records), config.INFLUENCE_BATCH_SIZE), desc="explaining test images", unit="batch", leave=False
    ):
        stop = start + config.INFLUENCE_BATCH_SIZE
        found = {m: index.top_k(features[start:stop], labels[start:stop], config.INFLUENCE_TOP_K, m) for m in METHODS}
        for j, record in enumerate(records[start:stop]):
            row = {
                "path": str(record.path),
                "label": index.classes[int(labels[start + j])],
                "prediction": index.classes[int(predictions[start + j])],
            }
            for method, by_kind in found.items():
                prefix = "" if method == "tracin" else f"{method}_"
                for kind, (idx, scores) in by_kind.items():
                    row[prefix + kind] = _described(index, idx[j], scores[j])
            explained.append(row)
    return explained


def _harmful_gallery(
    index: InfluenceIndex, images: torch.Tensor, scores: np.ndarray, predictions: torch.Tensor, path: Path
) -> None:
    top = np.argsort(-scores, kind="stable")[: config.INFLUENCE_GALLERY]
    plots.image_gallery(
        [images[i].permute(1, 2, 0).numpy() for i in top],
        [
            f"{Path(index.paths[i]).name}\nlabel {index.classes[int(index.labels[i])]}, "
            f"model {index.classes[int(predictions[i])]}\nself-influence {scores[i]:.3g}"
            for i in top
        ],
        path,
        title="Training images with the highest TracIn self-influence (most likely mislabelled or atypical)",
    )
