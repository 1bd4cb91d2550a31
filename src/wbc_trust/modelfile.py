"""The one place that saves and loads a model file: safetensors weights plus JSON metadata.

safetensors holds only tensors, so opening a model file can never run code (unlike a pickle). The metadata says
everything needed to use the model without the training run: architecture, classes in order, input size,
normalisation, data summary, validation metrics, calibration, credit.
"""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from wbc_trust import config
from wbc_trust.colour import ColourTransfer
from wbc_trust.crop import CropPolicy
from wbc_trust.errors import WbcError
from wbc_trust.io import atomic_write
from wbc_trust.models import REGISTRY, VIEWS, WbcClassifier, build_model

FORMAT = "wbc-trust-model"
FORMAT_VERSION = 1
_META_KEY = "wbc_trust"
_EXTRA_PREFIX = "extra."


def save_model(path: Path, model: WbcClassifier, meta: dict, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write weights + metadata atomically (temporary file, then rename): a crash never leaves half a model.

    ``extra`` holds tensors that belong to the model but are too large for JSON metadata (e.g. the out-of-distribution
    detector's feature statistics); they are stored under ``extra.<name>`` and read back by ``load_extra``.
    """
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.net.state_dict().items()}
    state.update({_EXTRA_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in (extra or {}).items()})
    blob = save(state, metadata={_META_KEY: json.dumps(meta)})
    atomic_write(Path(path), lambda f: f.write(blob))


def store_half(source: Path, target: Path) -> None:
    """Rewrite a model file with its network's weight matrices and kernels in half precision (float16).

    Why: the model shipped in the package must stay under the project's 20 MB for a file in git, and EfficientNet-Lite1
    in float32 is 20.4 MB. Only tensors of two or more dimensions (convolution kernels, the head's matrix) are rounded,
    where the bytes are; batch-norm parameters and statistics, biases and the extra tensors (OOD and conformal
    statistics) stay as they were. ``load_model`` copies the weights into the float32 network, so nothing else reads
    them differently; ``meta["weights_dtype"]`` says it was done.
    """
    meta = {**read_metadata(source), "weights_dtype": "float16"}
    state = load_file(str(source))
    for name, tensor in state.items():
        if not name.startswith(_EXTRA_PREFIX) and tensor.is_floating_point() and tensor.dim() >= 2:
            state[name] = tensor.half()
    blob = save(state, metadata={_META_KEY: json.dumps(meta)})
    atomic_write(Path(target), lambda f: f.write(blob))


def read_metadata(path: Path) -> dict:
    """Read and validate only the metadata of a model file (fast: the weights are not loaded)."""
    path = Path(path)
    if not path.exists():
        raise WbcError(f"model file {path} does not exist: train one with `wbc train` or drop --model for the default")
    if path.suffix.lower() in (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"):
        raise WbcError(
            f"{path} is a pickle-based file, which could run code when opened: wbc-trust only loads .safetensors "
            "model files written by `wbc train`"
        )
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len < 100_000_000:
                raise ValueError("no safetensors header")
            header = json.loads(f.read(header_len))
        metadata = header.get("__metadata__") if isinstance(header, dict) else None
        meta = json.loads(metadata.get(_META_KEY, "null")) if isinstance(metadata, dict) else None
    except (ValueError, TypeError, RecursionError, UnicodeDecodeError, OSError) as exc:  # crafted headers included
        raise WbcError(f"{path} is not a safetensors model file ({exc}): pass a file written by `wbc train`") from exc
    _validate(path, meta)
    return meta


def _crop_problem(meta: dict) -> str | None:
    """Why ``meta["crop"]`` is no crop policy (``crop.CropPolicy`` checks its own fields), or None."""
    try:
        CropPolicy.from_meta(meta)
    except (WbcError, TypeError, ValueError, KeyError, AttributeError) as exc:
        return f"its crop policy {meta['crop']!r} is not usable ({exc})"
    return None


def _validate(path: Path, meta: object) -> None:
    problem = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        problem = "it has no wbc-trust metadata (a safetensors file from another tool?)"
    elif not isinstance(meta.get("format_version"), int):
        problem = "its format version is missing"
    elif meta["format_version"] > FORMAT_VERSION:
        problem = f"it was written by a newer wbc-trust (format {meta['format_version']}); upgrade wbc-trust"
    elif not isinstance(meta.get("arch"), str) or meta["arch"] not in REGISTRY:
        problem = f"unknown architecture {meta.get('arch')!r} (this wbc-trust knows {', '.join(REGISTRY)})"
    elif not (
        isinstance(meta.get("classes"), list)
        and len(meta["classes"]) >= 2
        and all(isinstance(c, str) and c for c in meta["classes"])
        and len(set(meta["classes"])) == len(meta["classes"])
    ):
        problem = "its class list is missing or malformed (at least two distinct class names are needed)"
    elif not (isinstance(meta.get("img_size"), int) and 16 <= meta["img_size"] <= 1024):
        problem = f"its input size {meta.get('img_size')!r} is not a whole number of pixels between 16 and 1024"
    elif "test_views" in meta and not (
        isinstance(meta["test_views"], list) and meta["test_views"] and all(v in VIEWS for v in meta["test_views"])
    ):
        problem = f"its test views {meta['test_views']!r} are not a list of {', '.join(VIEWS)}"
    elif "crop" in meta:
        problem = _crop_problem(meta)
    if problem:
        raise WbcError(f"{path} is not a usable wbc-trust model: {problem}. Pass a file written by `wbc train`")


def load_model(path: Path | None = None) -> tuple[WbcClassifier, dict]:
    """Load a model file (the shipped default when ``path`` is None) in eval mode, with its metadata."""
    path = Path(path) if path is not None else config.DEFAULT_MODEL_PATH
    meta = read_metadata(path)
    model = build_model(meta["arch"], num_classes=len(meta["classes"]))
    try:
        state = load_file(str(path))
        model.net.load_state_dict({k: v for k, v in state.items() if not k.startswith(_EXTRA_PREFIX)})
    except (SafetensorError, RuntimeError) as exc:
        raise WbcError(f"the weights in {path} do not fit its metadata ({meta['arch']}): the file is damaged") from exc
    model.views = tuple(meta.get("test_views", ["identity"]))  # files from before test views: the image alone
    if "colour" in meta:  # adapted to a lab's colours (wbc adapt --unlabelled)
        model.colour = ColourTransfer.from_meta(meta["colour"])
    model.eval()
    return model, meta


def load_extra(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The extra tensors saved beside the weights (empty for files that have none, e.g. older models)."""
    path = Path(path) if path is not None else config.DEFAULT_MODEL_PATH
    with safe_open(str(path), framework="pt") as f:
        return {k[len(_EXTRA_PREFIX) :]: f.get_tensor(k) for k in f.keys() if k.startswith(_EXTRA_PREFIX)}


#: Extra tensors ``influence.checkpoint<i>.weight|bias``: the last layer after each training epoch up to the saved one.
HEAD_CHECKPOINT_PREFIX = "influence.checkpoint"


def head_checkpoints(path: Path | None = None) -> list[dict[str, torch.Tensor]]:
    """The per-epoch last-layer checkpoints ``wbc train`` stores in a model file, oldest first (empty for files
    without them, e.g. the shipped default model, trained before they were kept)."""
    extra = load_extra(path)
    heads: list[dict[str, torch.Tensor]] = []
    while f"{HEAD_CHECKPOINT_PREFIX}{len(heads)}.weight" in extra:
        i = len(heads)
        heads.append({k: extra[f"{HEAD_CHECKPOINT_PREFIX}{i}.{k}"] for k in ("weight", "bias")})
    return heads


def run_manifest() -> dict:
    """Package versions, git commit and platform: stored in every model so a result can be reproduced."""
    versions = {}
    for pkg in ("wbc-trust", "torch", "torchvision", "timm", "numpy", "pillow", "scikit-learn"):
        try:
            versions[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            pass
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=config.PACKAGE_DIR, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "git_commit": commit,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
