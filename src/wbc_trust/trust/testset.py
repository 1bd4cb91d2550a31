"""The labelled images a trust method runs on: the same choice as ``wbc evaluate`` (a model's own training folder →
only its held-out test split), optionally a stratified subset so that slow methods stay quick."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from wbc_trust import config
from wbc_trust.data import Record, find_dataset, load_images
from wbc_trust.errors import WbcError
from wbc_trust.evaluate import choose_records


@dataclass
class LabelledImages:
    """Decoded images with labels as indices into the model's own class list."""

    records: list[Record]
    images: torch.Tensor  # uint8 N×3×S×S
    labels: np.ndarray  # int N, index into meta["classes"]
    description: str


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
    """The labelled images of ``data`` that the model is tested on (see ``evaluate.choose_records``), decoded at the
    model's input size; unreadable files are reported and left out; classes the model does not know are refused."""
    index = find_dataset(data, require_all_classes=False)
    target = choose_records(index, meta)
    records = stratified_subset(target.records, max_images)
    loaded = load_images(records, meta["img_size"], desc="reading images")
    for path, reason in loaded.unreadable:
        print(f"skipped unreadable file {path}: {reason}")
    if not loaded.records:
        raise WbcError(f"none of the {len(records)} files in {data} could be read as images: pass a folder of images")
    classes = meta["classes"]
    unknown = sorted({config.CLASSES[r.label] for r in loaded.records} - set(classes))
    if unknown:
        raise WbcError(f"the model does not know the class(es) {', '.join(unknown)} found in {data}: "
                       "pass data with the model's classes only")
    labels = np.array([classes.index(config.CLASSES[r.label]) for r in loaded.records])
    subset = len(records) < len(target.records)
    description = target.description + (f"; stratified subset of {len(records)}" if subset else "")
    return LabelledImages(loaded.records, loaded.images, labels, description)
