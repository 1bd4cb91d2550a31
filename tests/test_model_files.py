"""Untrusted model files: weights only from safetensors, metadata validated with clear errors, and a crafted
malicious pickle that does NOT run through any entry point that takes a file (--model, --pretrained PATH,
checkpoint.pt on --resume, the app's Predictor)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import pbc_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from wbc_trust import config
from wbc_trust.cli import app
from wbc_trust.errors import WbcError
from wbc_trust.evaluate import evaluate
from wbc_trust.modelfile import load_model
from wbc_trust.predict import Predictor


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears only if the pickle's code runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable, tuple]:
        return open, (str(self.marker), "w")


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """The marker path and malicious files: a torch.save zip (as .pt and as checkpoint) and a raw pickle."""
    marker = tmp_path / "PWNED"
    torch_file = tmp_path / "source.pt"
    torch.save({"model": Payload(marker), "state_dict": Payload(marker)}, torch_file)
    blobs = {"torch-zip": torch_file.read_bytes(), "raw-pickle": pickle.dumps({"model": Payload(marker)})}
    torch_file.unlink()
    return marker, blobs


def test_the_crafted_pickle_really_runs_code_when_loaded_unsafely(
    evil: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """Positive control: without the protections the payload executes, so the tests below can fail."""
    marker, blobs = evil
    pickle.loads(blobs["raw-pickle"])
    assert marker.exists()
    marker.unlink()
    (tmp_path / "x.pt").write_bytes(blobs["torch-zip"])
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
@pytest.mark.parametrize(
    "name", ["evil.pt", "evil.pth", "evil.PKL", "evil.ckpt", "evil.bin", "evil.safetensors", "evil"]
)
def test_malicious_pickle_as_model_does_not_run(
    evil: tuple[Path, dict[str, bytes]], tmp_path: Path, kind: str, name: str, small_tree: Path
) -> None:
    """--model for predict / evaluate / the app: refused by name, or not a safetensors file; never unpickled."""
    marker, blobs = evil
    path = tmp_path / name
    path.write_bytes(blobs[kind])
    for entry in (
        lambda: load_model(path),
        lambda: Predictor(path),
        lambda: evaluate(path, small_tree, tmp_path / "o"),
    ):
        with pytest.raises(WbcError, match="pickle-based|not a safetensors model file"):
            entry()
    assert not marker.exists()


def _invoke(*args: str) -> BaseException | None:
    """Run a ``wbc`` command in-process; returns the exception it ended with (WbcError → exit 2 in ``wbc``)."""
    return CliRunner().invoke(app, list(args)).exception


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_malicious_pickle_through_the_commands_does_not_run(
    evil: tuple[Path, dict[str, bytes]], tmp_path: Path, small_tree: Path, kind: str
) -> None:
    marker, blobs = evil
    weights = tmp_path / "weights.pth"
    weights.write_bytes(blobs[kind])
    image = str(pbc_files("basophil", 1)[0])

    error = _invoke("predict", image, "--model", str(weights))
    assert isinstance(error, WbcError) and "pickle-based" in str(error)

    train = ["train", "--data", str(small_tree), "--arch", "cnn", "--img-size", "64", "--epochs", "1"]
    error = _invoke(*train, "--out", str(tmp_path / "run1"), "--pretrained", str(weights))  # --pretrained PATH
    assert isinstance(error, WbcError) and "cannot read weights file" in str(error), error

    run = tmp_path / "run2"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(blobs[kind])
    error = _invoke(*train, "--out", str(run), "--resume")  # checkpoint.pt on --resume
    assert isinstance(error, WbcError) and "not a checkpoint written by `wbc train`" in str(error), error
    assert not (run / "model.safetensors").exists()
    assert not marker.exists()


# --- metadata validation -------------------------------------------------------------------------------------------


def _rewrite(
    source: Path, target: Path, change: Callable[[dict], None], tensors: Callable[[dict], dict] = lambda t: t
) -> Path:
    """Copy a real model file with edited metadata (and optionally edited tensors)."""
    with safe_open(str(source), "pt") as f:
        meta = json.loads(f.metadata()["wbc_trust"])
    change(meta)
    save_file(tensors(load_file(str(source))), str(target), metadata={"wbc_trust": json.dumps(meta)})
    return target


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda meta: meta.__setitem__(key, value)


BAD_METADATA = {
    "unknown-arch": (_set("arch", "transformer9000"), "unknown architecture 'transformer9000'"),
    "no-classes": (lambda m: m.pop("classes"), "class list is missing"),
    "one-class": (_set("classes", ["neutrophil"]), "class list"),
    "duplicate-classes": (
        _set("classes", ["basophil", "basophil", "lymphocyte", "monocyte", "neutrophil"]),
        "distinct",
    ),
    "non-string-classes": (_set("classes", [1, 2, 3, 4, 5]), "class list"),
    "size-zero": (_set("img_size", 0), "input size 0"),
    "size-string": (_set("img_size", "64"), "input size '64'"),
    "size-huge": (_set("img_size", 100_000), "input size 100000"),
    "newer-format": (_set("format_version", 99), "newer wbc-trust"),
    "format-version-string": (_set("format_version", "1"), "format version"),
    "other-tool": (_set("format", "something-else"), "no wbc-trust metadata"),
    "unknown-test-view": (_set("test_views", ["identity", "rotate45"]), "test views"),
    "wrong-arch-for-weights": (_set("arch", "efficientnet_lite0"), "do not fit its metadata"),
    "fewer-classes-than-weights": (
        _set("classes", ["basophil", "eosinophil", "lymphocyte", "monocyte"]),
        "do not fit its metadata",
    ),
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_bad_metadata_is_refused_with_a_clear_error(tiny_run: Path, tmp_path: Path, case: str) -> None:
    change, message = BAD_METADATA[case]
    path = _rewrite(tiny_run / "model.safetensors", tmp_path / "m.safetensors", change)
    with pytest.raises(WbcError, match="Pass a file written by `wbc train`|the file is damaged") as info:
        load_model(path)
    assert message in str(info.value), str(info.value)
    assert str(path) in str(info.value)


def test_tensors_of_the_wrong_shape_are_refused(tiny_run: Path, tmp_path: Path) -> None:
    def shrink(tensors: dict) -> dict:
        key = next(k for k in tensors if k.endswith("weight") and tensors[k].ndim == 4)
        return {**tensors, key: tensors[key][:1]}

    path = _rewrite(tiny_run / "model.safetensors", tmp_path / "m.safetensors", lambda m: None, shrink)
    with pytest.raises(WbcError, match="do not fit its metadata"):
        load_model(path)


def test_a_valid_rewrite_still_loads(tiny_run: Path, tmp_path: Path) -> None:
    """The rewriting helper itself keeps a good file good (so the refusals above come from the edits)."""
    path = _rewrite(tiny_run / "model.safetensors", tmp_path / "m.safetensors", lambda m: None)
    model, meta = load_model(path)
    reference, _ = load_model(tiny_run / "model.safetensors")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x)) and meta["classes"] == list(config.CLASSES)


@pytest.fixture(scope="module")
def model_bytes(tiny_run: Path) -> bytes:
    return (tiny_run / "model.safetensors").read_bytes()


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(st.tuples(st.integers(0, 8191), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4),
    st.integers(0, 64),
)
def test_damaged_model_file_headers_give_clear_errors(
    model_bytes: bytes, tmp_path_factory: pytest.TempPathFactory, edits: list[tuple[int, bytes]], cut: int
) -> None:
    """Byte edits in the header and metadata region (and a cut tail): it loads, or a WbcError says why."""
    data = bytearray(model_bytes[: len(model_bytes) - cut * 1024])
    for at, payload in edits:
        data[at : at + len(payload)] = payload
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    path.write_bytes(bytes(data))
    try:
        model, meta = load_model(path)
    except WbcError as exc:
        assert str(path) in str(exc)
    else:
        assert meta["arch"] in ("cnn", "vgg16", "resnet50", "efficientnet_lite0") and not model.training
