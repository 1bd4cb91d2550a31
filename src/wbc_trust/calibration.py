"""How far to trust one answer, at run time: temperature scaling (Guo et al. 2017), split-conformal prediction sets
(``conformal.py``) and an out-of-distribution score (``ood.py``), fitted together on held-out images, stored in the
model file (``meta["calibration"]`` plus tensors) and applied by every prediction.

- ``Calibration.fit`` / ``calibrate_loaded``: at the end of ``wbc train``, on the best model and the validation split.
- ``calibrate``: ``wbc calibrate MODEL --data DIR`` afterwards (recomputes the model's validation split, or uses DIR).

The report (``wbc trust calibration``: ECE, coverage, OOD AUROC, plots) lives in ``trust/calibration.py``; this module
is part of the core, so ``wbc predict`` imports neither matplotlib nor the trust package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from wbc_trust import config
from wbc_trust.conformal import MondrianConformal, SplitConformal, check_coverage, conformal_from_metadata
from wbc_trust.data import LoadedImages, model_labels, validation_split
from wbc_trust.errors import WbcError
from wbc_trust.lab import LabShift
from wbc_trust.modelfile import load_extra, load_model, save_model
from wbc_trust.models import WbcClassifier, logits_and_features
from wbc_trust.ood import OODScore, from_stored, ood_score_class

FLAG_OOD = "out-of-distribution"  # models without the lab statistic (lab.py), or no images to compute it on
FLAG_NOT_WBC = "not a white cell"  # far from the calibration lab's white cells, but in that lab's colours
FLAG_NEW_LAB = "white cell from an unfamiliar lab"  # another lab's colours: run `wbc adapt`
FLAG_UNCERTAIN = "uncertain"
_OWN_TENSORS = ("conformal.", "ood.")


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T), by L-BFGS on log T.

    Written here because pytorch-ood's ``TemperatureScaling`` stops early (learning rate 0.01, 50 steps): on the
    default model's validation logits it returned T = 0.78 where the optimum is T = 0.49.
    """
    logits = logits.float().clone()  # a normal tensor: logits computed under inference_mode cannot enter autograd
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = config.ECE_BINS) -> float:
    """Expected calibration error of the top-class confidence (torchmetrics, equal-width bins, L1)."""
    # imported here: only calibrating and the report need it, and ``wbc predict`` should not pay for torchmetrics
    from torchmetrics.classification import MulticlassCalibrationError

    metric = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=n_bins, norm="l1")
    return float(metric(probs, labels))


@dataclass
class Trusted:
    """Calibrated answers for a batch: probabilities, prediction sets (N×C booleans), OOD scores and flags."""

    probs: torch.Tensor
    sets: torch.Tensor
    ood_scores: torch.Tensor
    flags: list[str]


@dataclass
class Calibration:
    """Everything a prediction needs to say how far to trust itself; lives in the model file."""

    temperature: float
    conformal: MondrianConformal | SplitConformal  # SplitConformal: files calibrated before the Mondrian sets
    ood: OODScore
    fitted_on: str = ""
    lab: LabShift | None = None  # the lab statistic (lab.py): the shipped default and `wbc adapt`'s models carry it

    @classmethod
    def fit(
        cls,
        logits: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        coverage: float = config.CONFORMAL_COVERAGE,
        fitted_on: str = "",
        ood_method: str = config.OOD_METHOD,
    ) -> Calibration:
        """Fit all three on the same held-out white cells of known class (``ood_method``: a name in
        ``ood.OOD_SCORES``)."""
        temperature = fit_temperature(logits, labels)
        conformal = MondrianConformal.fit(torch.softmax(logits / temperature, 1), labels, coverage)
        return cls(temperature, conformal, ood_score_class(ood_method).fit(logits, features, labels), fitted_on)

    def apply(
        self,
        logits: torch.Tensor,
        features: torch.Tensor,
        coverage: float | None = None,
        images: torch.Tensor | None = None,
    ) -> Trusted:
        """Temperature-scaled probabilities, prediction sets at ``coverage`` (default: the fitted one), OOD scores,
        and the flag of each image: another lab's colours first (with a lab statistic and the ``images``), then out of
        distribution (named "not a white cell" where the lab statistic vouches for the lab), else uncertain when the
        set is not one class."""
        probs = torch.softmax(logits.float() / self.temperature, 1)
        sets = self.conformal.sets(probs, coverage)
        scores = self.ood.score(logits, features)
        knows_lab = self.lab is not None and images is not None
        new_lab = self.lab.flagged(images).tolist() if knows_lab else [False] * len(scores)
        flags = [
            FLAG_NEW_LAB
            if lab
            else (FLAG_NOT_WBC if knows_lab else FLAG_OOD)
            if s > self.ood.threshold
            else FLAG_UNCERTAIN
            if int(n) != 1
            else ""
            for s, n, lab in zip(scores.tolist(), sets.sum(1), new_lab)
        ]
        return Trusted(probs, sets, scores, flags)

    def metadata(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """``meta["calibration"]`` and the tensors stored beside the weights."""
        conformal_meta, conformal_tensors = self.conformal.metadata()
        ood_meta, ood_tensors = self.ood.metadata()
        meta = {
            "temperature": self.temperature,
            "fitted_on": self.fitted_on,
            "conformal": conformal_meta,
            "ood": ood_meta,
            **({"lab": self.lab.metadata()} if self.lab is not None else {}),
        }
        return meta, {**conformal_tensors, **ood_tensors}

    @staticmethod
    def temperature_of(meta: dict) -> float:
        """The temperature stored in a model file's metadata; 1.0 (raw softmax) for a model without calibration."""
        return float(meta.get("calibration", {}).get("temperature", 1.0))

    @classmethod
    def from_model(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> Calibration | None:
        """The calibration stored in a model file, or None for files without one (older or uncalibrated models)."""
        stored = meta.get("calibration")
        if not stored or "conformal" not in stored or "ood" not in stored:
            return None
        return cls(
            float(stored["temperature"]),
            conformal_from_metadata(stored["conformal"], tensors),
            from_stored(stored["ood"], tensors),
            stored.get("fitted_on", ""),
            LabShift.from_metadata(stored["lab"]) if "lab" in stored else None,
        )


def calibrate_loaded(
    model_path: Path,
    model: WbcClassifier,
    meta: dict,
    loaded: LoadedImages,
    fitted_on: str,
    coverage: float = config.CONFORMAL_COVERAGE,
    ood_method: str = config.OOD_METHOD,
) -> dict:
    """Fit on decoded held-out images and write the calibration (temperature, prediction sets, OOD score, lab
    statistic) into the model file (atomically, in place).
    Returns ``meta["calibration"]`` with the validation ECE before and after temperature scaling."""
    if len(loaded.records) < 2 or len({r.label for r in loaded.records}) < 2:
        raise WbcError(
            f"calibration needs held-out images of at least two classes; {fitted_on} has "
            f"{len(loaded.records)}: pass --data with more labelled images"
        )
    labels = torch.from_numpy(model_labels(loaded.records, meta["classes"]))
    logits, features = logits_and_features(model, loaded.images, progress=True)
    calibration = Calibration.fit(logits, features, labels, coverage, fitted_on, ood_method)
    # the lab statistic on the same images, so that every calibrated model tells another lab's images apart
    calibration.lab = LabShift.fit(loaded.images)
    stored, tensors = calibration.metadata()
    stored["n_images"] = len(labels)
    stored["ece_before"] = calibration_error(torch.softmax(logits, 1), labels)
    stored["ece_after"] = calibration_error(torch.softmax(logits / calibration.temperature, 1), labels)
    kept = {k: v for k, v in load_extra(model_path).items() if not k.startswith(_OWN_TENSORS)}
    save_model(model_path, model, {**meta, "calibration": stored}, {**kept, **tensors})
    return stored


def calibrate(
    model_path: Path, data: Path, coverage: float = config.CONFORMAL_COVERAGE, ood_method: str = config.OOD_METHOD
) -> dict:
    """``wbc calibrate``: fit on the model's validation split (or on ``data``) and store it in the model file."""
    check_coverage(coverage)
    ood_score_class(ood_method)  # an unknown name fails before any image is read
    model, meta = load_model(model_path)
    loaded, fitted_on = validation_split(meta, data)
    print(f"calibrating on the {fitted_on}: {len(loaded.records)} images")
    return calibrate_loaded(Path(model_path), model, meta, loaded, fitted_on, coverage, ood_method)
