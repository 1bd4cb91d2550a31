"""The web app's sidebar and its server-side files, run by Streamlit's AppTest (the real page script, in-process, no
browser): the validation accuracy the model file stores is shown; server folders and index paths are typed only with
``--allow-server-paths``; uploaded model files are capped in number and size and removed; a real field's cells are
counted in the field mode and a person's corrections move them between the differential's rows."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import SHARED, require_shared
from streamlit.testing.v1 import AppTest

from wbc_trust import config
from wbc_trust.app import (
    DEFAULT_CHOICE,
    FIELDS_MODE,
    FOLDER_CHOICE,
    UNREVIEWED,
    UPLOAD_CHOICE,
    ModelUploads,
    model_uploads,
)
from wbc_trust.corrections import NOT_WBC
from wbc_trust.errors import WbcError
from wbc_trust.modelfile import read_metadata
from wbc_trust.serve import streamlit_command

SCRIPT = Path(__file__).resolve().parents[1] / "app_streamlit.py"
TIMEOUT_S = 120  # the first run loads the model


def run_app(monkeypatch: pytest.MonkeyPatch, *args: str) -> AppTest:
    """The page as `wbc app` starts it, with these options after ``--``."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    app = AppTest.from_file(str(SCRIPT), default_timeout=TIMEOUT_S)
    app.run()
    assert not app.exception, app.exception
    return app


def sidebar_text(app: AppTest) -> str:
    return "\n".join(m.value for m in app.sidebar.markdown)


def test_sidebar_shows_the_stored_validation_accuracy(monkeypatch: pytest.MonkeyPatch, default_model: Path) -> None:
    accuracy = read_metadata(default_model)["validation"]["val_accuracy"]
    assert f"validation accuracy: **{accuracy:.2%}**" in sidebar_text(run_app(monkeypatch))


def test_server_folders_only_with_allow_server_paths(
    monkeypatch: pytest.MonkeyPatch, default_model: Path, tmp_path: Path
) -> None:
    closed = run_app(monkeypatch)
    assert closed.sidebar.radio[0].options == [DEFAULT_CHOICE, UPLOAD_CHOICE]
    assert not closed.sidebar.text_input, "a visitor can type a server path"

    folder = tmp_path / "runs" / "a"
    folder.mkdir(parents=True)
    shutil.copy(default_model, folder / "model.safetensors")
    fixed = run_app(monkeypatch, f"--models-dir={tmp_path / 'runs'}")  # the operator's folder, not editable
    fixed.sidebar.radio[0].set_value(FOLDER_CHOICE).run()
    assert not fixed.sidebar.text_input and fixed.sidebar.selectbox[0].options == ["a/model.safetensors"]

    opened = run_app(monkeypatch, "--allow-server-paths")
    assert opened.sidebar.radio[0].options == [DEFAULT_CHOICE, FOLDER_CHOICE, UPLOAD_CHOICE]
    opened.sidebar.radio[0].set_value(FOLDER_CHOICE).run()
    folder_input = next(t for t in opened.sidebar.text_input if t.label == "Folder")
    folder_input.set_value(str(tmp_path / "runs")).run()
    assert opened.sidebar.selectbox[0].options == ["a/model.safetensors"]
    assert any(t.label.startswith("Influence index") for t in opened.sidebar.text_input)
    assert "--allow-server-paths" in streamlit_command(allow_server_paths=True)
    assert "--allow-server-paths" not in streamlit_command()


def test_uploaded_model_files_are_capped_and_removed(default_model: Path) -> None:
    real = default_model.read_bytes()
    uploads = ModelUploads(max_files=2, max_mb=1 + len(real) // 2**20)
    paths = [uploads.save(real + bytes(i)) for i in range(3)]  # three different files
    assert uploads.files() == paths[1:], "the least recently uploaded file must go first"
    assert uploads.save(real + bytes(1)) == paths[1] and uploads.files() == [paths[2], paths[1]]
    assert read_metadata(paths[1])["arch"] == read_metadata(default_model)["arch"]  # stored unchanged
    with pytest.raises(WbcError, match="larger than"):
        uploads.save(real + bytes(2**20))
    assert len(uploads.files()) == 2
    uploads.close()
    assert not uploads.folder.exists()


def test_an_uploaded_file_that_is_no_model_is_removed(monkeypatch: pytest.MonkeyPatch, default_model: Path) -> None:
    app = run_app(monkeypatch)
    app.sidebar.radio[0].set_value(UPLOAD_CHOICE).run()
    real = default_model.read_bytes()
    app.sidebar.file_uploader[0].set_value(("mine.safetensors", real, "application/octet-stream")).run()
    assert not app.error, [e.value for e in app.error]
    assert "efficientnet" in sidebar_text(app)
    kept = model_uploads().files()
    assert len(kept) == 1 and kept[0].read_bytes() == real
    app.sidebar.file_uploader[0].set_value(("model.safetensors", b"\x00" * 64, "application/octet-stream")).run()
    assert any("cannot be used" in e.value for e in app.error), [e.value for e in app.error]
    assert model_uploads().files() == kept, "the rejected upload stayed on the server"
    assert config.APP_MAX_MODEL_UPLOAD_MB * 2**20 > Path(config.DEFAULT_MODEL_PATH).stat().st_size


def test_field_mode_counts_a_real_field_and_takes_corrections(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real BCCD field in the field mode: its cells in the differential (flagged ones apart) and the gallery; a
    person's choice in a cell's select box moves the cell into its class's count."""
    require_shared()
    field = SHARED / "bccd-fields" / "JPEGImages" / "BloodImage_00040.jpg"
    app = run_app(monkeypatch)
    app.radio[0].set_value(FIELDS_MODE).run()
    app.file_uploader[0].set_value([(field.name, field.read_bytes(), "image/jpeg")]).run()
    assert not app.exception, app.exception

    def counts() -> dict[str, int]:
        return app.table[0].value["count"].to_dict()

    boxes = app.selectbox
    assert len(boxes) >= 2, "the field's white cells are not in the gallery"
    before = counts()
    assert sum(before.values()) == len(boxes)  # every cell found is counted, or flagged and counted apart
    original = boxes[0].value
    pick = next(c for c in config.CLASSES if c != original)
    boxes[0].set_value(pick).run()
    after = counts()
    assert after[pick] == before[pick] + 1
    moved_from = "flagged (not counted)" if original == UNREVIEWED else original
    assert after[moved_from] == before[moved_from] - 1
    app.selectbox[1].set_value(NOT_WBC).run()
    assert sum(counts().values()) == len(boxes) - 1, "a cell marked not a white cell is still counted"
    assert any("1** marked not a white cell" in m.value for m in app.markdown)
