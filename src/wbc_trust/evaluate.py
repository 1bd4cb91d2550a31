"""Evaluation: accuracy, per-class precision/recall/F1/support and the confusion matrix (all from scikit-learn),
written as ``metrics.json``, ``classification_report.txt``, ``confusion_matrix.png`` and ``predictions.csv``."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score, precision_recall_fscore_support

from wbc_trust import config, plots
from wbc_trust.data import DatasetIndex, Record, atomic_write_text, find_dataset, load_images, write_json
from wbc_trust.errors import WbcError
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
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n_images": int(len(y_true)),
    }


@dataclass
class EvaluationTarget:
    """Which images an evaluation runs on, and a sentence saying so."""

    records: list[Record]
    description: str


def choose_records(index: DatasetIndex, meta: dict) -> EvaluationTarget:
    """Pick what to evaluate in a data folder.

    The model's own training data → its held-out test split (never the images it trained on); a Kaggle-layout folder →
    Test-A (and Test-B when present); any other folder → all of its images.
    """
    trained = meta.get("data", {})
    if index.layout == "kaggle":
        records = index.splits.get("test", []) + index.splits.get("test_b", [])
        return EvaluationTarget(records, f"evaluating Test-A/Test-B of {index.root} ({len(records)} files)")
    if trained.get("root") == str(index.root) and trained.get("test_files"):
        wanted = set(trained["test_files"])
        records = [r for r in index.splits["all"] if str(r.path.relative_to(index.root)) in wanted]
        return EvaluationTarget(
            records,
            f"{index.root} is this model's training data: evaluating only its held-out test split "
            f"({len(records)} files, seed {trained.get('seed')})",
        )
    records = index.splits["all"]
    return EvaluationTarget(records, f"evaluating all {len(records)} files in {index.root}")


def evaluate(model_path: Path | None, data_dir: Path, out_dir: Path) -> dict:
    """Run a model file on a labelled folder and write every evaluation artefact to ``out_dir``."""
    model, meta = load_model(model_path)
    classes = meta["classes"]
    index = find_dataset(data_dir, require_all_classes=False)
    target = choose_records(index, meta)
    print(target.description)
    loaded = load_images(target.records, meta["img_size"], desc="reading images")
    for path, reason in loaded.unreadable:
        print(f"skipped unreadable file {path}: {reason}")
    if not loaded.records:
        raise WbcError(f"none of the {len(target.records)} files in {data_dir} could be read as images")
    probs = predict_probs(model, loaded.images, temperature=meta.get("calibration", {}).get("temperature", 1.0)).numpy()
    y_true = np.array([classes.index(config.CLASSES[r.label]) for r in loaded.records])
    y_pred = probs.argmax(1)
    metrics = compute_metrics(y_true, y_pred, classes)
    metrics["n_unreadable"] = len(loaded.unreadable)
    metrics["evaluated"] = target.description
    metrics["model"] = str(model_path) if model_path else "default"
    write_outputs(Path(out_dir), metrics, probs, loaded.records, y_true, classes)
    return metrics


def write_outputs(out: Path, metrics: dict, probs: np.ndarray, records: list[Record], y_true: np.ndarray,
                  classes: list[str]) -> None:
    """metrics.json, classification_report.txt, confusion_matrix.png, predictions.csv."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    report = classification_report(y_true, probs.argmax(1), labels=list(range(len(classes))), target_names=classes,
                                   digits=4, zero_division=0)
    atomic_write_text(out / "classification_report.txt", report)
    plots.confusion_matrix_figure(np.array(metrics["confusion_matrix"]), classes, out / "confusion_matrix.png",
                                  title=f"accuracy {metrics['accuracy']:.2%}, macro-F1 {metrics['macro_f1']:.2%}")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", "prediction", "confidence", *[f"p_{c}" for c in classes]])
    for record, truth, p in zip(records, y_true, probs):
        writer.writerow([record.path, classes[truth], classes[int(p.argmax())], f"{p.max():.4f}", *[f"{v:.4f}" for v in p]])
    atomic_write_text(out / "predictions.csv", buffer.getvalue())
