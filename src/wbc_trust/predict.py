"""Prediction: image files → class, confidence, probabilities, prediction set, OOD score and a flag, through one
``Predictor``.

A file that cannot be read gets a row with an empty prediction and ``flag = "unreadable: <reason>"``; the batch goes on.
When the model file carries a calibration (``wbc calibrate``, or the end of ``wbc train``) the confidence is the
temperature-scaled probability and ``flag`` says ``out-of-distribution`` or ``uncertain`` (the prediction set is not
exactly one class); without one, those columns stay empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from wbc_trust.calibration import FLAG_NEW_LAB, Calibration
from wbc_trust.conformal import check_coverage
from wbc_trust.crop import CropPolicy, CropResult
from wbc_trust.data import UnreadableImage, batch_policy, image_to_tensor, view_image
from wbc_trust.errors import WbcError
from wbc_trust.io import write_csv
from wbc_trust.lab import batch_notice
from wbc_trust.modelfile import load_extra, load_model
from wbc_trust.models import logits_and_features, prepare_for_cpu
from wbc_trust.onnx_export import BACKENDS, OnnxModel, is_onnx_file, onnx_model_for


@dataclass
class Prediction:
    """The answer for one file. ``prediction`` is None when the file could not be read."""

    path: str
    prediction: str | None
    confidence: float | None
    probabilities: dict[str, float] = field(default_factory=dict)
    flag: str = ""
    prediction_set: list[str] | None = None  # None: unreadable, or a model without calibration
    ood_score: float | None = None

    def as_row(self, classes: Sequence[str]) -> dict[str, str]:
        """One CSV row: path, prediction, confidence, p_<class>..., flag, prediction_set (classes joined by "|"),
        ood_score (the trust columns come last, so the earlier columns keep their positions)."""
        row = {
            "path": self.path,
            "prediction": self.prediction or "",
            "confidence": "" if self.confidence is None else f"{self.confidence:.4f}",
        }
        row.update({f"p_{c}": f"{self.probabilities[c]:.4f}" if self.probabilities else "" for c in classes})
        row["flag"] = self.flag
        row["prediction_set"] = "|".join(self.prediction_set or [])
        row["ood_score"] = "" if self.ood_score is None else f"{self.ood_score:.2f}"
        return row


class Predictor:
    """A loaded model file ready to classify images; load it once, call it many times."""

    def __init__(
        self,
        model_path: Path | None = None,
        batch_size: int = 64,
        coverage: float | None = None,
        backend: str = "torch",
    ) -> None:
        if backend not in BACKENDS:
            raise WbcError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if is_onnx_file(model_path):  # `wbc export-onnx`'s file: network, metadata and calibration all inside
            if backend != "onnx":
                raise WbcError(f"{model_path} is an ONNX file: run it with --backend onnx")
            self.model = OnnxModel(Path(model_path))
            self.meta, extra = self.model.meta, self.model.extra
        else:
            model, self.meta = load_model(model_path)
            # --backend onnx: the same network, run by onnxruntime; metadata and calibration come from the model file
            self.model = onnx_model_for(model_path, model, self.meta) if backend == "onnx" else prepare_for_cpu(model)
            extra = load_extra(model_path)
        self.classes: list[str] = self.meta["classes"]
        self.img_size: int = self.meta["img_size"]
        self.crop = CropPolicy.from_meta(self.meta)
        self.batch_size = batch_size
        self.calibration = Calibration.from_model(self.meta, extra)
        self.coverage = coverage if coverage is None else check_coverage(coverage)  # None: the calibrated one

    def view(self, source: Path | bytes, crop: CropPolicy | None = None) -> CropResult:
        """Read one file (or its bytes) and cut the model's view of it (its crop policy, ``crop.py``, or ``crop``),
        with the view's flag (several white cells, none found). Raises ``UnreadableImage``."""
        return view_image(source, crop or self.crop)

    def to_tensor(self, source: Path | bytes) -> torch.Tensor:
        """One file (or its bytes) as the model sees it: uint8 3×S×S. Raises ``UnreadableImage``."""
        return image_to_tensor(self.view(source).image)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and pooled features (for the OOD score) of a batch of uint8 (or [0, 1] float) images."""
        if isinstance(self.model, OnnxModel):
            return self.model.logits_and_features(images, self.batch_size)
        return logits_and_features(self.model, images, batch_size=self.batch_size)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities for a batch of uint8 (or [0, 1] float) images, temperature-scaled when calibrated."""
        logits, _ = self._forward(images)
        return torch.softmax(logits / (self.calibration.temperature if self.calibration else 1.0), 1)

    def predict_views(
        self, paths: Sequence[str], images: torch.Tensor, view_flags: Sequence[str] | None = None
    ) -> list[Prediction]:
        """Answers for a batch of views already cut (uint8 N×3×S×S, ``view``), named by ``paths``; each view's flag
        (several white cells, none found) comes first in the answer's flag."""
        logits, features = self._forward(images)
        if self.calibration is None:
            probs, sets, scores, flags = torch.softmax(logits, 1), None, None, [""] * len(paths)
        else:
            trusted = self.calibration.apply(logits, features, self.coverage, images)
            probs, sets, scores, flags = trusted.probs, trusted.sets, trusted.ood_scores.tolist(), trusted.flags
        view_flags = view_flags or [""] * len(paths)
        return [
            Prediction(
                path=path,
                prediction=self.classes[int(p.argmax())],
                confidence=float(p.max()),
                probabilities={c: float(v) for c, v in zip(self.classes, p)},
                flag="; ".join(f for f in (view_flags[i], flags[i]) if f),
                prediction_set=None if sets is None else [c for c, member in zip(self.classes, sets[i]) if member],
                ood_score=None if scores is None else scores[i],
            )
            for i, (path, p) in enumerate(zip(paths, probs))
        ]

    def predict_bytes(self, data: bytes, name: str = "upload") -> Prediction:
        """Classify one in-memory image (the app's uploads)."""
        try:
            view = self.view(data)
        except UnreadableImage as exc:
            return Prediction(name, None, None, flag=f"unreadable: {exc}")
        return self.predict_views([name], image_to_tensor(view.image)[None], [view.flag])[0]

    def batch_policy(self, paths: Sequence[Path]) -> CropPolicy:
        """The crop policy for reading ``paths`` together: a cell view at their one measured magnification
        (``data.batch_policy``), or the model's own."""
        return batch_policy(self.crop, [Path(p) for p in paths])

    def predict_files(
        self, paths: Sequence[Path], progress: bool = True, crop: CropPolicy | None = None
    ) -> list[Prediction]:
        """Classify many files in batches, read at the batch's magnification (``batch_policy``; or by ``crop``, as a
        Ray worker reads its share of a batch measured once); unreadable ones get a flagged row, in input order."""
        crop = crop or self.batch_policy(paths)
        results: dict[int, Prediction] = {}
        chunks = list(_chunks(list(enumerate(paths)), self.batch_size))
        for chunk in tqdm(
            chunks, desc="predicting", unit="batch", leave=False, disable=not progress or len(chunks) < 2
        ):
            tensors, positions, view_flags = [], [], []
            for i, path in chunk:
                try:
                    view = self.view(Path(path), crop)
                except UnreadableImage as exc:
                    results[i] = Prediction(str(path), None, None, flag=f"unreadable: {exc}")
                    continue
                tensors.append(image_to_tensor(view.image))
                positions.append(i)
                view_flags.append(view.flag)
            if tensors:
                names = [str(paths[i]) for i in positions]
                results.update(zip(positions, self.predict_views(names, torch.stack(tensors), view_flags)))
        return [results[i] for i in range(len(paths))]

    def batch_notice(self, predictions: Sequence[Prediction], crop: CropPolicy | None = None) -> str | None:
        """One message for a batch that mostly looks like another lab's (``lab.batch_notice``), or None; ``crop``:
        the policy the batch was read with (``batch_policy``), which says whether its magnification was known."""
        readable = [p for p in predictions if p.prediction is not None]
        crop = crop or self.crop
        scale_known = crop.kind != "cell" or crop.px_per_um is not None
        return batch_notice(sum(p.flag == FLAG_NEW_LAB for p in readable), len(readable), scale_known)

    def write_csv(self, predictions: Iterable[Prediction], path: Path) -> None:
        """The ``--csv`` file: one row per input file."""
        rows = [p.as_row(self.classes) for p in predictions]
        write_csv(Path(path), rows, list(rows[0]) if rows else ["path"])


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
