"""Prediction: image files → class, confidence, probabilities and a flag, through one ``Predictor``.

A file that cannot be read gets a row with an empty prediction and ``flag = "unreadable: <reason>"``; the batch goes on.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from wbc_trust.data import UnreadableImage, atomic_write_text, image_to_tensor, read_image
from wbc_trust.modelfile import load_model
from wbc_trust.models import predict_probs, prepare_for_cpu


@dataclass
class Prediction:
    """The answer for one file. ``prediction`` is None when the file could not be read."""

    path: str
    prediction: str | None
    confidence: float | None
    probabilities: dict[str, float] = field(default_factory=dict)
    flag: str = ""

    def as_row(self, classes: Sequence[str]) -> dict[str, str]:
        """One CSV row: path, prediction, confidence, p_<class>..., flag."""
        row = {"path": self.path, "prediction": self.prediction or "",
               "confidence": "" if self.confidence is None else f"{self.confidence:.4f}"}
        row.update({f"p_{c}": f"{self.probabilities[c]:.4f}" if self.probabilities else "" for c in classes})
        row["flag"] = self.flag
        return row


class Predictor:
    """A loaded model file ready to classify images; load it once, call it many times."""

    def __init__(self, model_path: Path | None = None, batch_size: int = 64) -> None:
        model, self.meta = load_model(model_path)
        self.model = prepare_for_cpu(model)
        self.classes: list[str] = self.meta["classes"]
        self.img_size: int = self.meta["img_size"]
        self.batch_size = batch_size

    def to_tensor(self, source: Path | bytes) -> torch.Tensor:
        """Read one file (or its bytes) as the model sees it: uint8 3×S×S. Raises ``UnreadableImage``."""
        return image_to_tensor(read_image(source, self.img_size))

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities for a batch of uint8 (or [0, 1] float) images."""
        return predict_probs(self.model, images, batch_size=self.batch_size)

    def _answer(self, path: str, probs: torch.Tensor) -> Prediction:
        best = int(probs.argmax())
        return Prediction(
            path=path,
            prediction=self.classes[best],
            confidence=float(probs[best]),
            probabilities={c: float(p) for c, p in zip(self.classes, probs)},
        )

    def predict_bytes(self, data: bytes, name: str = "upload") -> Prediction:
        """Classify one in-memory image (the app's uploads)."""
        try:
            tensor = self.to_tensor(data)
        except UnreadableImage as exc:
            return Prediction(name, None, None, flag=f"unreadable: {exc}")
        return self._answer(name, self.probabilities(tensor[None])[0])

    def predict_files(self, paths: Sequence[Path], progress: bool = True) -> list[Prediction]:
        """Classify many files in batches; unreadable ones get a flagged row, in input order."""
        results: dict[int, Prediction] = {}
        chunks = list(_chunks(list(enumerate(paths)), self.batch_size))
        for chunk in tqdm(chunks, desc="predicting", unit="batch", leave=False, disable=not progress or len(chunks) < 2):
            tensors, positions = [], []
            for i, path in chunk:
                try:
                    tensors.append(self.to_tensor(Path(path)))
                    positions.append(i)
                except UnreadableImage as exc:
                    results[i] = Prediction(str(path), None, None, flag=f"unreadable: {exc}")
            if tensors:
                for i, probs in zip(positions, self.probabilities(torch.stack(tensors))):
                    results[i] = self._answer(str(paths[i]), probs)
        return [results[i] for i in range(len(paths))]

    def write_csv(self, predictions: Iterable[Prediction], path: Path) -> None:
        """The ``--csv`` file: one row per input file."""
        rows = [p.as_row(self.classes) for p in predictions]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(Path(path), buffer.getvalue())


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
