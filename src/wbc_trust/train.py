"""The training loop: data folder → split → cached images → model → best-on-validation ``model.safetensors``.

Writes into the run folder: ``model.safetensors``, ``checkpoint.pt`` (for ``--resume``), ``history.json``,
``curves.png``, ``split.json`` and, when the data has a held-out test split, ``test/metrics.json`` & co.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from wbc_trust import config, plots
from wbc_trust.data import (
    ImageTensorDataset,
    LoadedImages,
    find_dataset,
    load_images,
    relative_paths,
    split_plan,
    split_records,
    train_transform,
)
from wbc_trust.io import atomic_write, write_json
from wbc_trust.errors import WbcError
from wbc_trust.evaluate import compute_metrics, write_outputs
from wbc_trust.modelfile import load_model, run_manifest, save_model
from wbc_trust.models import VIEWS, autocast, bf16_supported, build_model, predict_probs, prepare_for_cpu
from wbc_trust.calibration import Calibration, calibrate_loaded


@dataclass
class TrainConfig:
    """Everything ``wbc train`` accepts; stored in the model's metadata."""

    data: Path
    out: Path
    arch: str = "efficientnet_lite0"
    epochs: int = config.EPOCHS
    batch_size: int = config.BATCH_SIZE
    lr: float = config.LEARNING_RATE
    img_size: int | None = None  # None → the architecture's default
    seed: int = config.SEED
    pretrained: str | None = None
    freeze_backbone: bool = False
    frozen_stages: int = 0  # keep the first N backbone stages at their pretrained weights
    resume: bool = False
    patience: int = config.EARLY_STOP_PATIENCE
    label_smoothing: float = config.LABEL_SMOOTHING
    max_images: int | None = None  # cap per split for quick runs and tests
    bf16: bool | None = None  # None → on where the CPU supports it natively
    test_views: tuple[str, ...] = config.TEST_VIEWS  # what the saved model's predictions average over
    augment: str = "seed"  # or "cross-lab" (config.AUGMENTS)


def seed_everything(seed: int) -> None:
    """Same seed → same split, same initialisation, same augmentation order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Splits:
    """Decoded images per split, and what the split file records."""

    loaded: dict[str, LoadedImages]
    split_file: dict


def data_fingerprint(loaded: LoadedImages) -> str:
    """SHA-256 over the sorted (class, file SHA-256) pairs of the readable training pool: the same images with the
    same labels give the same fingerprint, whatever their names, order or folder; one changed pixel or label does not."""
    lines = sorted(f"{config.CLASSES[r.label]}\t{digest}\n" for r, digest in zip(loaded.records, loaded.digests))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def prepare_splits(cfg: TrainConfig, img_size: int) -> tuple[Splits, dict]:
    """Find the data, decode it once, split it (duplicates kept on one side) and write ``split.json``."""
    index = find_dataset(cfg.data, require_all_classes=True)
    if index.ignored_classes:
        print("left out (not white-cell classes): "
              + ", ".join(f"{name} ({n} files)" for name, n in index.ignored_classes.items()))
    pool, fractions, fixed = split_plan(index)
    loaded_pool = load_images(pool, img_size, desc="decoding training images")
    for path, reason in loaded_pool.unreadable:
        print(f"skipped unreadable file {path}: {reason}")
    parts = split_records(loaded_pool.records, loaded_pool.digests, fractions, seed=cfg.seed)
    position = {r.path: i for i, r in enumerate(loaded_pool.records)}
    loaded: dict[str, LoadedImages] = {}
    for name, records in parts.items():
        idx = [position[r.path] for r in records]
        if cfg.max_images:
            idx = idx[:: max(1, len(idx) // cfg.max_images)][: cfg.max_images]
        loaded[name] = loaded_pool.subset(idx)
    for name, records in fixed.items():
        loaded[name] = load_images(records, img_size, desc=f"decoding {name} images")
    split_file = {
        "data_root": str(index.root),
        "layout": index.layout,
        "seed": cfg.seed,
        "fractions": fractions,
        "unreadable": [[str(p), why] for p, why in loaded_pool.unreadable],
        "data_fingerprint": data_fingerprint(loaded_pool),
        **{name: relative_paths(li.records, index.root) for name, li in loaded.items()},
    }
    if not (cfg.resume and (cfg.out / "split.json").exists()):  # a refused resume must not overwrite the run's split
        write_json(cfg.out / "split.json", split_file)
    return Splits(loaded, split_file), index.summary()


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Square-root inverse-frequency weights (√(n / (k · count))): rare basophils and lymphocytes count more, but
    not 2.7× more, which on PBC turned neutrophils and monocytes into false basophils."""
    counts = torch.bincount(labels, minlength=n_classes).float().clamp(min=1)
    return (counts.sum() / (n_classes * counts)).sqrt()


def eval_batch_size(images: torch.Tensor) -> int:
    """Evaluation batches within the training step's pixel budget: predict_probs' default of 128 images at 224 px
    needed 0.6 GiB more than training itself (bench/train_memory.py)."""
    return max(1, config.MICRO_BATCH_PIXELS // (images.shape[-2] * images.shape[-1]))


def _evaluate_split(model: nn.Module, loaded: LoadedImages, criterion: nn.Module) -> tuple[float, dict, torch.Tensor]:
    probs = predict_probs(model, loaded.images, batch_size=eval_batch_size(loaded.images))
    labels = loaded.labels
    loss = float(criterion(torch.log(probs.clamp_min(1e-8)), labels)) if len(labels) else float("nan")
    metrics = compute_metrics(labels.numpy(), probs.argmax(1).numpy(), list(config.CLASSES))
    return loss, metrics, probs


def _ema_step(average: torch.Tensor, current: torch.Tensor, n_averaged: torch.Tensor) -> torch.Tensor:
    """One exponential-moving-average step with timm's warm-up (decay (1+n)/(10+n) until it reaches
    config.EMA_DECAY), so that short runs average their recent weights, not their initialisation."""
    decay = min(config.EMA_DECAY, (1.0 + float(n_averaged)) / (10.0 + float(n_averaged)))
    return average * decay + current * (1.0 - decay)


def train_loader(train_set: LoadedImages, batch_size: int, seed: int, augment: str = "seed") -> DataLoader:
    """Shuffled, augmented batches straight from the decoded uint8 cache (no file is read again after decoding)."""
    return DataLoader(
        ImageTensorDataset(train_set.images, train_set.labels, train_transform(augment)),
        batch_size=batch_size, shuffle=True, drop_last=len(train_set.records) > batch_size,
        generator=torch.Generator().manual_seed(seed),
    )


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    use_bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch: channels_last input (oneDNN's fast layout), forward under bf16 autocast
    where the CPU has native bf16, loss in fp32. Returns (logits, loss); ``bench/train_speed.py`` times this.

    Large inputs run forward + backward in equal chunks of at most ``config.MICRO_BATCH_PIXELS`` pixels, each chunk's
    (class-weighted) mean loss scaled by its share of the batch's weight, so the summed gradient is the whole batch's
    (batch norm sees each chunk's statistics). It cuts activation memory at 224 px to a third, which
    keeps training on all of pbc-wbc at 224 px under 4 GiB (bench/train_memory.py).
    """
    images = images.contiguous(memory_format=torch.channels_last)
    n_chunks = -(-len(images) * images.shape[-2] * images.shape[-1] // config.MICRO_BATCH_PIXELS)  # ceiling division
    weight = getattr(criterion, "weight", None)
    sample_weights = weight[labels] if weight is not None else torch.ones(len(labels))
    optimizer.zero_grad(set_to_none=True)
    logits, loss = [], torch.zeros(())
    for x, y, w in zip(images.tensor_split(n_chunks), labels.tensor_split(n_chunks),
                       sample_weights.tensor_split(n_chunks)):
        with autocast(use_bf16):
            chunk_logits = model(x)
        chunk_loss = criterion(chunk_logits.float(), y) * (w.sum() / sample_weights.sum())
        chunk_loss.backward()
        logits.append(chunk_logits.detach())
        loss += chunk_loss.detach()
    optimizer.step()
    return torch.cat(logits), loss


def train(cfg: TrainConfig) -> dict:
    """Train one model; returns the best validation metrics (and test metrics when a test split exists)."""
    run_started = time.perf_counter()
    train_transform(cfg.augment)  # an unknown --augment fails now, not after decoding every image
    unknown = [v for v in cfg.test_views if v not in VIEWS]
    if unknown or not cfg.test_views:
        raise WbcError(f"--test-views: unknown view(s) {', '.join(unknown) or '(none given)'}: "
                       f"use a comma-separated list of {', '.join(VIEWS)}")
    cfg.out = Path(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    img_size = cfg.img_size or config.DEFAULT_IMG_SIZE.get(cfg.arch) or 224
    use_bf16 = bf16_supported() if cfg.bf16 is None else cfg.bf16
    seed_everything(cfg.seed)
    splits, data_summary = prepare_splits(cfg, img_size)
    train_set, val_set = splits.loaded["train"], splits.loaded["val"]
    print(f"{cfg.arch} at {img_size} px, {'bf16 autocast' if use_bf16 else 'fp32'}: "
          f"{len(train_set.records)} training, {len(val_set.records)} validation images")

    model = prepare_for_cpu(build_model(cfg.arch, pretrained=cfg.pretrained, freeze_backbone=cfg.freeze_backbone,
                                        frozen_stages=cfg.frozen_stages))
    # the weights that are validated, saved and shipped: an exponential moving average (BN statistics included),
    # which smooths the epoch-to-epoch swings of the last weights on a small dataset
    ema = AveragedModel(model, avg_fn=_ema_step, use_buffers=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=config.WEIGHT_DECAY)
    loader = train_loader(train_set, cfg.batch_size, cfg.seed, cfg.augment)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * len(loader), pct_start=0.15
    )
    weights = class_weights(train_set.labels, len(config.CLASSES))
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
    eval_criterion = nn.NLLLoss()

    checkpoint_path, model_path = cfg.out / "checkpoint.pt", cfg.out / "model.safetensors"
    history: list[dict] = []
    start_epoch, best, stale = 1, None, 0
    if cfg.resume:
        history, best, stale, start_epoch = _resume(checkpoint_path, splits.split_file["data_fingerprint"], model,
                                                    ema, optimizer, scheduler, loader)

    started = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        seen, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False)
        for images, labels in bar:
            logits, loss = train_step(model, images, labels, criterion, optimizer, use_bf16)
            scheduler.step()
            ema.update_parameters(model)
            seen += len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            loss_sum += float(loss.detach()) * len(labels)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        val_loss, val_metrics, _ = _evaluate_split(ema.module, val_set, eval_criterion)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "val_loss": val_loss,
            "val_accuracy": val_metrics["accuracy"],
            "val_macro_f1": val_metrics["macro_f1"],
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        # One-cycle weights of the first half are mid-flight (high learning rate): such an epoch is saved only as a
        # stand-in until the annealing half starts; from then on the best validated epoch is kept.
        half = cfg.epochs // 2
        better = best is not None and (row["val_macro_f1"], -row["val_loss"]) > (best["val_macro_f1"], -best["val_loss"])
        improved = best is None or (epoch > half and (best["epoch"] <= half or better))
        print(f"epoch {epoch}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
              f"val loss {val_loss:.4f} acc {row['val_accuracy']:.4f} macro-F1 {row['val_macro_f1']:.4f}"
              + ("  (best so far, saved)" if improved else ""))
        if improved:
            best, stale = row, 0
            save_model(model_path, ema.module, _metadata(cfg, img_size, data_summary, splits, row, use_bf16))
        elif epoch > half:
            stale += 1
        state = {
            "model": model.net.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(), "history": history, "best": best, "stale": stale, "epoch": epoch,
            "loader_rng": loader.generator.get_state(), "data_fingerprint": splits.split_file["data_fingerprint"],
        }
        atomic_write(checkpoint_path, lambda f: torch.save(state, f))
        write_json(cfg.out / "history.json", history)
        plots.training_curves(history, cfg.out / "curves.png")
        if stale >= cfg.patience:
            print(f"early stop: no validation improvement for {cfg.patience} epochs")
            break

    result = {"best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"], "val_macro_f1": best["val_macro_f1"],
              "train_seconds": history[-1]["seconds"]}
    best_model, best_meta = load_model(model_path)
    try:
        result["calibration"] = calibrate_loaded(model_path, prepare_for_cpu(best_model), best_meta, val_set,
                                                 f"validation split of {best_meta['data']['root']} (seed {cfg.seed})")
    except WbcError as exc:  # too few validation images: the model is still usable, without trust flags
        print(f"model saved without calibration: {exc}")
    result["seconds_to_model"] = time.perf_counter() - run_started  # decoding, training, calibration; not the test report
    for name in ("test", "test_b"):
        if name in splits.loaded and splits.loaded[name].records:
            result[name] = _test_report(model_path, splits.loaded[name], cfg.out / name)
    return result


def _resume(checkpoint: Path, fingerprint: str, model: nn.Module, ema: AveragedModel, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, loader: DataLoader) -> tuple[list[dict], dict, int, int]:
    """Restore an interrupted run from its last per-epoch checkpoint: weights and their average, optimiser, schedule and both random
    streams (augmentation and shuffling), so the resumed run repeats exactly what the uninterrupted one would do.

    ``weights_only=True`` unpickles only tensors and plain containers: a crafted checkpoint cannot run code.
    Returns (history, best row, epochs without improvement, first epoch to run).
    """
    if not checkpoint.exists():
        raise WbcError(f"--resume: no checkpoint.pt in {checkpoint.parent}; start without --resume")
    not_ours = f"--resume: {checkpoint} is not a checkpoint written by `wbc train` and was not loaded"
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code-carrying pickles, RuntimeError/EOFError for other files
        raise WbcError(f"{not_ours} ({exc.__class__.__name__}); start without --resume") from exc
    if not isinstance(state, dict):
        raise WbcError(f"{not_ours}; start without --resume")
    if state.get("data_fingerprint", fingerprint) != fingerprint:
        raise WbcError(f"--resume: {checkpoint} belongs to other data (the images or labels changed since the "
                       "interrupted run); start without --resume")
    try:
        model.net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if "loader_rng" in state:  # checkpoints from before it was saved still resume
            loader.generator.set_state(state["loader_rng"])
        print(f"resuming after epoch {state['epoch']}")
        return state["history"], state["best"], state["stale"], state["epoch"] + 1
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise WbcError(f"--resume: {checkpoint} does not fit this run ({exc.__class__.__name__}): resume with the "
                       "same --arch, --img-size and --batch-size, or start without --resume") from exc


def _test_report(model_path: Path, loaded: LoadedImages, out: Path) -> dict:
    """Evaluate the best saved model on a held-out split; writes the usual evaluation files into ``out``."""
    model, meta = load_model(model_path)
    probs = predict_probs(model, loaded.images, batch_size=eval_batch_size(loaded.images),
                          temperature=Calibration.temperature_of(meta)).numpy()
    y_true = loaded.labels.numpy()
    metrics = compute_metrics(y_true, probs.argmax(1), meta["classes"])
    metrics["n_unreadable"] = len(loaded.unreadable)
    metrics["evaluated"] = f"held-out {out.name} split of the training data"
    write_outputs(out, metrics, probs, loaded.records, y_true, meta["classes"])
    print(f"held-out {out.name}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
          f"({metrics['n_images']} images) → {out}")
    return {k: metrics[k] for k in ("accuracy", "macro_f1", "n_images")}


def _metadata(cfg: TrainConfig, img_size: int, data_summary: dict, splits: Splits, best: dict, bf16: bool) -> dict:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    return {
        "arch": cfg.arch,
        "classes": list(config.CLASSES),
        "img_size": img_size,
        "mean": list(config.IMAGENET_MEAN),
        "std": list(config.IMAGENET_STD),
        "input": "RGB in [0, 1], whole image resized to img_size × img_size; normalisation is inside the model",
        "data": {
            **data_summary,
            "seed": cfg.seed,
            "n_train": len(splits.loaded["train"].records),
            "n_val": len(splits.loaded["val"].records),
            "test_files": splits.split_file.get("test", []),
            "fingerprint": splits.split_file["data_fingerprint"],
        },
        "validation": {k: best[k] for k in ("epoch", "val_accuracy", "val_macro_f1", "val_loss")},
        "training": {**settings, "bf16": bf16},
        "test_views": list(cfg.test_views),
        "credit": config.PBC_CREDIT,
        "manifest": run_manifest(),
    }
