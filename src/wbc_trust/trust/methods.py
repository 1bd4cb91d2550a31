"""The list of trust methods: one ``TrustMethod`` per method, in ``TRUST_METHODS``. It drives both the ``wbc trust``
commands (``trust/cli.py`` registers one command per entry) and the report (``trust/report.py`` runs every entry).

Adding a trust method = its module with one run function, plus one entry here. A run function is called as
``run(model, data=..., out=..., <inputs>...)``: the model file (None = the shipped model; a list of them for a method
with ``many_models``), then the output folder and the inputs the entry names, by keyword; it writes its files into
``out`` and returns a JSON-able summary. The inputs' names, types and option help are in ``INPUTS``.

This module imports no method: each run function is imported when its method runs, so ``wbc --help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from wbc_trust.errors import WbcError


@dataclass(frozen=True)
class Input:
    """Something a trust method takes besides the model and the output folder; also its ``--name`` option."""

    type: type  # Path or int
    help: str
    required: bool = False
    data: str | None = None  # which data the folder holds ("test", "training", "ood"), for folders


#: Every input a trust method may take, by the keyword its run function receives.
INPUTS: dict[str, Input] = {
    "data": Input(
        Path,
        "labelled images (the model's held-out test split if it is its own training folder)",
        required=True,
        data="test",
    ),
    "train_data": Input(Path, "the labelled folder the model was trained on", required=True, data="training"),
    "ood_data": Input(Path, "images that are not white cells: adds the OOD AUROC and ood_scores.png", data="ood"),
    "max_images": Input(int, "use a stratified subset of at most this many images"),
    "max_train": Input(int, "use at most this many training images"),
    "max_test": Input(int, "explain at most this many test images"),
}


@dataclass(frozen=True)
class TrustMethod:
    """One trust method: what the command and the report need to know about it."""

    name: str  # the command: ``wbc trust NAME``
    title: str  # the report's section heading
    what: str  # the report's one or two sentences: what it measures and how to read it
    help: str  # the command's help
    run: str  # "module:function", imported when the method runs
    inputs: tuple[str, ...]  # keys of INPUTS, passed to the run function by keyword
    files: tuple[str, ...]  # what it writes into the output folder
    command: bool = True  # False: in the report only (the audit has its own top-level command, ``wbc audit``)
    many_models: bool = False  # the run function takes a list of models (``--model`` may repeat)
    table: str | None = None  # summary key of a list of rows the command prints as a table instead of JSON
    table_title: str = ""
    hide: tuple[str, ...] = ()  # summary keys the command leaves out of the printed JSON (long lists)

    def __post_init__(self) -> None:
        unknown = set(self.inputs) - set(INPUTS)
        if unknown:
            raise ValueError(f"trust method {self.name!r} names unknown inputs {sorted(unknown)}: add them to INPUTS")

    @property
    def needs(self) -> tuple[str, ...]:
        """The data the method cannot run without ("test", "training"): the required folder inputs."""
        return tuple(INPUTS[name].data for name in self.inputs if INPUTS[name].required and INPUTS[name].data)

    def function(self) -> Callable[..., dict]:
        """The run function (imported now)."""
        module, name = self.run.split(":")
        return getattr(importlib.import_module(module), name)

    def missing(self, values: Mapping[str, object]) -> list[str]:
        """The required inputs that ``values`` lacks, as ``--option`` names."""
        return [
            "--" + name.replace("_", "-") for name in self.inputs if INPUTS[name].required and values.get(name) is None
        ]

    def __call__(self, model: Path | None | list[Path | None], out: Path, values: Mapping[str, object]) -> dict:
        """Run the method on ``model`` with the inputs it takes from ``values`` (other keys are ignored)."""
        if missing := self.missing(values):
            raise WbcError(f"{self.name} needs {', '.join(missing)}")
        if self.many_models and not isinstance(model, list):
            model = [model]
        return self.function()(model, out=Path(out), **{name: values.get(name) for name in self.inputs})


def run_audit_of_training_data(model: Path | None, out: Path, train_data: Path) -> dict:
    """The data audit as a trust method: it looks at the training folder, not at the model."""
    from wbc_trust.trust.audit import run_audit

    return run_audit(train_data, out)


#: Every trust method, in the report's order.
TRUST_METHODS: tuple[TrustMethod, ...] = (
    TrustMethod(
        "audit",
        "Data-quality audit",
        "Unreadable files, exact and near duplicates (with conflicting labels), class balance of the training data.",
        "Check the training folder: unreadable files, duplicates, near-duplicates, balance.",
        "wbc_trust.trust.methods:run_audit_of_training_data",
        ("train_data",),
        ("audit.json", "class_balance.png"),
        command=False,
    ),
    TrustMethod(
        "calibration",
        "Calibration, prediction sets, out-of-distribution",
        "Does a confidence of 90 % mean right 9 times in 10 (ECE, reliability diagram)? Do the prediction sets hold "
        "the true class as often as promised?",
        "ECE before/after temperature scaling, prediction-set coverage and size, out-of-distribution flags.",
        "wbc_trust.trust.calibration:run_calibration",
        ("data", "ood_data"),
        ("calibration.json", "reliability_diagram.png", "set_sizes.png", "ood_scores.png"),
    ),
    TrustMethod(
        "robustness",
        "Robustness",
        "Accuracy as the images get worse (severity 0 = clean … 5) and under FGSM/PGD attacks whose budget ε is in "
        "grey levels of 255.",
        "Accuracy under noise, blur, brightness, contrast, JPEG and stain shift (severities 1-5) and FGSM/PGD attacks.",
        "wbc_trust.trust.robustness:run_robustness",
        ("data", "max_images"),
        ("robustness.json", "robustness_accuracy.png", "robustness_examples.png"),
        many_models=True,
        table="comparison",
        table_title="accuracy: clean, mean over corruptions and severities, under attack (ε in grey levels)",
    ),
    TrustMethod(
        "gradcam",
        "Grad-CAM",
        "Where the model looked (map of the predicted class). Faithfulness: ROAD score against a random map. Sanity: "
        "the maps of a randomised model must differ (low Spearman correlation).",
        "Grad-CAM / Grad-CAM++ galleries of right and wrong answers, ROAD faithfulness, randomisation sanity check.",
        "wbc_trust.trust.gradcam:run_gradcam",
        ("data", "max_images"),
        ("gradcam_correct.png", "gradcam_wrong.png", "gradcam.json"),
    ),
    TrustMethod(
        "fisher",
        "Fisher sensitivity",
        "Per image: ‖softmax − onehot‖², the squared EL2N score of Paul et al. 2021, and the per-sample gradient "
        "norm²; their mean is the empirical Fisher trace. AUROC: how well each score picks out the wrong predictions.",
        "Per-image sensitivity: ‖softmax − onehot‖² (squared EL2N) and the per-sample gradient norm².",
        "wbc_trust.trust.fisher:run_fisher",
        ("data", "max_images"),
        ("fisher.csv", "fisher.json", "fisher_scores.png", "fisher_top.png"),
    ),
    TrustMethod(
        "influence",
        "Influence",
        "Which training images helped or hurt each test answer; training images ranked by self-influence (likely "
        "mislabelled first).",
        "Rank training images by TracIn self-influence (likely mislabelled first) and list, per test image, the "
        "training images that helped and hurt it most.",
        "wbc_trust.trust.influence:run_influence",
        ("train_data", "data", "max_train", "max_test"),
        (
            "train_influence.csv",
            "test_influence.json",
            "influence_curve.png",
            "influence_harmful.png",
            "influence_index.safetensors",
        ),
        hide=("most_harmful",),
    ),
)
