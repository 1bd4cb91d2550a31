"""``wbc adapt``: make a model read another lab's cells, from a few of that lab's labelled cells, or from its
unlabelled images, and recalibrate its trust columns on that lab.

- **With labels** (``--data``: class folders, any layout ``wbc train`` reads): first the stages after the base
  recipe's frozen ones are fine-tuned on the lab's cells, augmented as the base model was trained
  (``config.ADAPT_LAB_AUGMENT`` can keep their stain instead: measured, no clear gain), mixed with the base model's own
  training images, augmented as it was trained (*replay*: the base lab's knowledge, and all a class with fewer than
  ``config.ADAPT_MIN_CELLS`` lab cells is learnt from; ``FineTuning``, ``config.ADAPT_FINE_TUNE_*``; about a minute
  on 2 cores, three times over with the cross-fitted calibration). Then the classification head is re-fitted on the
  pooled features of the lab's cells (computed once, with the model's test-time views) plus the replay's, starting
  from the fine-tuned head and pulled towards it (an L2 penalty), so a handful of cells moves it only as far as they
  justify. Fine-tuning was chosen by measurement (docs/another-lab.md: 76 % against 60 % for the head alone
  at 10 BCCD cells per class, and half of the answers unflagged instead of none); ``--fine-tune-steps 0`` keeps the
  backbone as it is (seconds). Before all that, the batch-norm statistics are re-estimated on the lab's labelled
  cells themselves (AdaBN, below; on the ``--unlabelled`` images where given): they are the lab's images too.
- **Recalibrated on the lab**, cross-fitted because the cells are few: the temperature and the prediction sets are
  fitted on each cell's logits from a model that has not seen it: heads fitted ``config.ADAPT_FOLDS`` times, each
  without one fold of the lab's cells, or after fine-tuning ``config.ADAPT_FINE_TUNE_FOLDS`` copies each fine-tuned
  without one fold (``FineTuning.cross_fitted``), since the final model has seen every cell; the OOD statistics are
  the lab cells' features (their threshold cross-fitted by ``ood.py``) and the lab statistic (``lab.py``) their
  images' colours. So a flag on the adapted model means on that lab what it means on
  PBC for the base model. Prediction sets are class-conditional when every class has enough lab cells for the coverage,
  marginal LAC otherwise (a class-conditional quantile from 5 cells would put the class in every set).
- **Without labels** (``--unlabelled DIR`` alone): the lab's colours are mapped to the training lab's before the
  network (``colour.ColourTransfer``: Reinhard's transfer in CIELAB, statistics of the lab's views against those of
  the base model's training images, its replay). Together with ``--data``, whose fine-tuning mixes the lab's cells
  with replay images in the home lab's colours, the batch-norm statistics are re-estimated on the lab's images
  instead (AdaBN, Li et al. 2016: every batch-norm layer averages the lab's batch statistics, momentum None, no
  gradient). On BCCD the colour transfer read fields and crops at the lab's scale 1-13 points better than AdaBN, and
  the two together below the better of the two (docs/another-lab.md). Without labels nothing can
  recalibrate the trust columns on the lab, so they stay the base model's (and keep flagging the lab as new).
- **The lab's class prevalence** (with ``--unlabelled``, with or without labels): the model is fitted class-balanced,
  a lab's smears are mostly neutrophils; EM on the lab's unlabelled images estimates how many of each class they
  hold (``lab_prevalence``), and the head's bias moves the calibrated probabilities to that prevalence
  (``shift_to_lab_prevalence``), recorded in ``meta["adapted"]["class_prevalence"]``. With labels too, the
  prediction sets are then refitted on the probabilities as the moved head gives them, the marginal ones with each
  lab cell weighted by its class's share of the lab over its share of the labelled cells
  (``sets_at_lab_prevalence``), so that they cover the lab's cells in the proportions the lab holds them.

- **The lab's magnification** (cell-view models): one microscope has one scale, so the adapted model cuts every image
  of the lab at it (``meta["crop"]["px_per_um"]``) instead of each image's own ruler: ``--px-per-um`` where the lab
  knows it, else the median red-cell ruler of the lab's images where they agree, else, for a folder of tight crops,
  their median frame (``crop.lab_scale``; small crops cut their red cells and do not agree). A tight crop then keeps
  its cell's size, which each crop alone cannot tell. The replay images stay at their own lab's scale.

The adapted model file records its provenance in ``meta["adapted"]``: base model (path and SHA-256), the lab data's
fingerprint, cells per class, replay source, and which classes kept the base model's knowledge.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import nn
from tqdm import tqdm

from wbc_trust import config
from wbc_trust.calibration import Calibration, calibration_error, fit_temperature
from wbc_trust.colour import ColourTransfer, LabStatistics
from wbc_trust.conformal import MondrianConformal, SplitConformal, check_coverage
from wbc_trust.crop import CropPolicy
from wbc_trust.data import (
    LoadedImages,
    Record,
    cache_dir,
    file_digest,
    find_dataset,
    find_unlabelled,
    load_images,
    measure_scale,
    model_labels,
    split_plan,
    to_unit,
    train_transform,
)
from wbc_trust.errors import WbcError
from wbc_trust.io import atomic_write
from wbc_trust.lab import LabShift
from wbc_trust.modelfile import load_extra, load_model, save_model
from wbc_trust.models import WbcClassifier, autocast, autocast_dtype, logits_and_features, prepare_for_cpu
from wbc_trust.ood import ood_score_class
from wbc_trust.train import cpu_training_kernels

log = logging.getLogger(__name__)

_CALIBRATION_TENSORS = ("conformal.", "ood.")


# ---------------------------------------------------------------------------------------------------------------
# The lab's images
# ---------------------------------------------------------------------------------------------------------------


def lab_records(data: Path) -> list[Record]:
    """The lab's labelled cells (records, not yet read); a folder that is not labelled is refused."""
    try:
        index = find_dataset(data, require_all_classes=False)
    except WbcError as exc:
        raise WbcError(
            f"--data {data} is not a labelled folder ({exc}). wbc adapt needs the lab's labelled cells "
            f"as one sub-folder per class ({', '.join(config.CLASSES)}; any letter case, or the Kaggle "
            "layout); for images without labels use --unlabelled DIR"
        ) from exc
    return [r for rs in index.splits.values() for r in rs]


def read_lab_cells(records: list[Record], crop: CropPolicy) -> LoadedImages:
    """The lab's labelled cells as the model sees them (its crop policy at the lab's scale)."""
    loaded = load_images(records, crop, desc="decoding the lab's cells")
    for path, reason in loaded.unreadable:
        log.warning(f"skipped unreadable file {path}: {reason}")
    return loaded


def measure_lab_scale(paths: list[Path], crop: CropPolicy, given: float | None) -> tuple[CropPolicy, dict | None]:
    """The base policy at the lab's magnification, and where that came from: ``given`` (the lab knows its µm per
    pixel), else what the lab's images read (``crop.lab_scale``: their red cells, or the frames of tight crops), else
    none (each image keeps its own scale, and it says why). A whole-frame model reads no scale."""
    if crop.kind != "cell":
        if given is not None:
            raise WbcError(
                "--px-per-um needs a model with the cell view (wbc train --crop cell); this one reads frames"
            )
        return crop, None
    if given is not None:
        return crop.with_lab_scale(given), {"value": given, "source": "given (--px-per-um)"}
    scale, why = measure_scale(paths, "measuring the lab's magnification")
    if scale is None:
        log.warning(
            f"the lab's magnification could not be measured: {why}; so each image keeps its own scale. Pass "
            "--px-per-um if the lab knows its pixels per µm, or add a few of its smear fields: without a scale, "
            "adapting to tight crops can read them worse than the base model (docs/another-lab.md)"
        )
        return crop, None
    log.info(f"the lab's magnification: {scale:.2f} px/µm ({why})")
    return crop.with_lab_scale(scale), {"value": scale, "source": why}


def lab_fingerprint(loaded: LoadedImages) -> str:
    """SHA-256 over the sorted (class, file SHA-256) pairs (unlabelled images: class "-"): same images and labels,
    same fingerprint, whatever their names or folder."""
    lines = sorted(
        f"{'-' if r.label is None else config.CLASSES[r.label]}\t{d}\n" for r, d in zip(loaded.records, loaded.digests)
    )
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def replay_features(model: WbcClassifier, base_sha256: str, replay: LoadedImages) -> torch.Tensor:
    """Pooled features of the replay images through ``model``, cached beside the decoded images (``data.cache_dir``)
    under the base model's SHA-256 and the replay files' digests: every `wbc adapt` of one base model reads the same
    replay images, and on 2 cores computing their features is most of a run's time. Not cached after batch-norm
    re-estimation (the features then depend on the lab)."""
    key = hashlib.sha256("\n".join([base_sha256, *replay.digests]).encode()).hexdigest()[:24]
    path = cache_dir() / f"replay-features-{key}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a damaged cache file is recomputed, never trusted
            path.unlink(missing_ok=True)
    features = logits_and_features(model, replay.images, progress=True)[1].float().clone()
    atomic_write(path, lambda f: torch.save(features, f))
    return features


def replay_cells(
    meta: dict, crop: CropPolicy, per_class: int = config.ADAPT_REPLAY_PER_CLASS, seed: int = config.SEED
) -> tuple[LoadedImages | None, str]:
    """Up to ``per_class`` images per class of the base model's training data (never its held-out test files), else
    the shipped sample of PBC images, else none; and a sentence saying which."""
    root = Path(meta.get("data", {}).get("root", ""))
    records: list[Record] = []
    source = ""
    if root.is_dir():
        try:
            pool, _, _ = split_plan(find_dataset(root, require_all_classes=False))
            test = set(meta["data"].get("test_files", []))
            records = [r for r in pool if str(r.path.relative_to(root)) not in test]
            source = f"the base model's training data {root}"
        except WbcError as exc:
            log.warning(f"the base model's training data {root} cannot be read ({exc})")
    if not records and config.SAMPLE_DATA_DIR.is_dir():
        records = find_dataset(config.SAMPLE_DATA_DIR, require_all_classes=False).splits["all"]
        source = (
            f"the shipped sample of {len(records)} PBC images (the base model's training data "
            f"{root or '(not named)'} is not available here)"
        )
    if not records:
        return None, "none: neither the base model's training data nor the shipped sample is available"
    generator = np.random.default_rng(seed)
    chosen = []
    for k in range(len(config.CLASSES)):
        of_class = [r for r in records if r.label == k]
        chosen += [of_class[i] for i in sorted(generator.permutation(len(of_class))[:per_class])]
    return load_images(chosen, crop, desc="decoding replay images"), source


# ---------------------------------------------------------------------------------------------------------------
# Unlabelled adaptation: batch-norm statistics of the lab
# ---------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def reestimate_batchnorm(model: WbcClassifier, images: torch.Tensor, batch_size: int = config.ADAPT_BN_BATCH) -> None:
    """AdaBN: replace every batch-norm layer's running mean and variance by the average of their batch values on
    ``images`` (uint8 N×3×S×S; momentum None = a plain average over the batches), without gradients."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise WbcError(f"{model.arch} has no batch-norm layers: --unlabelled has nothing to re-estimate")
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for start in tqdm(
            range(0, len(images), batch_size), desc="re-estimating batch norm", unit="batch", leave=False
        ):
            x = images[start : start + batch_size].float().div(255.0).contiguous(memory_format=torch.channels_last)
            with autocast():
                model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()


def lab_prevalence(
    probs: torch.Tensor, floor: float = config.ADAPT_PRIOR_FLOOR, iterations: int = config.ADAPT_PRIOR_ITERATIONS
) -> torch.Tensor:
    """The lab's class prevalence from the model's calibrated probabilities on the lab's unlabelled images, by the EM
    of Saerens, Latinne & Decaestecker (Neural Computation 2002): re-weight each image's posterior by the prevalence,
    re-estimate the prevalence as the posteriors' mean, until the two agree. The model's own prior is uniform (trained
    with class weights, its head re-fitted class-balanced), and so is the starting point. Every class is kept at
    ``floor`` or more. Written here, not taken from QuaPy or mlquantify (whose EMQ runs the same loop): it is eight
    lines, those libraries wrap it in their own classifier framework, and neither keeps a floor."""
    n = probs.shape[1]
    p = probs.double()
    prior = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for _ in range(iterations):
        posterior = p * prior
        prior = (posterior / posterior.sum(1, keepdim=True)).mean(0).clamp(min=floor)
        prior = prior / prior.sum()
    return prior.float()


def prior_shift(prevalence: torch.Tensor) -> torch.Tensor:
    """What the calibrated logits of a model fitted class-balanced gain at a class ``prevalence``: log(C·prevalence),
    so that their softmax is the Bayes posterior under it."""
    return torch.log(len(prevalence) * prevalence)


@torch.no_grad()
def shift_to_lab_prevalence(
    model: WbcClassifier, images: torch.Tensor, temperature: float, classes: list[str]
) -> torch.Tensor:
    """Move the head's priors to the lab's class prevalence (``lab_prevalence`` on ``images``, the lab's unlabelled
    views): the final bias gains T·log(C·prevalence), so the calibrated probabilities become the Bayes posteriors under
    the lab's prevalence (softmax(z/T + log C·prevalence)) in every path that runs the network (predict, count, ONNX).
    The model was fitted class-balanced, and a lab's smears are not: most of BCCD's cells are neutrophils, which the
    balanced head gave away to eosinophils and monocytes. Measured on BCCD (docs/another-lab.md). Reads at most
    ``config.ADAPT_PRIOR_IMAGES`` of the views, spread over them. Returns the prevalence (one share per class)."""
    picked = np.unique(np.linspace(0, len(images) - 1, min(len(images), config.ADAPT_PRIOR_IMAGES)).round().astype(int))
    images = images[torch.from_numpy(picked)]
    probs = torch.softmax(logits_and_features(model, images, progress=True)[0].float() / temperature, 1)
    prevalence = lab_prevalence(probs)
    bias = model.last_linear().bias
    bias += (temperature * prior_shift(prevalence)).to(bias.dtype)
    log.info(
        f"the lab's class prevalence, estimated on {len(images)} of its images: "
        + ", ".join(f"{c} {float(v):.0%}" for c, v in zip(classes, prevalence))
    )
    return prevalence


def _shares(classes: list[str], prevalence: torch.Tensor) -> dict[str, float]:
    """The prevalence as ``meta["adapted"]["class_prevalence"]`` records it."""
    return {c: round(float(v), 4) for c, v in zip(classes, prevalence)}


# ---------------------------------------------------------------------------------------------------------------
# Labelled adaptation: fine-tuning the late stages, then the head on their features
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FineTuning:
    """How ``wbc adapt`` fine-tunes: the stages after ``frozen_stages`` and the head, ``steps`` one-cycle AdamW steps,
    each on ``config.ADAPT_FINE_TUNE_BATCH`` lab cells drawn at random, augmented by ``lab_augment``, plus as many
    ``replay`` cells (uint8 views, model labels) augmented by ``augment`` (the base recipe's) whose loss weighs
    ``config.ADAPT_REPLAY_WEIGHT``."""

    replay: tuple[torch.Tensor, torch.Tensor] | None
    augment: str
    frozen_stages: int
    steps: int = config.ADAPT_FINE_TUNE_STEPS
    seed: int = config.SEED
    lab_augment: str | None = None  # None: as the replay

    def run(self, model: WbcClassifier, cells: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Fine-tune ``model`` in place on ``cells`` (uint8 views, model labels). Batch-norm layers stay in eval
        mode: their statistics are the base model's (or the lab's, after ``--unlabelled``), which 16 lab cells a
        step would estimate badly."""
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)  # the augmentation draws from torch's global generator
        model.freeze(stages=self.frozen_stages)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=config.ADAPT_FINE_TUNE_LR, weight_decay=config.ADAPT_FINE_TUNE_WEIGHT_DECAY
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.ADAPT_FINE_TUNE_LR, total_steps=self.steps, pct_start=0.2
        )
        sources = [(*cells, 1.0, train_transform(self.lab_augment or self.augment))]
        if self.replay is not None:
            sources.append((*self.replay, config.ADAPT_REPLAY_WEIGHT, train_transform(self.augment)))
        model.train()
        for norm in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            norm.eval()
        for _ in tqdm(range(self.steps), desc="fine-tuning on the lab's cells", unit="step", leave=False):
            views, labels, weights = [], [], []
            for images, targets, weight, transform in sources:
                picked = torch.randint(len(targets), (config.ADAPT_FINE_TUNE_BATCH,), generator=generator)
                views += [transform(images[i]) for i in picked]
                labels.append(targets[picked])
                weights.append(torch.full((len(picked),), weight))
            with autocast(), cpu_training_kernels(model, "cpu", autocast_dtype() is not None):
                logits = model(to_unit(torch.stack(views)).contiguous(memory_format=torch.channels_last))
            losses = nn.functional.cross_entropy(
                logits.float(), torch.cat(labels), reduction="none", label_smoothing=config.LABEL_SMOOTHING
            )
            optimizer.zero_grad(set_to_none=True)
            (losses * torch.cat(weights)).mean().backward()
            optimizer.step()
            schedule.step()
        model.eval()

    def cross_fitted(self, model: WbcClassifier, cells: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Each lab cell's logits from a copy of ``model`` fine-tuned without it (``config.ADAPT_FINE_TUNE_FOLDS``
        stratified folds): what the calibration is fitted on, since the final model has seen every cell. Measured:
        sets fitted on the final model's own logits covered 60-81 % of BCCD's other cells at 95 % nominal."""
        images, labels = cells
        out: torch.Tensor | None = None
        splitter = StratifiedKFold(config.ADAPT_FINE_TUNE_FOLDS, shuffle=True, random_state=self.seed)
        for k, (fit_idx, held_idx) in enumerate(splitter.split(np.zeros(len(labels)), labels.numpy())):
            log.info(f"cross-fitting the calibration: fine-tuning fold {k + 1} of {config.ADAPT_FINE_TUNE_FOLDS}")
            held_out = copy.deepcopy(model)
            self.run(held_out, (images[fit_idx], labels[fit_idx]))
            logits = logits_and_features(held_out, images[held_idx])[0].float()
            out = torch.empty(len(labels), logits.shape[1]) if out is None else out
            out[held_idx] = logits
        return out


# ---------------------------------------------------------------------------------------------------------------
# Labelled adaptation: the head on the (fine-tuned) features
# ---------------------------------------------------------------------------------------------------------------


def check_head_reads_features(model: WbcClassifier, logits: torch.Tensor, features: torch.Tensor) -> None:
    """The head re-fit works on the pooled features only where the head reads exactly them (EfficientNet, ResNet,
    the seed's CNN; not VGG16, whose classifier reads the flattened 7×7 map)."""
    with torch.no_grad():
        try:
            again = model.head()(features[:8].float())
        except RuntimeError:
            again = None
    if (
        again is None
        or again.shape != logits[:8].shape
        or not torch.allclose(again, logits[:8].float(), atol=0.15, rtol=0.05)
    ):
        raise WbcError(
            f"wbc adapt re-fits the head on pooled features, and {model.arch}'s head does not read them: "
            "adapt a model of another architecture (efficientnet_lite0, the default, works)"
        )


@dataclass
class HeadData:
    """What the head is fitted on: the lab's cells and the replay cells (features and model label indices)."""

    features: torch.Tensor
    labels: torch.Tensor
    replay_features: torch.Tensor | None = None
    replay_labels: torch.Tensor | None = None


def fit_head(
    base_head: nn.Module,
    data: HeadData,
    n_classes: int,
    steps: int = config.ADAPT_HEAD_STEPS,
    lr: float = config.ADAPT_HEAD_LR,
    l2: float = config.ADAPT_HEAD_L2,
    replay_weight: float = config.ADAPT_REPLAY_WEIGHT,
    seed: int = config.SEED,
) -> nn.Module:
    """A copy of ``base_head`` fitted by full-batch Adam on the lab's features (class-balanced cross-entropy: each
    lab class weighs the same, however many cells it has) plus ``replay_weight`` × the replay cells' (class-balanced
    too), plus ``l2`` × the squared distance to the base head's weights. Full batch: a few hundred 1,280-number
    vectors, so each step is a few matrix products."""
    with _one_thread():
        return _fit_head(base_head, data, n_classes, steps, lr, l2, replay_weight, seed)


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread for the head's small matrix products: on a busy 2-core machine, 300 steps took 36 s with
    two threads (synchronisation) and 0.9 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_head(
    base_head: nn.Module,
    data: HeadData,
    n_classes: int,
    steps: int,
    lr: float,
    l2: float,
    replay_weight: float,
    seed: int,
) -> nn.Module:
    torch.manual_seed(seed)
    # clones: features computed under inference_mode cannot enter autograd
    data = HeadData(
        data.features.clone(),
        data.labels.clone(),
        None if data.replay_features is None else data.replay_features.clone(),
        None if data.replay_labels is None else data.replay_labels.clone(),
    )
    head = copy.deepcopy(base_head).float().train()
    for p in head.parameters():
        p.requires_grad_(True)
    anchor = [p.detach().clone() for p in head.parameters()]
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)

    def balanced(labels: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(labels, minlength=n_classes).float()
        present = (counts > 0).sum()
        return torch.where(counts > 0, 1.0 / (counts.clamp(min=1) * present), torch.zeros_like(counts))

    lab_w = balanced(data.labels)
    replay = data.replay_features is not None and replay_weight > 0
    rep_w = balanced(data.replay_labels) if replay else None
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(data.features), data.labels, weight=lab_w, reduction="sum")
        if replay:
            loss = loss + replay_weight * nn.functional.cross_entropy(
                head(data.replay_features), data.replay_labels, weight=rep_w, reduction="sum"
            )
        loss = loss + l2 * sum(((p - a) ** 2).sum() for p, a in zip(head.parameters(), anchor))
        loss.backward()
        optimizer.step()
    return head.eval().requires_grad_(False)


def fitted_classes(labels: torch.Tensor, n_classes: int, min_cells: int = config.ADAPT_MIN_CELLS) -> list[int]:
    """Classes with at least ``min_cells`` lab cells: the ones the head is adapted on."""
    counts = torch.bincount(labels, minlength=n_classes)
    return [k for k in range(n_classes) if counts[k] >= min_cells]


def cross_fitted_logits(
    base_head: nn.Module, data: HeadData, n_classes: int, folds: int = config.ADAPT_FOLDS, seed: int = config.SEED
) -> torch.Tensor:
    """Each lab cell's logits from a head fitted without it (stratified folds; as many as the rarest class allows,
    at most ``folds``): what calibration needs, since the final head has seen every cell."""
    smallest = int(torch.bincount(data.labels)[torch.bincount(data.labels) > 0].min())
    n_folds = max(2, min(folds, smallest))
    out = torch.empty(len(data.labels), n_classes)
    splitter = StratifiedKFold(n_folds, shuffle=True, random_state=seed) if smallest >= 2 else None
    if splitter is None:
        raise WbcError("cross-fitting needs at least two cells of every adapted class")
    parts = list(splitter.split(np.zeros(len(data.labels)), data.labels.numpy()))
    for fit_idx, held_idx in tqdm(parts, desc="cross-fitting the calibration", unit="fold", leave=False):
        head = fit_head(
            base_head,
            HeadData(data.features[fit_idx], data.labels[fit_idx], data.replay_features, data.replay_labels),
            n_classes,
            seed=seed,
        )
        with torch.no_grad():
            out[held_idx] = head(data.features[held_idx])
    return out


def lab_calibration(
    logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    images: torch.Tensor,
    coverage: float,
    fitted_on: str,
) -> tuple[Calibration, dict]:
    """Temperature, prediction sets and OOD statistics on the lab's cells (``logits`` cross-fitted), the lab
    statistic on their images; and a summary for the metadata."""
    temperature = fit_temperature(logits, labels)
    probs = torch.softmax(logits / temperature, 1)
    needed = math.ceil(coverage / (1 - coverage))
    counts = torch.bincount(labels, minlength=logits.shape[1])
    if bool((counts >= needed).all()):
        conformal = MondrianConformal.fit(probs, labels, coverage)
    else:
        conformal = SplitConformal.fit(probs, labels, coverage)
        log.info(
            f"prediction sets: marginal LAC (class-conditional {coverage:.0%} sets need {needed} lab cells of "
            f"every class; the fewest here: {int(counts.min())})"
        )
    ood = ood_score_class(config.OOD_METHOD).fit(logits, features, labels)
    calibration = Calibration(temperature, conformal, ood, fitted_on, LabShift.fit(images))
    summary = {
        "n_images": len(labels),
        "cross_fitted": True,
        "ece_before": calibration_error(torch.softmax(logits, 1), labels),
        "ece_after": calibration_error(probs, labels),
    }
    return calibration, summary


@dataclass
class Adapted:
    """A head fitted on a lab, its calibration on that lab, and what the metadata records about the fit."""

    head: nn.Module
    calibration: Calibration
    summary: dict
    adapted_classes: list[int]
    cross_fitted_accuracy: float
    out_of_fold: torch.Tensor  # the cross-fitted logits the calibration was fitted on, and their cells' labels
    labels: torch.Tensor


def fit_on_features(
    base_head: nn.Module,
    data: HeadData,
    images: torch.Tensor,
    n_classes: int,
    coverage: float = config.ADAPT_COVERAGE,
    fitted_on: str = "",
    seed: int = config.SEED,
    out_of_fold: torch.Tensor | None = None,
) -> Adapted:
    """The labelled adaptation on cached features (``wbc adapt`` and ``bench/cross_lab.py`` both call this): drop
    the classes with too few lab cells, cross-fit the calibration, fit the final head on every remaining cell.
    ``images`` are the lab cells' images (for the lab statistic), aligned with ``data.features``; ``out_of_fold``:
    the adapted classes' cells' logits cross-fitted already (``FineTuning.cross_fitted``), else from heads fitted
    without each fold."""
    keep = fitted_classes(data.labels, n_classes)
    if len(keep) < 2:
        raise WbcError(f"wbc adapt needs at least {config.ADAPT_MIN_CELLS} cells of at least two classes")
    use = torch.isin(data.labels, torch.tensor(keep))
    lab = HeadData(data.features[use], data.labels[use], data.replay_features, data.replay_labels)
    if out_of_fold is None:
        out_of_fold = cross_fitted_logits(base_head, lab, n_classes, seed=seed)
    head = fit_head(base_head, lab, n_classes, seed=seed)
    calibration, summary = lab_calibration(out_of_fold, lab.features, lab.labels, images[use], coverage, fitted_on)
    accuracy = float((out_of_fold.argmax(1) == lab.labels).float().mean())
    return Adapted(head, calibration, summary, keep, accuracy, out_of_fold, lab.labels)


def sets_at_lab_prevalence(
    fitted: Adapted, prevalence: torch.Tensor, coverage: float
) -> MondrianConformal | SplitConformal:
    """The prediction sets refitted for the lab's class prevalence (``shift_to_lab_prevalence`` has moved the head):
    the cells' cross-fitted scores taken on the probabilities as the shifted head gives them, and, for marginal sets,
    each cell weighted by its class's share of the lab over its share of the labelled cells (a lab labels a few of
    each class; most of its cells are neutrophils), so that the sets cover the lab's cells as the lab holds them.
    Class-conditional sets need no weights: each class has its own quantile. Too few cells for the weighted
    quantile (5 per class at 95 %: the cells' weights, with a new neutrophil's, never reach the coverage, and every set
    would hold every class) keep the sets fitted on the labelled cells as they are, and say so."""
    n_classes = fitted.out_of_fold.shape[1]
    probs = torch.softmax(fitted.out_of_fold.float() / fitted.calibration.temperature + prior_shift(prevalence), 1)
    if isinstance(fitted.calibration.conformal, MondrianConformal):
        return MondrianConformal.fit(probs, fitted.labels, coverage)
    share = torch.bincount(fitted.labels, minlength=n_classes).float() / len(fitted.labels)
    weighted = SplitConformal.fit(probs, fitted.labels, coverage, prevalence / share.clamp(min=1e-6))
    if weighted.qhat() >= 1.0:
        log.info(
            f"prediction sets: {len(fitted.labels)} labelled cells are too few to weigh {coverage:.0%} sets by the "
            "lab's class prevalence; they stay fitted on the labelled cells as they are (label more cells per class)"
        )
        return fitted.calibration.conformal
    return weighted


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------


def adapt(
    out: Path,
    data: Path | None = None,
    model_path: Path | None = None,
    unlabelled: Path | None = None,
    coverage: float = config.ADAPT_COVERAGE,
    seed: int = config.SEED,
    px_per_um: float | None = None,
    fine_tune_steps: int = config.ADAPT_FINE_TUNE_STEPS,
) -> dict:
    """``wbc adapt``: write ``out/model.safetensors``, the base model adapted to a lab; returns ``meta["adapted"]``."""
    started = time.perf_counter()
    check_coverage(coverage)
    if data is None and unlabelled is None:
        raise WbcError(
            "wbc adapt needs the lab's labelled cells (--data DIR, one folder per class) or its unlabelled "
            "images (--unlabelled DIR), or both"
        )
    base_path = Path(model_path) if model_path is not None else config.DEFAULT_MODEL_PATH
    model, meta = load_model(base_path)
    model = prepare_for_cpu(model)
    # a base model adapted before carries its lab's scale; its training data (the replay) was cut at each image's own
    own_crop, classes = CropPolicy.from_meta(meta).with_lab_scale(None), meta["classes"]
    # the replay images are the base lab's: cut as they were trained (at its magnification where the base model
    # recorded one), not at this lab's
    home_crop = own_crop.with_lab_scale(own_crop.home_px_per_um)
    records = lab_records(Path(data)) if data is not None else []
    files = find_unlabelled([unlabelled]) if unlabelled is not None else []
    crop, scale = measure_lab_scale(files + [r.path for r in records], own_crop, px_per_um)
    meta = {**meta, "crop": crop.to_meta()}
    cells = read_lab_cells(records, crop) if data is not None else None
    provenance: dict = {
        "base_model": str(base_path),
        "base_model_sha256": file_digest(base_path),
        "base_data_fingerprint": meta.get("data", {}).get("fingerprint"),
        "seed": seed,
        "px_per_um": scale,
    }

    lab_views: torch.Tensor | None = None  # the lab's unlabelled views, for its class prevalence
    if unlabelled is not None:
        pool = load_images([Record(p, None) for p in files], crop, desc="decoding the lab's unlabelled images")
        lab_views = pool.images
        if cells is not None:
            pool = LoadedImages(
                pool.records + cells.records, torch.cat([pool.images, cells.images]), pool.digests + cells.digests, []
            )
        if len(pool.records) < config.ADAPT_MIN_UNLABELLED:
            raise WbcError(
                f"--unlabelled {unlabelled}: {len(pool.records)} readable images; batch-norm statistics "
                f"need at least {config.ADAPT_MIN_UNLABELLED} of the lab's images"
            )
        home = None if cells is not None else replay_cells(meta, home_crop, seed=seed)
        if home is not None and home[0] is not None:
            model.colour = ColourTransfer(LabStatistics.of(pool.images), LabStatistics.of(home[0].images))
            meta["colour"] = {**model.colour.to_meta(), "home_images": home[1]}
            method = "colour transfer (Reinhard, CIELAB) from the lab's views to the training lab's"
        else:  # with labelled cells the stages are fine-tuned on them and on the replay, which has the home colours
            reestimate_batchnorm(model, pool.images)
            method = "AdaBN (batch-norm statistics)"
        provenance["unlabelled"] = {
            "root": str(Path(unlabelled).resolve()),
            "n_images": len(pool.records),
            "fingerprint": lab_fingerprint(pool),
            "method": method,
        }
        log.info(f"{method}, measured on {len(pool.records)} of the lab's images")
    elif cells is not None and len(cells.records) >= config.ADAPT_MIN_UNLABELLED:
        # the lab's labelled cells are the lab's images too: 42 BCCD cells moved its other cells from 65.4 % to 73.5 %
        reestimate_batchnorm(model, cells.images)
        provenance["batch_norm"] = f"AdaBN (batch-norm statistics) on the lab's {len(cells.records)} labelled cells"
        log.info(provenance["batch_norm"])
    if cells is not None and unlabelled is None:
        # measured on BCCD, 5 labelled cells per class and 12 fine-tuning steps, its other 330 cells, two selections
        # (`python bench/adapt_test_recipe.py`): 220 and 249 right without --unlabelled, 254 and 259 with them, 248
        # and 240 for the base model
        log.warning(
            "no --unlabelled images: the model keeps equal class priors (a lab's smears are mostly neutrophils) and "
            "batch-norm statistics from the labelled cells alone; pass the lab's other cells or fields as "
            "--unlabelled DIR, which usually reads the lab better"
        )

    if cells is None:  # unlabelled only: the base head, and the base calibration as it is (nothing to refit it on)
        log.warning(
            "no labelled cells: the temperature, prediction sets, OOD and lab statistics stay the base "
            "model's (fitted on its own lab), so this lab's cells stay flagged as from an unfamiliar lab; "
            "label a few cells and pass --data to recalibrate on this lab"
        )
        prevalence = shift_to_lab_prevalence(model, lab_views, Calibration.temperature_of(meta), classes)
        provenance["class_prevalence"] = _shares(classes, prevalence)
        provenance["seconds"] = time.perf_counter() - started
        _write(out, model, {**meta, "adapted": provenance}, load_extra(base_path))
        return provenance

    labels = torch.from_numpy(model_labels(cells.records, classes))
    counts = torch.bincount(labels, minlength=len(classes))
    keep = fitted_classes(labels, len(classes))
    kept_from_base = [classes[k] for k in range(len(classes)) if k not in keep]
    if len(keep) < 2:
        raise WbcError(
            f"--data {data}: {', '.join(f'{c} {int(n)}' for c, n in zip(classes, counts))} cells; "
            f"wbc adapt needs at least {config.ADAPT_MIN_CELLS} cells of at least two classes"
        )
    if kept_from_base:
        few = ", ".join(
            f"{classes[k]} ({int(counts[k])} cell{'' if counts[k] == 1 else 's'})"
            for k in range(len(classes))
            if k not in keep
        )
        log.warning(
            f"{few}: fewer than {config.ADAPT_MIN_CELLS} lab cells, so not adapted on; the model keeps the "
            f"base model's knowledge of {'this class' if len(kept_from_base) == 1 else 'these classes'} (its "
            "replay images) and the trust columns are fitted without it: label more and run wbc adapt again"
        )
    replay, replay_source = replay_cells(meta, home_crop, seed=seed)
    replay_labels = None if replay is None else torch.from_numpy(model_labels(replay.records, classes))
    if replay is None:
        log.warning(f"adapting without replay ({replay_source}): classes without lab cells may be forgotten")
    else:
        log.info(f"replay: {len(replay.records)} images of {replay_source}")
    check_head_reads_features(model, *logits_and_features(model, cells.images[:8]))
    tuned, out_of_fold = fine_tune_steps > 0, None
    if tuned:
        adapted_cells = torch.isin(labels, torch.tensor(keep))
        frozen = int(meta.get("training", {}).get("frozen_stages") or 0)
        tuning = FineTuning(
            None if replay is None else (replay.images, replay_labels),
            meta.get("training", {}).get("augment") or "seed",
            frozen,
            fine_tune_steps,
            seed,
            config.ADAPT_LAB_AUGMENT,
        )
        lab_cells = (cells.images[adapted_cells], labels[adapted_cells])
        provenance["lab_augment"] = tuning.lab_augment or tuning.augment
        out_of_fold = tuning.cross_fitted(model, lab_cells)
        log.info(f"fine-tuning stages {frozen}-{len(model.stages()) - 1} and the head ({fine_tune_steps} steps)")
        tuning.run(model, lab_cells)
    log.info(f"features of {len(cells.records)} lab cells")
    features = logits_and_features(model, cells.images, progress=True)[1]
    head_data = HeadData(features.float(), labels)
    if replay is not None:
        head_data.replay_features = (
            logits_and_features(model, replay.images, progress=True)[1].float()
            if unlabelled is not None or "batch_norm" in provenance or tuned
            else replay_features(model, provenance["base_model_sha256"], replay)
        )
        head_data.replay_labels = replay_labels
    fitted = fit_on_features(
        model.head(),
        head_data,
        cells.images,
        len(classes),
        coverage,
        f"cross-fitted on the lab cells of {Path(data).resolve()}",
        seed,
        out_of_fold,
    )
    model.head().load_state_dict(fitted.head.state_dict())
    if lab_views is not None:
        prevalence = shift_to_lab_prevalence(model, lab_views, fitted.calibration.temperature, classes)
        provenance["class_prevalence"] = _shares(classes, prevalence)
        fitted.calibration.conformal = sets_at_lab_prevalence(fitted, prevalence, coverage)
    stored, tensors = fitted.calibration.metadata()
    stored.update(fitted.summary)
    provenance.update(
        {
            "lab_data": str(Path(data).resolve()),
            "lab_data_fingerprint": lab_fingerprint(cells),
            "cells_per_class": {c: int(n) for c, n in zip(classes, counts)},
            "adapted_classes": [classes[k] for k in fitted.adapted_classes],
            "classes_kept_from_base": kept_from_base,
            "method": (f"stages fine-tuned {fine_tune_steps} steps with replay, then " if tuned else "")
            + "head re-fitted on the backbone's features (L2 towards the starting head) with replay; calibration "
            + (
                f"cross-fitted over {config.ADAPT_FINE_TUNE_FOLDS} fine-tuned folds"
                if tuned
                else f"cross-fitted ({config.ADAPT_FOLDS} folds at most)"
            ),
            "fine_tune_steps": fine_tune_steps if tuned else 0,
            "replay": {"source": replay_source, "n_images": 0 if replay is None else len(replay.records)},
            "cross_fitted_accuracy": fitted.cross_fitted_accuracy,
        }
    )
    provenance["seconds"] = time.perf_counter() - started
    kept = {k: v for k, v in load_extra(base_path).items() if not k.startswith(_CALIBRATION_TENSORS)}
    _write(out, model, {**meta, "calibration": stored, "adapted": provenance}, {**kept, **tensors})
    return provenance


def _write(out: Path, model: WbcClassifier, meta: dict, extra: dict[str, torch.Tensor]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out / "model.safetensors", model, meta, extra)
