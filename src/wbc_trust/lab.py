"""Which lab an image looks like it comes from: a statistic of the image's colours, fitted on the images a model was
calibrated on, that tells "a white cell from an unfamiliar lab" apart from "not a white cell".

The out-of-distribution score (``ood.py``) measures how far an image's deep features lie from the white cells a model
was calibrated on. It is high for a platelet or an erythroblast from the model's own lab, and just as high for a
white cell from a lab with another microscope, camera or stain: one flag cannot say which. What differs between those
two cases is the picture as a whole: another lab's stain, illumination and camera move every image's colours (its
background, its darkest stain, its contrast) together, while a platelet photographed by the same scanner with the
same stain keeps them. So this score is the squared Mahalanobis distance of a few colour statistics of the whole image
(per RGB channel: mean, standard deviation and the 5th, 50th and 95th percentiles) to those of the calibration images
(Ledoit-Wolf covariance, as in ``ood.py``), with a cross-fitted threshold that accepts ``config.LAB_ACCEPT`` of them.
Measured in ``bench/cross_lab.py`` (docs/another-lab.md).

A folder of images from another lab then gets one message (``batch_notice``) instead of one flag per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import KFold

from wbc_trust import config
from wbc_trust.data import validation_split
from wbc_trust.errors import WbcError
from wbc_trust.modelfile import load_extra, load_model, save_model

#: What ``statistics`` computes, in order (stored in the model file so that a reader knows what the numbers mean).
STATISTICS = "per RGB channel of the whole model input in [0, 1]: mean, std, 5th, 50th, 95th percentile"
_QUANTILES = (0.05, 0.5, 0.95)


def statistics(images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Colour statistics of uint8 (or [0, 1] float) images N×3×S×S: N×15, float64. Per image, so computed
    ``batch_size`` images at a time: a whole calibration split at once (920 images at 224 px) held ~1 GB of floats and
    their sorted copies, and set the peak memory of training resnet50 (``bench/train_memory.py``: 4.45 GiB)."""
    parts = [_statistics(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, 3 * (2 + len(_QUANTILES)), dtype=torch.float64)


def _statistics(images: torch.Tensor) -> torch.Tensor:
    x = (images.float() / 255.0 if images.dtype == torch.uint8 else images.float()).flatten(2)
    quantiles = torch.quantile(x, torch.tensor(_QUANTILES), dim=2).permute(1, 2, 0).flatten(1)
    return torch.cat([x.mean(2), x.std(2), quantiles], 1).double()


def _gaussian(stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = stats.mean(0)
    covariance = LedoitWolf(assume_centered=True, store_precision=False).fit(stats - mean).covariance_
    return mean, np.linalg.inv(covariance)


def _distance(stats: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    diff = stats - mean
    return ((diff @ precision) * diff).sum(1)


@dataclass
class LabShift:
    """Mean and precision of the calibration images' colour statistics, and the threshold of a familiar lab."""

    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    accept: float = config.LAB_ACCEPT
    n_images: int = 0

    @classmethod
    def fit(
        cls,
        images: torch.Tensor,
        accept: float = config.LAB_ACCEPT,
        folds: int = config.OOD_FOLDS,
        seed: int = config.SEED,
    ) -> LabShift:
        """Fit on the images of one lab; the threshold accepts ``accept`` of their cross-fitted scores (in-sample
        distances are too small, as for the OOD score)."""
        stats = statistics(images).numpy()
        held_out = np.zeros(len(stats))
        for fit_idx, score_idx in KFold(min(folds, len(stats)), shuffle=True, random_state=seed).split(stats):
            held_out[score_idx] = _distance(stats[score_idx], *_gaussian(stats[fit_idx]))
        mean, precision = _gaussian(stats)
        return cls(mean, precision, float(np.quantile(held_out, accept)), accept, len(stats))

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """One score per image: higher = its colours are further from the calibration lab's."""
        return torch.from_numpy(_distance(statistics(images).numpy(), self.mean, self.precision))

    def flagged(self, images: torch.Tensor) -> torch.Tensor:
        """Which images look like another lab's."""
        return self.score(images) > self.threshold

    def metadata(self) -> dict:
        """JSON for ``meta["calibration"]["lab"]`` (15 numbers and a 15×15 matrix: small enough for JSON)."""
        return {
            "statistics": STATISTICS,
            "mean": self.mean.tolist(),
            "precision": self.precision.tolist(),
            "threshold": self.threshold,
            "accept": self.accept,
            "n_images": self.n_images,
        }

    @classmethod
    def from_metadata(cls, meta: dict) -> LabShift:
        """Inverse of ``metadata``."""
        return cls(
            np.asarray(meta["mean"], dtype=np.float64),
            np.asarray(meta["precision"], dtype=np.float64),
            float(meta["threshold"]),
            float(meta["accept"]),
            int(meta.get("n_images", 0)),
        )


def batch_notice(n_new_lab: int, n_images: int, scale_known: bool = True) -> str | None:
    """One message for a batch in which most images look like another lab's (``config.LAB_BATCH_SHARE``, at least
    ``config.LAB_BATCH_MIN`` images), instead of the same flag on every row; None otherwise.

    ``scale_known`` False (a cell view that could not measure the batch's magnification: too few red cells and too
    few tight crops, ``crop.lab_scale``) adds how to give `wbc adapt` the lab's scale, without which adapting does not
    help such crops: on BCCD's 351 crops, before session 17 measured them by their frames, `wbc adapt --unlabelled`
    read 47.9 % alone (the default 51.0 %), 78.6 % with `--px-per-um 14.67` and 79.2 % from the lab's fields
    (docs/another-lab.md)."""
    if n_images < config.LAB_BATCH_MIN or n_new_lab < config.LAB_BATCH_SHARE * n_images:
        return None
    notice = (
        f"{n_new_lab} of {n_images} images look like they come from another lab than the one the model was "
        "calibrated on (other stain, microscope or camera): its answers and trust columns are not reliable for "
        "them. Label a few of that lab's cells (about 10 per class, one folder per class) and run "
        "`wbc adapt --data LABELLED_DIR --unlabelled DIR --out RUN_DIR` (DIR: the lab's other images, such as these; "
        "or `wbc adapt --unlabelled DIR --out RUN_DIR` without labels), then predict with "
        "--model RUN_DIR/model.safetensors."
    )
    if scale_known:
        return notice
    return notice + (
        " These images show too few whole red cells or tight crops to measure the lab's magnification by, so each "
        f"is read at a guess (a tight crop's cell as if it were {config.CROP_CELL_UM:g} µm across) and a cell's size, "
        "which tells a small lymphocyte from a monocyte, is lost: give `wbc adapt` the lab's pixels per µm "
        "(--px-per-um X), or a few of its whole smear fields as --unlabelled DIR, and it measures them."
    )


def add_lab_statistic(model_path: Path, data: Path) -> dict:
    """Fit the lab statistic on the images a calibrated model was calibrated on (its validation split when ``data``
    is its training folder, ``data.validation_split``) and store it in the model file, in place and atomically;
    weights, the rest of the calibration and the extra tensors stay as they are. Returns its metadata."""
    model, meta = load_model(model_path)
    if "calibration" not in meta:
        raise WbcError(f"{model_path} has no calibration to add the lab statistic to: run `wbc calibrate` first")
    loaded, fitted_on = validation_split(meta, data)
    lab = LabShift.fit(loaded.images).metadata()
    lab["fitted_on"] = fitted_on
    save_model(
        Path(model_path), model, {**meta, "calibration": {**meta["calibration"], "lab": lab}}, load_extra(model_path)
    )
    return lab
