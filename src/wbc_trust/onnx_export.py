"""ONNX: export a model file for onnxruntime, and run the exported graph in place of the PyTorch network.

The graph is the whole prediction, ``WbcClassifier.predict`` (normalisation and test-time views included): RGB float
in [0, 1], N×3×S×S (any N) → logits N×C, plus the pooled features N×D of its last convolutional layer, because the OOD
score needs them (the same outputs as ``models.logits_and_features``).

An exported file stands alone: ``wbc predict --backend onnx --model OUT.onnx`` needs nothing else. Its
``metadata_props`` hold the model file's metadata (``"wbc_trust"``: the same JSON, calibration included) and the
calibration tensors (``"wbc_trust.extra"``: conformal scores, OOD class means and precision, as the base64 of a
safetensors blob with the model file's names). Metadata rather than ONNX initializers: an initializer that no node
reads is dropped, with a warning, by onnxruntime's graph optimiser and by tools such as onnx-simplifier, so the
calibration would vanish from an optimised copy; metadata survives them, onnxruntime reads it without parsing the
graph again (``get_modelmeta``), and safetensors keeps the tensors bit-exact without running code.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from wbc_trust import config
from wbc_trust.data import cache_dir, to_unit
from wbc_trust.errors import WbcError
from wbc_trust.io import atomic_write
from wbc_trust.modelfile import _validate as validate_metadata  # one set of rules for both file kinds
from wbc_trust.modelfile import load_extra, load_model
from wbc_trust.models import WbcClassifier

#: What runs the network in ``wbc predict --backend``: PyTorch, or the exported graph in onnxruntime.
BACKENDS: tuple[str, ...] = ("torch", "onnx")
META_KEY = "wbc_trust"
EXTRA_KEY = "wbc_trust.extra"
INPUT, OUTPUTS = "image", ("logits", "features")


class _LogitsAndFeatures(nn.Module):
    """``WbcClassifier.predict`` as a module's forward, which is what the exporter traces."""

    def __init__(self, model: WbcClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.predict(x)


def write_onnx(model: WbcClassifier, meta: dict, out: Path, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Export with torch.onnx's exporter (torch.export based) and write the file atomically, with the metadata and
    the extra tensors (calibration) of the model file."""
    example = torch.rand(2, 3, meta["img_size"], meta["img_size"])
    program = torch.onnx.export(
        _LogitsAndFeatures(model).eval(),
        (example,),
        input_names=[INPUT],
        output_names=list(OUTPUTS),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto
    entries = {META_KEY: json.dumps(meta)}
    if extra:
        entries[EXTRA_KEY] = base64.b64encode(save_tensors({k: v.contiguous() for k, v in extra.items()})).decode()
    for key, value in entries.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(Path(out), lambda f: f.write(proto.SerializeToString()))


def export_onnx(model_path: Path | None, out: Path) -> dict:
    """``wbc export-onnx``: a model file (None = the shipped default) → ``out``; returns the model's metadata."""
    model, meta = load_model(model_path)
    write_onnx(model, meta, out, load_extra(model_path))
    return meta


def is_onnx_file(path: Path | None) -> bool:
    """Whether ``--model`` names an exported ONNX file (by its ending) rather than a safetensors model file."""
    return path is not None and Path(path).suffix.lower() == ".onnx"


class OnnxModel:
    """An exported graph run by onnxruntime on the CPU, with the model metadata and extra tensors stored in it."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        if not Path(path).exists():
            raise WbcError(f"ONNX file {path} does not exist: write one with `wbc export-onnx {path}`")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for damaged or foreign files
            raise WbcError(f"{path} is not a usable ONNX model ({exc}): export one with `wbc export-onnx`") from exc
        stored = self.session.get_modelmeta().custom_metadata_map
        try:
            meta = json.loads(stored[META_KEY])
        except (KeyError, ValueError) as exc:
            raise WbcError(
                f"{path} has no wbc-trust metadata (an ONNX file from another tool?): export the model "
                "with `wbc export-onnx`"
            ) from exc
        validate_metadata(Path(path), meta)
        #: The model file's metadata (classes, input size, calibration, ...) and its extra tensors (calibration).
        self.meta: dict = meta
        self.extra: dict[str, torch.Tensor] = (
            load_tensors(base64.b64decode(stored[EXTRA_KEY])) if EXTRA_KEY in stored else {}
        )

    def logits_and_features(self, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and pooled features of uint8 (or [0, 1] float) images N×3×S×S, in batches."""
        outputs = []
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]
            x = to_unit(x)
            outputs.append(self.session.run(list(OUTPUTS), {INPUT: np.ascontiguousarray(x.numpy())}))
        if not outputs:
            return torch.empty(0, 0), torch.empty(0, 0)
        return tuple(torch.from_numpy(np.concatenate(parts)) for parts in zip(*outputs))  # type: ignore[return-value]


def onnx_model_for(model_path: Path | None, model: WbcClassifier, meta: dict) -> OnnxModel:
    """``--backend onnx``: the model file's network through onnxruntime, exported once per file content (cached)."""
    digest = hashlib.sha256(Path(model_path or config.DEFAULT_MODEL_PATH).read_bytes()).hexdigest()[:32]
    path = cache_dir() / "onnx" / f"{digest}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_onnx(model, meta, path, load_extra(model_path))
    return OnnxModel(path)
