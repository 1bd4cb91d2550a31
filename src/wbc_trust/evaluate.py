"""Evaluation: accuracy, per-class precision/recall/F1/support and the confusion matrix (all from scikit-learn),
written as ``metrics.json``, ``classification_report.txt``, ``confusion_matrix.png`` and ``predictions.csv``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from sklearn.model_selection import train_test_split

from wbc_trust import config, plots
from wbc_trust.calibration import Calibration
from wbc_trust.crop import CropPolicy
from wbc_trust.data import DatasetIndex, Record, find_dataset, load_images, match_training_data, model_labels
from wbc_trust.errors import WbcError
from wbc_trust.io import atomic_write_text, write_csv, write_json
from wbc_trust.modelfile import load_model
from wbc_trust.models import predict_probs


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """The metrics dictionary of ``metrics.json`` (rows of the confusion matrix = truth, in ``classes`` order)."""
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "classes": list(classes),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n_images": int(len(y_true)),
    }


@dataclass
class EvaluationTarget:
    """Which images an evaluation runs on, a sentence saying so, and the files left out with the reason."""

    records: list[Record]
    description: str
    left_out: list[Record] = field(default_factory=list)
    left_out_reason: str = ""


def choose_records(index: DatasetIndex, meta: dict) -> EvaluationTarget:
    """Pick what to evaluate in a data folder.

    The model's own training data, recognised by content wherever it lies (``data.match_training_data``) → its
    held-out test split, by relative path (never the images it trained on); the training folder changed since → the
    held-out test files still in it; a Kaggle-layout folder → Test-A (and Test-B when present); any other folder → all
    of its images.
    """
    trained = meta.get("data", {})
    if index.layout == "kaggle":
        records = index.splits.get("test", []) + index.splits.get("test_b", [])
        return EvaluationTarget(records, f"evaluating Test-A/Test-B of {index.root} ({len(records)} files)")
    match = match_training_data(index, meta) if trained.get("test_files") else None
    if match is None or not (match.same or match.changed):
        records = index.splits["all"]
        return EvaluationTarget(records, f"evaluating all {len(records)} files in {index.root}")
    wanted = set(trained["test_files"])
    records, left_out = [], []
    for record in index.splits["all"]:
        (records if str(record.path.relative_to(index.root)) in wanted else left_out).append(record)
    if not records:
        raise WbcError(
            f"{index.root} holds this model's training data ({match.reason}), but none of its held-out test "
            "files is there under its name (renamed?), so the held-out split cannot be told apart: "
            "evaluate on a separate folder of images the model never saw"
        )
    what = "is this model's training data" if match.same else "is this model's training folder, changed since"
    reason = (
        "the model trained or was validated on them"
        if match.same
        else "they are not among the model's held-out test files, so it may have trained on them"
    )
    return EvaluationTarget(
        records,
        f"{index.root} {what} ({match.reason}): evaluating only its held-out test split ({len(records)} files, seed "
        f"{trained.get('seed')}); left out {len(left_out)} files because {reason} (list: left_out.csv)",
        left_out,
        reason,
    )


@dataclass
class LabelledImages:
    """Decoded images with labels as indices into the model's own class list."""

    records: list[Record]
    images: torch.Tensor  # uint8 N×3×S×S
    labels: np.ndarray  # int N, index into meta["classes"]
    description: str
    n_unreadable: int = 0
    left_out: list[Record] = field(default_factory=list)  # files of the folder not evaluated (``choose_records``)
    left_out_reason: str = ""


def stratified_subset(records: list[Record], max_images: int | None, seed: int = config.SEED) -> list[Record]:
    """At most ``max_images`` records with the class proportions of the whole (all of them when fewer)."""
    if max_images is None or max_images >= len(records):
        return records
    if max_images < 1:
        raise WbcError(f"--max-images must be at least 1 (got {max_images})")
    labels = [r.label for r in records]
    stratify = labels if max_images >= len(set(labels)) else None
    subset, _ = train_test_split(records, train_size=max_images, stratify=stratify, random_state=seed)
    return sorted(subset, key=lambda r: str(r.path))


def load_test_images(meta: dict, data: Path, max_images: int | None = None) -> LabelledImages:
    """The labelled images of ``data`` that the model is tested on (see ``choose_records``), decoded at the
    model's input size; unreadable files are reported and left out; classes the model does not know are refused."""
    index = find_dataset(data, require_all_classes=False)
    target = choose_records(index, meta)
    classes = meta["classes"]
    unknown = sorted({config.CLASSES[r.label] for r in target.records} - set(classes))
    if unknown:
        raise WbcError(
            f"the model does not know the class(es) {', '.join(unknown)} found in {data}: "
            "pass data with the model's classes only"
        )
    records = stratified_subset(target.records, max_images)
    loaded = load_images(records, CropPolicy.from_meta(meta), desc="reading images")
    for path, reason in loaded.unreadable:
        print(f"skipped unreadable file {path}: {reason}")
    if not loaded.records:
        raise WbcError(f"none of the {len(records)} files in {data} could be read as images: pass a folder of images")
    labels = model_labels(loaded.records, classes)
    subset = len(records) < len(target.records)
    description = target.description + (f"; stratified subset of {len(records)}" if subset else "")
    return LabelledImages(
        loaded.records,
        loaded.images,
        labels,
        description,
        len(loaded.unreadable),
        target.left_out,
        target.left_out_reason,
    )


def evaluate(model_path: Path | None, data_dir: Path, out_dir: Path) -> dict:
    """Run a model file on a labelled folder and write every evaluation artefact to ``out_dir``."""
    model, meta = load_model(model_path)
    test = load_test_images(meta, data_dir)
    print(test.description)
    probs = predict_probs(model, test.images, temperature=Calibration.temperature_of(meta)).numpy()
    metrics = compute_metrics(test.labels, probs.argmax(1), meta["classes"])
    metrics["n_unreadable"] = test.n_unreadable
    metrics["evaluated"] = test.description
    metrics["model"] = str(model_path) if model_path else "default"
    write_outputs(Path(out_dir), metrics, probs, test.records, test.labels, meta["classes"])
    if test.left_out:
        write_csv(
            Path(out_dir) / "left_out.csv", ([r.path, test.left_out_reason] for r in test.left_out), ["path", "reason"]
        )
    return metrics


def write_outputs(
    out: Path, metrics: dict, probs: np.ndarray, records: list[Record], y_true: np.ndarray, classes: list[str]
) -> None:
    """metrics.json, classification_report.txt, confusion_matrix.png, predictions.csv."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    report = classification_report(
        y_true, probs.argmax(1), labels=list(range(len(classes))), target_names=classes, digits=4, zero_division=0
    )
    atomic_write_text(out / "classification_report.txt", report)
    plots.confusion_matrix_figure(
        np.array(metrics["confusion_matrix"]),
        classes,
        out / "confusion_matrix.png",
        title=f"accuracy {metrics['accuracy']:.2%}, macro-F1 {metrics['macro_f1']:.2%}",
    )
    write_csv(
        out / "predictions.csv",
        (
            [record.path, classes[truth], classes[int(p.argmax())], f"{p.max():.4f}", *[f"{v:.4f}" for v in p]]
            for record, truth, p in zip(records, y_true, probs)
        ),
        ["path", "label", "prediction", "confidence", *[f"p_{c}" for c in classes]],
    )
