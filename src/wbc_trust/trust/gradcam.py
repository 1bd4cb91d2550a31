"""Grad-CAM: where in the image the model looked, from pytorch-grad-cam (GradCAM and GradCAM++), and two checks
that the maps mean something:

- faithfulness: ROAD (Rong et al. 2022, pytorch-grad-cam's metrics) removes the pixels a map calls most / least
  relevant and measures how the class probability changes; a map is only worth something if it beats a random map;
- the model-randomisation sanity check (Adebayo et al. 2018): the maps of a model with re-initialised weights must
  differ from the trained model's, or the map shows the image, not what the model learned.

The target layer is the model's last convolutional layer, found per architecture by ``WbcClassifier.feature_layer``.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.metrics.road import ROADCombined
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget
from scipy.stats import ConstantInputWarning, spearmanr
from torch.optim.swa_utils import update_bn
from tqdm import tqdm

from wbc_trust import config, plots
from wbc_trust.calibration import Calibration
from wbc_trust.data import to_unit
from wbc_trust.errors import WbcError
from wbc_trust.evaluate import LabelledImages, load_test_images
from wbc_trust.io import write_json
from wbc_trust.modelfile import load_model
from wbc_trust.models import WbcClassifier, predict_probs

#: The CAM methods a user may ask for, by name.
CAM_METHODS: dict[str, type[BaseCAM]] = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}


def cam_method(name: str) -> type[BaseCAM]:
    """The pytorch-grad-cam class for a method name (``gradcam`` or ``gradcam++``)."""
    try:
        return CAM_METHODS[name.lower()]
    except KeyError:
        raise WbcError(f"unknown Grad-CAM method {name!r}: choose one of {', '.join(CAM_METHODS)}") from None


def compute_cams(
    model: WbcClassifier, images: torch.Tensor, targets: list[int] | None = None, method: str = "gradcam++"
) -> np.ndarray:
    """Heat maps (N×S×S, each scaled to [0, 1]) for uint8 images N×3×S×S; ``targets`` None = the predicted class."""
    x = to_unit(images)
    cam_targets = [ClassifierOutputTarget(int(t)) for t in targets] if targets is not None else None
    with cam_method(method)(model=model, target_layers=[model.feature_layer()]) as cam:
        return cam(input_tensor=x, targets=cam_targets)


def overlay(image: torch.Tensor, heatmap: np.ndarray) -> np.ndarray:
    """The heat map (jet colours) blended over a uint8 3×S×S image → uint8 S×S×3."""
    rgb = image.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
    return show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=0.6)


def gradcam_overlay(
    model: WbcClassifier, image: torch.Tensor, target: int | None = None, method: str = "gradcam"
) -> tuple[np.ndarray, np.ndarray]:
    """One image's heat map (float S×S in [0, 1]) and its overlay (uint8 S×S×3); ``target`` None = predicted class.

    Plain Grad-CAM by default: on the default model it passes the model-randomisation check (maps of a re-initialised
    model differ, Spearman 0.20) while Grad-CAM++ does not (0.78: its maps show the cell more than the model);
    ``python bench/trust_methods.py --max-images 200``.

    The app calls this for every uploaded image, so it runs one forward and one backward pass and nothing else.
    """
    heatmap = compute_cams(model, image.unsqueeze(0), None if target is None else [target], method)[0]
    return heatmap, overlay(image, heatmap)


def target_layer_name(model: WbcClassifier) -> str:
    """The dotted name of the Grad-CAM target layer, for the record in gradcam.json."""
    layer = model.feature_layer()
    return next(name for name, module in model.named_modules() if module is layer)


def randomised_copy(model: WbcClassifier, images: torch.Tensor, seed: int = config.SEED) -> WbcClassifier:
    """The same architecture with every layer re-initialised (Adebayo et al.'s full model randomisation).

    Re-initialising batch-norm layers sets their running statistics to mean 0 / variance 1, which makes a deep
    random network's activations vanish (all images then give the same logits); so the statistics are re-estimated
    on ``images`` (uint8) with torch's ``update_bn``, giving a random network with healthy activations.
    """
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in clone.modules():
            if next(module.parameters(recurse=False), None) is not None:  # every layer with weights of its own
                module.reset_parameters()
        # update_bn runs the network in train mode, where dropout draws random masks: seeded too, so that the check
        # gives the same numbers on every run
        update_bn([to_unit(images)], clone)
    return clone.eval()


def rank_correlations(maps_a: np.ndarray, maps_b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation between paired heat maps (0 where a map is constant, i.e. shows nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)  # handled: a constant map correlates with nothing
        rhos = [spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(maps_a, maps_b)]
    return np.nan_to_num(np.array(rhos, dtype=float), nan=0.0)


def road_scores(model: WbcClassifier, images: torch.Tensor, maps: np.ndarray, targets: list[int]) -> np.ndarray:
    """ROAD-combined score per image: mean over ``config.ROAD_PERCENTILES`` of (probability drop when the least
    relevant pixels are removed − drop when the most relevant are), halved; higher = more faithful."""
    with torch.random.fork_rng(devices=[]):  # ROAD's imputation adds noise: same numbers every run
        torch.manual_seed(config.SEED)
        metric = ROADCombined(percentiles=list(config.ROAD_PERCENTILES))
        return metric(to_unit(images), maps, [ClassifierOutputSoftmaxTarget(t) for t in targets], model)


def sanity_checks(model: WbcClassifier, test: LabelledImages, predictions: np.ndarray) -> dict:
    """Faithfulness (ROAD) of Grad-CAM and Grad-CAM++ against random maps, and the model-randomisation check, on the
    ``config.GRADCAM_CHECK_IMAGES`` images of all classes (ROAD solves a sparse system per image and percentile: slow)."""
    chosen = interleave_classes(np.arange(len(test.labels)), test.labels)[: config.GRADCAM_CHECK_IMAGES]
    images, targets = test.images[torch.as_tensor(chosen)], [int(predictions[i]) for i in chosen]
    rng = np.random.default_rng(config.SEED)
    maps = {method: compute_cams(model, images, targets, method) for method in CAM_METHODS}
    maps["random map (baseline)"] = rng.random(maps["gradcam"].shape, dtype=np.float32)
    faithfulness = {}
    for name, heatmaps in tqdm(maps.items(), desc="ROAD faithfulness", unit="method"):
        scores = road_scores(model, images, heatmaps, targets)
        faithfulness[name] = {"mean": float(scores.mean()), "std": float(scores.std())}
    random_model = randomised_copy(model, images)
    randomisation = {}
    for method in CAM_METHODS:
        rhos = rank_correlations(maps[method], compute_cams(random_model, images, targets, method))
        randomisation[method] = {
            "spearman_mean": float(rhos.mean()),
            "spearman_median": float(np.median(rhos)),
            "passes": bool(rhos.mean() < config.RANDOMISATION_MAX_SPEARMAN),
        }
    baseline = faithfulness["random map (baseline)"]["mean"]
    return {
        "n_check_images": len(chosen),
        "faithfulness": {
            "metric": f"ROAD combined (Rong et al. 2022), percentiles {list(config.ROAD_PERCENTILES)}, target = "
            "softmax probability of the predicted class; higher = more faithful",
            "scores": faithfulness,
            "beats_random_map": {m: faithfulness[m]["mean"] > baseline for m in CAM_METHODS},
        },
        "model_randomisation": {
            "test": "Adebayo et al. 2018: all weights re-initialised; Spearman rank correlation of each image's map "
            "with the trained model's map (same target class)",
            "pass_if_mean_below": config.RANDOMISATION_MAX_SPEARMAN,
            "methods": randomisation,
        },
    }


def interleave_classes(indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``indices`` reordered class by class in turn (1st of each class, then 2nd of each, ...), so that any prefix
    shows every class."""
    rank_in_class = np.zeros(len(indices), dtype=int)
    for c in np.unique(labels[indices]):
        in_class = labels[indices] == c
        rank_in_class[in_class] = np.arange(in_class.sum())
    return indices[np.lexsort((labels[indices], rank_in_class))]


def gallery_picks(test: LabelledImages, predictions: np.ndarray, confidence: np.ndarray) -> tuple[list[int], list[int]]:
    """Correct examples of every class in turn, and wrong ones most confident first (the worrying mistakes)."""
    correct = interleave_classes(np.flatnonzero(predictions == test.labels), test.labels)
    wrong = np.flatnonzero(predictions != test.labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    return [int(i) for i in correct[: config.GRADCAM_GALLERY]], [int(i) for i in wrong[: config.GRADCAM_GALLERY]]


def write_gallery(
    model: WbcClassifier,
    test: LabelledImages,
    picks: list[int],
    predictions: np.ndarray,
    confidence: np.ndarray,
    classes: list[str],
    path: Path,
    title: str,
) -> None:
    """Per image three panels: the image (caption: true class, prediction, confidence), Grad-CAM, Grad-CAM++."""
    images, captions = [], []
    if picks:
        index = torch.as_tensor(picks)
        targets = [int(predictions[i]) for i in picks]
        overlays = {m: compute_cams(model, test.images[index], targets, m) for m in CAM_METHODS}
        for row, i in enumerate(picks):
            image = test.images[i]
            images += [image.permute(1, 2, 0).numpy(), *(overlay(image, overlays[m][row]) for m in CAM_METHODS)]
            captions += [
                f"true {classes[test.labels[i]]}\npredicted {classes[predictions[i]]} ({confidence[i]:.0%})",
                "Grad-CAM",
                "Grad-CAM++",
            ]
    plots.image_gallery(images, captions, path, columns=6, title=title)


def run_gradcam(model_path: Path | None, data: Path, out: Path, max_images: int | None = None) -> dict:
    """Grad-CAM galleries of correct and wrong predictions (``gradcam_correct.png``, ``gradcam_wrong.png``) and the
    faithfulness and randomisation checks (``gradcam.json``) on the labelled folder ``data``."""
    out = Path(out)
    model, meta = load_model(model_path)
    classes = meta["classes"]
    test = load_test_images(meta, data, max_images)
    print(test.description)
    probs = predict_probs(model, test.images, temperature=Calibration.temperature_of(meta)).numpy()
    predictions, confidence = probs.argmax(1), probs.max(1)
    correct, wrong = gallery_picks(test, predictions, confidence)
    n_wrong = int((predictions != test.labels).sum())
    write_gallery(
        model,
        test,
        correct,
        predictions,
        confidence,
        classes,
        out / "gradcam_correct.png",
        "Correct predictions: where the model looked (map of the predicted class)",
    )
    write_gallery(
        model,
        test,
        wrong,
        predictions,
        confidence,
        classes,
        out / "gradcam_wrong.png",
        f"Wrong predictions, most confident first ({n_wrong} of {len(predictions)})"
        if n_wrong
        else f"No wrong predictions among {len(predictions)} images",
    )
    summary = {
        "model": str(model_path) if model_path else "default",
        "arch": meta["arch"],
        "target_layer": target_layer_name(model),
        "methods": {"gradcam": "GradCAM (Selvaraju et al. 2017)", "gradcam++": "GradCAM++ (Chattopadhyay et al. 2018)"},
        "data": test.description,
        "n_images": len(predictions),
        "accuracy": float((predictions == test.labels).mean()),
        "n_wrong": n_wrong,
        **sanity_checks(model, test, predictions),
    }
    write_json(out / "gradcam.json", summary)
    return summary
