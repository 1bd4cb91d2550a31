"""The calibration report, ``wbc trust calibration``: ECE before/after, coverage, set sizes, OOD AUROC, flags, on
unseen images; writes ``calibration.json`` and ``reliability_diagram.png``. What a prediction needs at run time
(temperature, sets, OOD, flags, ``wbc calibrate``) is in the core, ``wbc_trust/calibration.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from wbc_trust import config, plots
from wbc_trust.calibration import FLAG_OOD, FLAG_UNCERTAIN, Calibration, Trusted, calibration_error
from wbc_trust.conformal import check_coverage
from wbc_trust.crop import CropPolicy
from wbc_trust.data import Record, find_dataset, list_files, load_images, model_labels
from wbc_trust.errors import WbcError
from wbc_trust.evaluate import choose_records
from wbc_trust.io import write_json
from wbc_trust.modelfile import load_extra, load_model
from wbc_trust.models import logits_and_features


def _ood_images(ood_data: Path, crop: CropPolicy) -> torch.Tensor:
    """Every image below ``ood_data`` (any folder layout: these are not white cells and have no class)."""
    files = list_files(Path(ood_data))
    if not files:
        raise WbcError(f"no image files in {ood_data}: pass a folder of images that are not white cells (--ood-data)")
    return load_images([Record(p, None) for p in files], crop, desc="reading non-white-cell images").images


def run_calibration(
    model_path: Path | None, data: Path, out: Path, ood_data: Path | None = None, coverages: Sequence[float] = ()
) -> dict:
    """Measure calibration, prediction sets, OOD flags (and, with ``ood_data``, the OOD AUROC) on the images of
    ``data`` (a model's own training folder → its held-out test split); writes ``calibration.json``,
    ``reliability_diagram.png`` and ``set_sizes.png`` (plus ``ood_scores.png`` with ``ood_data``) into ``out``.
    The sets are measured at the model's coverage (``result["conformal"]``) and at each of ``coverages``
    (``result["conformal_at"]["0.995"]``...), per class too: a class-conditional guarantee is checked class by class."""
    out = Path(out)
    model, meta = load_model(model_path)
    calibration = Calibration.from_model(meta, load_extra(model_path))
    target = choose_records(find_dataset(data, require_all_classes=False), meta)
    print(target.description)
    loaded = load_images(target.records, CropPolicy.from_meta(meta), desc="reading images")
    if not loaded.records:
        raise WbcError(f"none of the files in {data} could be read as images")
    labels = torch.from_numpy(model_labels(loaded.records, meta["classes"]))
    logits, features = logits_and_features(model, loaded.images, progress=True)
    before = torch.softmax(logits, 1)
    correct = logits.argmax(1) == labels
    result: dict = {
        "model": str(model_path) if model_path else "default",
        "evaluated": target.description,
        "n_images": len(labels),
        "accuracy": float(correct.float().mean()),
        "ece_before": calibration_error(before, labels),
    }
    confidences = {f"before: ECE {result['ece_before']:.2%}": before.max(1).values.numpy()}
    if calibration is None:
        result["note"] = "this model file carries no calibration: run `wbc calibrate MODEL --data TRAINING_DATA`"
    else:
        trusted = calibration.apply(logits, features)
        result.update(_trust_summary(calibration, trusted, labels, correct, meta["classes"]))
        at = {c: calibration.conformal.sets(trusted.probs, check_coverage(c)) for c in coverages}
        result["conformal_at"] = {
            f"{c:g}": _set_summary(sets, labels, correct, meta["classes"], c, calibration.conformal.name)
            for c, sets in at.items()
        }
        sizes = {
            f"{c:.1%}": sets.sum(1).numpy() for c, sets in {calibration.conformal.coverage: trusted.sets, **at}.items()
        }
        plots.set_size_histogram(
            sizes,
            (~correct).numpy(),
            len(meta["classes"]),
            out / "set_sizes.png",
            title=f"{calibration.conformal.name} prediction sets: {len(labels)} images",
        )
        confidences[f"after (T = {calibration.temperature:.2f}): ECE {result['ece_after']:.2%}"] = trusted.probs.max(
            1
        ).values.numpy()
        if ood_data is not None:
            ood_logits, ood_features = logits_and_features(
                model, _ood_images(ood_data, CropPolicy.from_meta(meta)), progress=True
            )
            ood_scores = calibration.ood.score(ood_logits, ood_features)
            truth = np.r_[np.zeros(len(labels)), np.ones(len(ood_scores))]
            auroc = roc_auc_score(truth, torch.cat([trusted.ood_scores, ood_scores]).numpy())
            result["ood"].update(
                {
                    "ood_data": str(ood_data),
                    "n_ood_images": len(ood_scores),
                    "auroc": float(auroc),
                    "ood_images_flagged": float((ood_scores > calibration.ood.threshold).float().mean()),
                }
            )
            plots.ood_histogram(
                trusted.ood_scores.numpy(),
                ood_scores.numpy(),
                calibration.ood.threshold,
                out / "ood_scores.png",
                title=f"Out-of-distribution scores: AUROC {auroc:.3f}",
            )
    plots.reliability_diagram(
        confidences,
        correct.numpy(),
        out / "reliability_diagram.png",
        n_bins=config.ECE_BINS,
        title=f"Reliability diagram: {len(labels)} images of {Path(data).name}",
    )
    write_json(out / "calibration.json", result)
    return result


def _set_summary(
    sets: torch.Tensor,
    labels: torch.Tensor,
    correct: torch.Tensor,
    classes: Sequence[str],
    coverage: float,
    method: str,
) -> dict:
    """Coverage and mean set size, overall and per class; share of each set size; and where the wrong top-1 answers
    went: in a set of two or more classes (the set warns), or alone in a one-class set (it does not)."""
    sizes = sets.sum(1)
    covered = sets[torch.arange(len(labels)), labels]
    wrong = ~correct
    per_class = {
        name: {
            "n": int((labels == k).sum()),
            "coverage": float(covered[labels == k].float().mean()) if (labels == k).any() else None,
            "mean_set_size": float(sizes[labels == k].float().mean()) if (labels == k).any() else None,
        }
        for k, name in enumerate(classes)
    }
    return {
        "method": method,
        "coverage_target": coverage,
        "coverage": float(covered.float().mean()),
        "per_class": per_class,
        "mean_set_size": float(sizes.float().mean()),
        "empty": float((sizes == 0).float().mean()),
        "set_size_share": {str(k): float((sizes == k).float().mean()) for k in range(sets.shape[1] + 1)},
        "wrong_top1": int(wrong.sum()),
        "wrong_in_multi_class_sets": float((sizes[wrong] >= 2).float().mean()) if wrong.any() else None,
        "wrong_covered": float(covered[wrong].float().mean()) if wrong.any() else None,
    }


def _trust_summary(
    calibration: Calibration, trusted: Trusted, labels: torch.Tensor, correct: torch.Tensor, classes: Sequence[str]
) -> dict:
    """ECE after scaling, prediction sets (``_set_summary``), OOD and flag shares, and the accuracy of the unflagged
    answers."""
    unflagged = torch.tensor([not flag for flag in trusted.flags])
    return {
        "temperature": calibration.temperature,
        "ece_after": calibration_error(trusted.probs, labels),
        "conformal": _set_summary(
            trusted.sets, labels, correct, classes, calibration.conformal.coverage, calibration.conformal.name
        ),
        "ood": {
            "method": calibration.ood.method,
            "threshold": calibration.ood.threshold,
            "flagged": float((trusted.ood_scores > calibration.ood.threshold).float().mean()),
        },
        "flags": {
            "unflagged": float(unflagged.float().mean()),
            "accuracy_unflagged": float(correct[unflagged].float().mean()) if unflagged.any() else None,
            "uncertain": trusted.flags.count(FLAG_UNCERTAIN) / len(labels),
            "out_of_distribution": trusted.flags.count(FLAG_OOD) / len(labels),
        },
    }
