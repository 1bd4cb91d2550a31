"""ONNX: export a model file for onnxruntime, and run such a file as a drop-in for the PyTorch model.

The exported graph is the whole ``WbcClassifier`` (normalisation included): RGB float in [0, 1], N×3×S×S → logits,
any batch size. The model's wbc-trust metadata travels inside the ONNX file (``metadata_props``), so an ``.onnx`` file
alone is enough to predict: classes, input size and calibration come with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from wbc_trust.data import atomic_write
from wbc_trust.errors import WbcError
from wbc_trust.modelfile import load_model

#: The key of the wbc-trust metadata in the ONNX file's ``metadata_props``.
META_KEY = "wbc_trust"
INPUT_NAME, OUTPUT_NAME = "image", "logits"


def export_onnx(model_path: Path | None, out: Path) -> dict:
    """Export a model file (None = the shipped default) to ``out`` with torch.onnx's exporter; returns its metadata."""
    model, meta = load_model(model_path)
    example = torch.rand(2, 3, meta["img_size"], meta["img_size"])
    program = torch.onnx.export(model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    atomic_write(Path(out), lambda f: f.write(proto.SerializeToString()))
    return meta


class OnnxModel:
    """An ONNX file run by onnxruntime, called like the PyTorch model: float images N×3×S×S in [0, 1] → logits."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for missing, damaged or foreign files
            raise WbcError(f"{path} is not a usable ONNX model ({exc}): export one with `wbc export-onnx`") from exc
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if raw is None:
            raise WbcError(f"{path} has no wbc-trust metadata: export it with `wbc export-onnx`")
        self.meta: dict = json.loads(raw)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images.float().numpy())})[0]
        return torch.from_numpy(logits)
