"""The web app: upload white-cell images and see, for each, the class, how far to trust it, and where the model looked;
or upload smear fields and review their white-cell count (every cell found, boxed, counted into a differential with
its intervals, shown in a gallery per class for a person to reclassify, the corrections downloadable as a labelled
folder that ``wbc adapt`` and ``wbc train`` read; the review's logic is ``corrections.py``).

Start it with ``streamlit run app_streamlit.py`` or ``wbc app`` (see ``serve.py``). Streamlit re-runs this script top
to bottom on every interaction, so everything slow is cached: the model once per model file (``st.cache_resource``),
each image's analysis once per (model, file content) (``st.cache_data``).

Corrections are the page's own widget state (one select box per cell, keyed by the field's content hash and the
cell's number), read back into a ``corrections.Review`` at the top of every re-run, before anything is drawn.

Safety (the Docker image listens on every interface, so any visitor of the page is a user):

- uploaded images stay in memory; an upload's file name is only ever shown (escaped), never used as a path;
- the only files the app writes are uploaded model files (``ModelUploads``): at most ``config.APP_MAX_MODEL_UPLOADS`` of
  them, each at most ``config.APP_MAX_MODEL_UPLOAD_MB``, named after their content hash, in a private temporary folder
  that is removed when the server stops; a file that is not a usable model is removed at once;
- the server's own files are reached only through what its operator passed at start (``--model``, ``--models-dir``,
  ``--influence-index``); folders and index paths typed into the browser only with ``--allow-server-paths``.
"""

from __future__ import annotations

import argparse
import hashlib
import html
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
from wbc_trust.calibration import FLAG_NEW_LAB, FLAG_NOT_WBC, FLAG_OOD, FLAG_UNCERTAIN
from wbc_trust.corrections import NOT_WBC, NOT_WBC_FOLDER, ZIP_ROOT, CountedField, Review, count_field
from wbc_trust.count import CLASS_COLOURS
from wbc_trust.data import read_image
from wbc_trust.errors import WbcError
from wbc_trust.finder import CellFinder
from wbc_trust.io import atomic_write
from wbc_trust.models import WbcClassifier
from wbc_trust.predict import Prediction, Predictor
from wbc_trust.trust.gradcam import gradcam_overlay
from wbc_trust.trust.influence import InfluenceIndex, influential_training_images

UPLOAD_TYPES: tuple[str, ...] = ("jpg", "jpeg", "png", "bmp", "tif", "tiff")
DEFAULT_CHOICE, FOLDER_CHOICE, UPLOAD_CHOICE = "shipped default", "a file in a folder", "upload a model file"
CELLS_MODE, FIELDS_MODE = "Classify single cells", "Count smear fields"
#: A flagged cell's first choice: left as the model flagged it, counted apart.
UNREVIEWED = "flagged: not counted"
GALLERY_COLUMNS = 6  # crops per gallery row
FIELD_COLUMNS = 2  # fields per row
PREDICTION_SET_HELP = (
    "The classes the calibration cannot rule out: the true class is in this set for the chosen "
    "share of images of every class (99 % by default). One class = a confident answer."
)


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
        supporting = (
            []
            if index is None
            else influential_training_images(predictor.model, tensor, index, k=config.APP_SUPPORTING_IMAGES)["helpful"]
        )
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


class ModelUploads:
    """The model files visitors uploaded to this server process, kept in bounds.

    They live in a private temporary folder (mode 0700) that is removed when this object goes (the server stops, or
    Streamlit drops its cache); each is named after its content hash, never its uploaded name; there are at most
    ``max_files`` of them (the least recently uploaded go first: a model already loaded stays usable from memory) and
    none larger than ``max_mb``.
    """

    def __init__(
        self, max_files: int = config.APP_MAX_MODEL_UPLOADS, max_mb: int = config.APP_MAX_MODEL_UPLOAD_MB
    ) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="wbc-trust-models-")
        self.folder = Path(self._folder.name)
        self.max_files, self.max_mb = max_files, max_mb
        self._lock = threading.Lock()  # sessions run in threads: one upload at a time counts and evicts

    def save(self, data: bytes) -> Path:
        """Store one uploaded model file and return its path; refuses one larger than ``max_mb``."""
        if len(data) > self.max_mb * 2**20:
            raise WbcError(
                f"the model file is larger than {self.max_mb} MB: use a smaller model, or start the app "
                "with --model on the server"
            )
        path = self.folder / f"{hashlib.sha256(data).hexdigest()[:32]}.safetensors"
        with self._lock:
            if path.exists():
                path.touch()  # uploaded again: the most recent one now
            else:
                atomic_write(path, lambda f: f.write(data))
            for old in self.files()[: -self.max_files]:
                old.unlink(missing_ok=True)
        return path

    def files(self) -> list[Path]:
        """The stored uploads, least recently uploaded first."""
        return sorted(self.folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)

    def discard(self, path: Path) -> None:
        """Remove an upload that turned out not to be a usable model."""
        if path.parent == self.folder:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the folder and every upload in it now."""
        self._folder.cleanup()


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


@st.cache_resource(show_spinner=False)
def model_uploads() -> ModelUploads:
    """The uploaded model files of this server process (one store for all sessions)."""
    return ModelUploads()


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


@st.cache_resource(show_spinner="loading the cell finder…")
def load_finder() -> CellFinder:
    """Load the cell finder once for all sessions."""
    return CellFinder()


@st.cache_data(max_entries=512, show_spinner=False)
def cached_field(model_path: str, name: str, data: bytes) -> CountedField:
    """``corrections.count_field`` once per model and file content."""
    model = load(model_path)
    with model.lock:
        return count_field(name, data, load_finder(), model.predictor)


def _arguments() -> argparse.Namespace:
    """Options after ``--`` on the ``streamlit run`` line (``wbc app`` fills them in)."""
    parser = argparse.ArgumentParser(prog="app_streamlit.py")
    parser.add_argument("--model", type=Path, default=None, help="the model selected at start")
    parser.add_argument("--models-dir", type=Path, default=None, help="a server folder whose model files are offered")
    parser.add_argument("--influence-index", type=Path, default=None, help="`wbc trust influence`'s index file")
    parser.add_argument(
        "--allow-server-paths",
        action="store_true",
        help="let visitors type server folders and index paths (only for a trusted network)",
    )
    return parser.parse_known_args(sys.argv[1:])[0]


def choose_model(args: argparse.Namespace) -> Path:
    """The sidebar's model picker: the default, an uploaded model file, or a model file in a server folder: the one
    ``--models-dir`` names, or (only with ``--allow-server-paths``) any folder the visitor types."""
    st.sidebar.header("Model", anchor=False)
    default = args.model or config.DEFAULT_MODEL_PATH
    folders = args.allow_server_paths or args.models_dir is not None
    choices = [DEFAULT_CHOICE, FOLDER_CHOICE, UPLOAD_CHOICE] if folders else [DEFAULT_CHOICE, UPLOAD_CHOICE]
    choice = st.sidebar.radio("Which model", choices, label_visibility="collapsed")
    if choice == FOLDER_CHOICE:
        folder = args.models_dir or Path.cwd()
        if args.allow_server_paths:
            folder = Path(st.sidebar.text_input("Folder", str(folder))).expanduser()
        files = model_files(folder)
        if not files:
            st.sidebar.warning("No .safetensors model files in that folder or its sub-folders: using the default.")
            return default
        picked = st.sidebar.selectbox("Model file", files, format_func=lambda p: str(p.relative_to(folder)))
        return Path(picked)
    if choice == UPLOAD_CHOICE:
        upload = st.sidebar.file_uploader(
            "Model file (.safetensors from `wbc train`)",
            type=["safetensors"],
            max_upload_size=config.APP_MAX_MODEL_UPLOAD_MB,
        )
        if upload is None:
            return default
        try:
            return model_uploads().save(upload.getvalue())
        except WbcError as exc:
            st.sidebar.warning(f"Model file not used: {exc}")
    return default


def choose_index(args: argparse.Namespace, model_path: str) -> str | None:
    """The sidebar's optional influence index (``wbc trust influence`` writes one): it adds the training images
    that most support each answer. None when not given or not usable with this model. Visitors may type an index
    path only with ``--allow-server-paths``; otherwise the one given at start is used."""
    if not args.allow_server_paths:
        if args.influence_index is None:
            return None
        text = str(args.influence_index)
    else:
        st.sidebar.header("Training images", anchor=False)
        text = st.sidebar.text_input(
            "Influence index (optional)",
            str(args.influence_index or ""),
            help="influence_index.safetensors from `wbc trust influence --model <this model>`",
        )
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
    accuracy = (meta.get("validation") or {}).get("val_accuracy")  # written by `wbc train`
    if accuracy is not None:
        st.sidebar.markdown(f"validation accuracy: **{accuracy:.2%}**")
    if model.predictor.calibration is None:
        st.sidebar.warning(
            "This model file has no calibration: confidences are raw, and there are no prediction "
            "sets and no out-of-distribution check. Add them with `wbc calibrate`."
        )
    if meta.get("credit"):
        st.sidebar.caption(meta["credit"])


def trust_warnings(prediction: Prediction) -> list[str]:
    """Plain-words warnings for a flagged answer (the flags come from the model's calibration)."""
    if prediction.flag == FLAG_NEW_LAB:
        return [
            "This looks like a white cell photographed in another lab (other stain, microscope or camera) than "
            "the images the model learned from: its answer and confidence are not reliable there. Adapt the model "
            "to that lab with `wbc adapt` (docs/another-lab.md)."
        ]
    if prediction.flag in (FLAG_OOD, FLAG_NOT_WBC):
        return [
            "This image does not look like the white-cell images the model learned from "
            f"(out-of-distribution score {prediction.ood_score:.1f}). The answer may mean nothing: check that the "
            "picture shows one stained white blood cell, photographed like the training images."
        ]
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
            st.error(
                f"This file could not be read as an image: {reason}. "
                "Upload a JPG, PNG, BMP or TIFF picture of one stained white blood cell."
            )
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
            chart = pd.DataFrame(
                {"class": list(classes), "probability": [prediction.probabilities[c] for c in classes]}
            )
            st.bar_chart(chart, x="class", y="probability", horizontal=True, height=190, sort=False)
        for warning in trust_warnings(prediction):
            st.warning(warning)
        if item.supporting:
            st.markdown("Training images that most support this answer (influence):")
            for column, image in zip(st.columns(len(item.supporting)), item.supporting):
                column.image(
                    np.asarray(read_image(Path(image["path"]), config.APP_DISPLAY_PX // 2)),
                    caption=f"{image['label']} · {Path(image['path']).name}",
                )


def show_cells(model: LoadedModel, model_path: Path, index_path: str | None) -> None:
    """Single-cell mode: uploads, per-image results, batch table and CSV download."""
    uploads = st.file_uploader(
        "Cell images (JPG, PNG, BMP, TIFF)",
        type=list(UPLOAD_TYPES),
        accept_multiple_files=True,
        max_upload_size=config.APP_MAX_UPLOAD_MB,
    )
    if not uploads:
        st.info("Drop one or many cell images above.")
        return
    uploads = _capped(uploads)
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
    st.download_button(
        "Download CSV", table.to_csv(index=False), file_name="wbc_predictions.csv", mime="text/csv", on_click="ignore"
    )
    for item in analyses:
        show_analysis(item, classes)


def _capped(uploads: list) -> list:
    if len(uploads) > config.APP_MAX_FILES:
        st.warning(f"{len(uploads)} files uploaded: only the first {config.APP_MAX_FILES} are analysed.")
        return uploads[: config.APP_MAX_FILES]
    return uploads


def _choice_key(counted: CountedField, row: dict) -> str:
    """The select box of one cell: the field's content hash and the cell's number."""
    return f"fix-{counted.key}-{row['cell']}"


def _default_choice(row: dict) -> str:
    return UNREVIEWED if row["flag"] else row["prediction"]


def read_corrections(review: Review) -> None:
    """A person's choices in the cells' select boxes (this session's widget state) into ``review``: a choice other
    than the box's default is a correction (one left from a model with other classes is not)."""
    for counted in review.fields:
        for row in counted.count.rows:
            choice = st.session_state.get(_choice_key(counted, row))
            fixed = choice if choice in review.choices and choice != _default_choice(row) else None
            review.correct(counted.key, int(row["cell"]), fixed)


def differential_table(review: Review) -> pd.DataFrame:
    """The differential after the review, formatted for the page (no number where there is none: an empty count's
    interval, the flagged row's)."""

    def number(value: float | None) -> str:
        return "" if value is None or np.isnan(value) else f"{value:.1f}"

    return pd.DataFrame(
        [
            {
                "class": r["class"],
                "count": r["count"],
                "%": number(r["percent"]),
                "95 % interval": number(r["ci_low"]) and f"{number(r['ci_low'])}–{number(r['ci_high'])}",
            }
            for r in review.differential()
        ]
    )


def show_differential(review: Review) -> None:
    """The differential over all uploaded fields, with the downloads."""
    table = review.differential()
    counted = sum(r["count"] for r in table[:-1])
    st.header("Differential", anchor=False)
    st.markdown(
        f"**{counted}** white cells counted in {len(review.fields)} field(s); **{table[-1]['count']}** flagged and "
        f"counted apart (classify them in the gallery to count them); **{review.n_not_wbc()}** marked not a white "
        "cell. Intervals: 95 % Wilson score (the binomial intervals of the Rümke table)."
    )
    st.table(differential_table(review).set_index("class"))
    zip_column, csv_column = st.columns(2)
    zip_column.download_button(
        "Download corrections (zip)",
        review.zip_bytes(),
        file_name=f"{ZIP_ROOT}.zip",
        mime="application/zip",
        on_click="ignore",
        help=f"Unzip it and train on it: `wbc adapt --data {ZIP_ROOT}` (or `wbc train --data {ZIP_ROOT}`). One "
        f"folder per class of the crops the model saw; cells marked not a white cell in {NOT_WBC_FOLDER}/ (left out "
        "of training); flagged cells nobody classified are left out; cells.csv lists every cell.",
    )
    csv_column.download_button(
        "Download cells CSV (original and corrected class)",
        review.csv_text(),
        file_name="wbc_corrections.csv",
        mime="text/csv",
        on_click="ignore",
    )


def show_field(review: Review, counted: CountedField, data: bytes) -> None:
    """One uploaded field with its boxes after the review, or why it has none."""
    with st.container(border=True):
        st.markdown(f"**{display_name(counted.name)}**")
        if counted.flag.startswith("unreadable"):
            st.error(
                f"This file could not be read as an image: {counted.flag.removeprefix('unreadable: ')}. "
                "Upload a JPG, PNG, BMP or TIFF picture of a stained blood smear."
            )
            return
        if counted.flag:
            st.warning(counted.flag)
        st.image(
            review.picture(counted, read_image(data)),
            caption=f"{len(counted.count.cells)} white cell(s) found",
            width="stretch",
        )


def colour_legend(classes: Sequence[str]) -> str:
    """The box colours (``count.CLASS_COLOURS``) as one line of HTML; class names escaped (an uploaded model file
    names its classes)."""
    swatches = ", ".join(
        f"<span style='color:{CLASS_COLOURS.get(c, '#000000')}'>■ {html.escape(c)}</span>" for c in classes
    )
    return f"Box colours: {swatches}, ■ {html.escape(NOT_WBC)}; dashed boxes marked ? are flagged."


def show_gallery(review: Review) -> None:
    """The cells as the model sorted them, one gallery per class and one of the flagged cells, each with a select
    box to reclassify it or mark it not a white cell."""
    st.header("Gallery", anchor=False)
    st.caption(
        "Cells as the model sorted them. Pick another class to reclassify a cell; cells left as they are count as "
        "the model said, flagged cells only once a person picks their class."
    )
    galleries = review.galleries()
    empty = [group for group, members in galleries.items() if not members]
    for group, members in galleries.items():
        if not members:
            continue
        st.subheader(f"{group}: {len(members)}", anchor=False)
        for start in range(0, len(members), GALLERY_COLUMNS):
            for column, cell in zip(st.columns(GALLERY_COLUMNS), members[start : start + GALLERY_COLUMNS]):
                row = cell.row
                options = [UNREVIEWED, *review.choices] if row["flag"] else review.choices
                column.image(cell.png, caption=display_name(cell.field.name), width="stretch")
                column.selectbox(
                    f"cell {row['cell']} · {row['prediction']} {float(row['confidence']):.0%}",
                    options,
                    index=options.index(_default_choice(row)),
                    key=_choice_key(cell.field, row),
                    help=row["flag"] or None,
                )
    if empty:
        st.caption(f"No cells: {', '.join(empty)}.")


def show_fields(model: LoadedModel, model_path: Path) -> None:
    """Field mode: uploads, the differential over all of them, each field with its boxes, the galleries."""
    uploads = st.file_uploader(
        "Smear-field images (JPG, PNG, BMP, TIFF)",
        type=list(UPLOAD_TYPES),
        accept_multiple_files=True,
        max_upload_size=config.APP_MAX_UPLOAD_MB,
        key="field-uploads",
    )
    if not uploads:
        st.info("Drop one or many smear-field images above: every white cell in them is found, classified and counted.")
        return
    uploads = _capped(uploads)
    progress = st.progress(0.0, text="counting…")
    fields: list[tuple[CountedField, bytes]] = []
    for i, upload in enumerate(uploads):
        data = upload.getvalue()
        counted = cached_field(str(model_path), upload.name, data)
        if any(counted.key == other.key for other, _ in fields):
            st.warning(f"{display_name(upload.name)} is the same file as an earlier upload: counted once.")
        else:
            fields.append((counted, data))
        progress.progress((i + 1) / len(uploads), text=f"counted {i + 1} of {len(uploads)}")
    progress.empty()
    review = Review([counted for counted, _ in fields], model.predictor.classes)
    read_corrections(review)
    show_differential(review)
    st.header("Fields", anchor=False)
    st.markdown(colour_legend(review.classes), unsafe_allow_html=True)
    for start in range(0, len(fields), FIELD_COLUMNS):
        for column, (counted, data) in zip(st.columns(FIELD_COLUMNS), fields[start : start + FIELD_COLUMNS]):
            with column:
                show_field(review, counted, data)
    show_gallery(review)


def main() -> None:
    """The page: model picker, then single cells (class, trust, Grad-CAM) or smear fields (count and review)."""
    st.set_page_config(page_title="wbc-trust", page_icon="🔬", layout="wide")
    args = _arguments()
    st.title("wbc-trust: white blood cell classifier")
    st.caption(
        "Upload microscope images of single stained white blood cells: for each one you get the class, how far "
        "to trust it, and where the model looked. Or upload smear fields: every white cell is found, counted into a "
        "differential, and shown for you to confirm or reclassify. For research, not for diagnosis."
    )
    model_path = choose_model(args)
    try:
        model = load(str(model_path))
    except WbcError as exc:
        model_uploads().discard(model_path)  # an uploaded file that is no model does not stay on the server
        st.error(f"This model cannot be used: {exc}")
        st.stop()
    show_model(model)
    index_path = choose_index(args, str(model_path))
    mode = st.radio("Mode", [CELLS_MODE, FIELDS_MODE], horizontal=True, label_visibility="collapsed")
    if mode == FIELDS_MODE:
        show_fields(model, model_path)
    else:
        show_cells(model, model_path, index_path)


if __name__ == "__main__":
    # Streamlit executes this file as ``__main__``; run the page from the imported module instead, so that cached
    # results pickle as ``wbc_trust.app.Analysis`` (a class of ``__main__`` cannot be unpickled).
    from wbc_trust.app import main as page

    page()
