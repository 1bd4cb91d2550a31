"""The web app: upload white-cell images and see, for each, the class, how far to trust it, and where the model looked.

Start it with ``streamlit run app_streamlit.py`` or ``wbc app`` (see ``serve.py``). Streamlit re-runs this script top
to bottom on every interaction, so everything slow is cached: the model once per model file (``st.cache_resource``),
each image's analysis once per (model, file content) (``st.cache_data``).

Safety: uploads stay in memory; an upload's file name is only ever shown (escaped), never used as a path. The only file
the app writes is an uploaded model, into a temporary folder, named after its content hash.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
import pandas as pd
import streamlit as st
import torch

from wbc_trust import config
from wbc_trust.data import read_image
from wbc_trust.io import atomic_write
from wbc_trust.errors import WbcError
from wbc_trust.models import WbcClassifier
from wbc_trust.predict import Prediction, Predictor
from wbc_trust.calibration import FLAG_OOD, FLAG_UNCERTAIN
from wbc_trust.trust.gradcam import gradcam_overlay
from wbc_trust.trust.influence import InfluenceIndex, influential_training_images

UPLOAD_TYPES: tuple[str, ...] = ("jpg", "jpeg", "png", "bmp", "tif", "tiff")
DEFAULT_CHOICE, FOLDER_CHOICE, UPLOAD_CHOICE = "shipped default", "a file in a folder", "upload a model file"
PREDICTION_SET_HELP = ("The classes the calibration cannot rule out: the true class is in this set for the chosen "
                       "share of images (95 % by default). One class = a confident answer.")


@dataclass
class LoadedModel:
    """A model ready for the app. ``lock`` serialises its use across browser sessions: Streamlit runs each session in
    its own thread, and Grad-CAM's hooks on the shared model would otherwise record another session's forward pass."""

    predictor: Predictor
    lock: threading.Lock


@dataclass
class Analysis:
    """What the app shows for one upload; ``original`` and ``overlay`` are None when the file could not be read."""

    name: str
    prediction: Prediction
    original: np.ndarray | None = None
    overlay: np.ndarray | None = None
    supporting: list[dict] = field(default_factory=list)  # training images that most support the answer


# ---------------------------------------------------------------------------------------------------------------
# Work (no Streamlit widgets here, so the benchmark and tests call the same code)
# ---------------------------------------------------------------------------------------------------------------


def analyse(model: LoadedModel, name: str, data: bytes, index: InfluenceIndex | None = None) -> Analysis:
    """Classify one upload and explain it with Grad-CAM on the predicted class and, given the model's influence
    index, the training images that most support the answer; a bad file gets a flagged row."""
    if len(data) > config.APP_MAX_UPLOAD_MB * 1024 * 1024:
        reason = f"unreadable: file larger than {config.APP_MAX_UPLOAD_MB} MB"
        return Analysis(name, Prediction(name, None, None, flag=reason))
    predictor = model.predictor
    with model.lock:
        prediction = predictor.predict_bytes(data, name)
        if prediction.prediction is None:
            return Analysis(name, prediction)
        # stored channels-last (H×W×3 in memory) like the model's weights: oneDNN's fast path, ~3× faster with grad on
        tensor = predictor.to_tensor(data).permute(1, 2, 0).contiguous().permute(2, 0, 1)
        _, overlay = gradcam_overlay(predictor.model, tensor, target=predictor.classes.index(prediction.prediction))
        supporting = [] if index is None else influential_training_images(
            predictor.model, tensor, index, k=config.APP_SUPPORTING_IMAGES)["helpful"]
    original = read_image(data)
    original.thumbnail((config.APP_DISPLAY_PX, config.APP_DISPLAY_PX))
    return Analysis(name, prediction, np.asarray(original), overlay, supporting)


def summary_table(analyses: Sequence[Analysis], classes: Sequence[str]) -> pd.DataFrame:
    """One row per upload, the same columns as ``wbc predict --csv``."""
    return pd.DataFrame([a.prediction.as_row(classes) for a in analyses])


def display_name(name: str) -> str:
    """An upload's name made safe to show as Markdown: the last path part only, short, Markdown syntax escaped.

    Written by hand because Streamlit has no escaping helper; it only affects how the name is displayed.
    """
    short = PurePath(name.replace("\\", "/")).name[:100] or "upload"
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$])", r"\\\1", short)


def saved_model_upload(data: bytes) -> Path:
    """Write an uploaded model file into the temp dir under its content hash (never its uploaded name)."""
    folder = Path(tempfile.gettempdir()) / "wbc-trust-app"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.safetensors"
    if not path.exists():
        atomic_write(path, lambda f: f.write(data))
    return path


def model_files(folder: Path) -> list[Path]:
    """Model files in a folder and in its run sub-folders (``runs/<name>/model.safetensors``)."""
    if not folder.is_dir():
        return []
    return sorted({*folder.glob("*.safetensors"), *folder.glob("*/*.safetensors")})


# ---------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------


def cheap_gradcam(model: WbcClassifier) -> None:
    """Make Grad-CAM cost about one forward pass on a model used only for inference.

    Grad-CAM needs the gradient of the class score with respect to the target layer's output and nothing else. So no
    weight needs a gradient, and autograd's graph can start at that layer: the backward pass then runs through the
    classifier head only, instead of through the whole network and every weight.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.feature_layer().register_forward_hook(_start_graph_here)


def _start_graph_here(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    return output.detach().requires_grad_() if torch.is_grad_enabled() else None


def load_model_for_app(model_path: Path) -> LoadedModel:
    """A model file ready for ``analyse``."""
    predictor = Predictor(model_path)
    cheap_gradcam(predictor.model)
    return LoadedModel(predictor, threading.Lock())


@st.cache_resource(max_entries=4, show_spinner="loading the model…")
def load(model_path: str) -> LoadedModel:
    """Load a model file once for all sessions."""
    return load_model_for_app(Path(model_path))


@st.cache_resource(max_entries=4, show_spinner="loading the influence index…")
def load_index(index_path: str, model_path: str) -> InfluenceIndex:
    """Load an influence index once, after checking that it was built for this model."""
    index = InfluenceIndex.load(Path(index_path))
    index.check_model(load(model_path).predictor.model)
    return index


@st.cache_data(max_entries=512, show_spinner=False)
def cached_analysis(model_path: str, index_path: str | None, name: str, data: bytes) -> Analysis:
    """``analyse`` once per model, index and file content (re-runs of the page and repeated uploads cost nothing)."""
    return analyse(load(model_path), name, data, load_index(index_path, model_path) if index_path else None)


def _arguments() -> argparse.Namespace:
    """Options after ``--`` on the ``streamlit run`` line (``wbc app`` fills them in)."""
    parser = argparse.ArgumentParser(prog="app_streamlit.py")
    parser.add_argument("--model", type=Path, default=None, help="the model selected at start")
    parser.add_argument("--models-dir", type=Path, default=Path.cwd(), help="where to look for other model files")
    parser.add_argument("--influence-index", type=Path, default=None, help="`wbc trust influence`'s index file")
    return parser.parse_known_args(sys.argv[1:])[0]


def choose_model(args: argparse.Namespace) -> Path:
    """The sidebar's model picker: the default, a model file from a folder, or an uploaded model file."""
    st.sidebar.header("Model", anchor=False)
    default = args.model or config.DEFAULT_MODEL_PATH
    choice = st.sidebar.radio("Which model", [DEFAULT_CHOICE, FOLDER_CHOICE, UPLOAD_CHOICE], label_visibility="collapsed")
    if choice == FOLDER_CHOICE:
        folder = Path(st.sidebar.text_input("Folder", str(args.models_dir))).expanduser()
        files = model_files(folder)
        if not files:
            st.sidebar.warning("No .safetensors model files in that folder or its sub-folders: using the default.")
            return default
        picked = st.sidebar.selectbox("Model file", files, format_func=lambda p: str(p.relative_to(folder)))
        return Path(picked)
    if choice == UPLOAD_CHOICE:
        upload = st.sidebar.file_uploader("Model file (.safetensors from `wbc train`)", type=["safetensors"],
                                          max_upload_size=config.APP_MAX_UPLOAD_MB)
        return saved_model_upload(upload.getvalue()) if upload is not None else default
    return default


def choose_index(args: argparse.Namespace, model_path: str) -> str | None:
    """The sidebar's optional influence index (``wbc trust influence`` writes one): it adds the training images
    that most support each answer. None when not given or not usable with this model."""
    st.sidebar.header("Training images", anchor=False)
    text = st.sidebar.text_input("Influence index (optional)", str(args.influence_index or ""),
                                 help="influence_index.safetensors from `wbc trust influence --model <this model>`")
    if not text.strip():
        return None
    try:
        load_index(text.strip(), model_path)
    except WbcError as exc:
        st.sidebar.warning(f"Influence index not used: {exc}")
        return None
    return text.strip()


def show_model(model: LoadedModel) -> None:
    """What the chosen model is, in the sidebar."""
    meta = model.predictor.meta
    st.sidebar.markdown(f"**{meta['arch']}**, {meta['img_size']} px input, classes: {', '.join(meta['classes'])}")
    accuracy = (meta.get("validation") or {}).get("accuracy")
    if accuracy is not None:
        st.sidebar.markdown(f"validation accuracy: **{accuracy:.1%}**")
    if model.predictor.calibration is None:
        st.sidebar.warning("This model file has no calibration: confidences are raw, and there are no prediction "
                           "sets and no out-of-distribution check. Add them with `wbc calibrate`.")
    if meta.get("credit"):
        st.sidebar.caption(meta["credit"])


def trust_warnings(prediction: Prediction) -> list[str]:
    """Plain-words warnings for a flagged answer (the flags come from the model's calibration)."""
    if prediction.flag == FLAG_OOD:
        return ["This image does not look like the white-cell images the model learned from "
                f"(out-of-distribution score {prediction.ood_score:.1f}). The answer may mean nothing: check that the "
                "picture shows one stained white blood cell, photographed like the training images."]
    if prediction.flag == FLAG_UNCERTAIN:
        members = prediction.prediction_set or []
        if len(members) > 1:
            return [f"The model is unsure: this cell could be {' or '.join(members)}. Have a person check it."]
        return ["The model is unsure: no class is likely enough for its usual reliability. Have a person check it."]
    return []


def show_analysis(item: Analysis, classes: Sequence[str]) -> None:
    """One upload: original and Grad-CAM side by side, the answer, its probabilities and any warning."""
    prediction = item.prediction
    with st.container(border=True):
        st.subheader(display_name(item.name), anchor=False)
        if prediction.prediction is None:
            reason = prediction.flag.removeprefix("unreadable: ")
            st.error(f"This file could not be read as an image: {reason}. "
                     "Upload a JPG, PNG, BMP or TIFF picture of one stained white blood cell.")
            return
        original, heatmap, answer = st.columns([1, 1, 1.3])
        original.image(item.original, caption="uploaded image", width="stretch")
        heatmap.image(item.overlay, caption="Grad-CAM: where the model looked (red = most)", width="stretch")
        with answer:
            st.markdown(f"Predicted class: **{prediction.prediction}**")
            calibrated = "calibrated" if prediction.prediction_set is not None else "not calibrated"
            st.markdown(f"Confidence: **{prediction.confidence:.1%}** ({calibrated})")
            if prediction.prediction_set is not None:
                members = ", ".join(prediction.prediction_set) or "no class"
                st.markdown(f"Prediction set: **{members}**", help=PREDICTION_SET_HELP)
            chart = pd.DataFrame({"class": list(classes), "probability": [prediction.probabilities[c] for c in classes]})
            st.bar_chart(chart, x="class", y="probability", horizontal=True, height=190, sort=False)
        for warning in trust_warnings(prediction):
            st.warning(warning)
        if item.supporting:
            st.markdown("Training images that most support this answer (influence):")
            for column, image in zip(st.columns(len(item.supporting)), item.supporting):
                column.image(np.asarray(read_image(Path(image["path"]), config.APP_DISPLAY_PX // 2)),
                             caption=f"{image['label']} · {Path(image['path']).name}")


def main() -> None:
    """The page: model picker, uploads, per-image results, batch table and CSV download."""
    st.set_page_config(page_title="wbc-trust", page_icon="🔬", layout="wide")
    args = _arguments()
    st.title("wbc-trust: white blood cell classifier")
    st.caption("Upload microscope images of single stained white blood cells. For each one you get the class, how far "
               "to trust it, and where the model looked. For research, not for diagnosis.")
    model_path = choose_model(args)
    try:
        model = load(str(model_path))
    except WbcError as exc:
        st.error(f"This model cannot be used: {exc}")
        st.stop()
    show_model(model)
    index_path = choose_index(args, str(model_path))
    uploads = st.file_uploader("Cell images (JPG, PNG, BMP, TIFF)", type=list(UPLOAD_TYPES), accept_multiple_files=True,
                               max_upload_size=config.APP_MAX_UPLOAD_MB)
    if not uploads:
        st.info("Drop one or many cell images above.")
        return
    if len(uploads) > config.APP_MAX_FILES:
        st.warning(f"{len(uploads)} files uploaded: only the first {config.APP_MAX_FILES} are analysed.")
        uploads = uploads[: config.APP_MAX_FILES]
    progress = st.progress(0.0, text="analysing…")
    analyses = []
    for i, upload in enumerate(uploads):
        analyses.append(cached_analysis(str(model_path), index_path, upload.name, upload.getvalue()))
        progress.progress((i + 1) / len(uploads), text=f"analysed {i + 1} of {len(uploads)}")
    progress.empty()
    classes = model.predictor.classes
    st.header("Batch summary", anchor=False)
    table = summary_table(analyses, classes)
    st.dataframe(table, hide_index=True)
    st.download_button("Download CSV", table.to_csv(index=False), file_name="wbc_predictions.csv", mime="text/csv",
                       on_click="ignore")
    for item in analyses:
        show_analysis(item, classes)


if __name__ == "__main__":
    # Streamlit executes this file as ``__main__``; run the page from the imported module instead, so that cached
    # results pickle as ``wbc_trust.app.Analysis`` (a class of ``__main__`` cannot be unpickled).
    from wbc_trust.app import main as page

    page()
