"""Robustness: accuracy as the images get worse (noise, blur, brightness, contrast, JPEG, stain shift; severities 1-5)
and under FGSM / PGD attacks of growing budget, for one model or several side by side.

Corruptions come from torchvision's functional transforms, attacks from captum.robust; the parameters per severity
are in ``config.CORRUPTIONS`` (after MedMNIST-C's BloodMNIST set). Inputs are RGB in [0, 1]; normalisation is inside
the model, so an attack budget ε is in the units a microscope camera produces (ε = 1/255 is one grey level).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from captum.robust import FGSM, PGD
from torch import nn
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from wbc_trust import config, plots
from wbc_trust.data import jpeg_round_trip, to_unit
from wbc_trust.evaluate import LabelledImages, load_test_images
from wbc_trust.io import write_json
from wbc_trust.modelfile import load_model
from wbc_trust.models import WbcClassifier, predict_probs, prepare_for_cpu

_BATCH = 128
_ATTACK_BATCH = 64


def _gaussian_noise(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):  # the same noise every run, without touching the caller's random state
        torch.manual_seed(seed)
        return F.gaussian_noise(x, sigma=sigma, clip=True)


def _gaussian_blur(x: torch.Tensor, sigma_at_128: float, seed: int) -> torch.Tensor:
    sigma = sigma_at_128 * x.shape[-1] / 128
    kernel = 2 * math.ceil(3 * sigma) + 1
    return F.gaussian_blur(x, [kernel, kernel], [sigma, sigma])


def _jpeg(x: torch.Tensor, quality: float, seed: int) -> torch.Tensor:
    as_bytes = (x * 255).round().to(torch.uint8).cpu()  # Pillow encodes on the CPU, wherever the model runs
    compressed = [F.pil_to_tensor(jpeg_round_trip(F.to_pil_image(image), int(quality))) for image in as_bytes]
    return to_unit(torch.stack(compressed)).to(x.device)


def _stain_shift(x: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
    """Scale the stain's optical density per colour channel, as a differently stained smear would look.

    Written by hand: torchvision has no stain model, and the stain augmentations of histology libraries assume
    H&E stains; MedMNIST-C's own needs ImageMagick. By Beer-Lambert, optical density OD = -ln(I), so scaling OD of
    channel c by (1 + s·d_c) is I ** (1 + s·d_c): more dye darkens, and the direction d tints (config).
    """
    direction = torch.tensor(config.STAIN_SHIFT_DIRECTION, dtype=x.dtype).view(1, 3, 1, 1)
    return x.clamp_min(1 / 255) ** (1 + strength * direction)


#: name → function(images in [0, 1], parameter, seed) → corrupted images in [0, 1]
CORRUPTION_FUNCTIONS: dict[str, Callable[[torch.Tensor, float, int], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "gaussian_blur": _gaussian_blur,
    "brightness_up": lambda x, factor, seed: F.adjust_brightness(x, factor),
    "brightness_down": lambda x, factor, seed: F.adjust_brightness(x, factor),
    "contrast_up": lambda x, factor, seed: F.adjust_contrast(x, factor),
    "contrast_down": lambda x, factor, seed: F.adjust_contrast(x, factor),
    "jpeg": _jpeg,
    "stain_shift": _stain_shift,
}


def corrupt(images: torch.Tensor, name: str | None, severity: int, seed: int = config.SEED) -> torch.Tensor:
    """uint8 images N×3×S×S → float images in [0, 1] with corruption ``name`` at ``severity`` (1-5); name None or
    severity 0 = unchanged."""
    x = to_unit(images)
    if name is None or severity == 0:
        return x
    return CORRUPTION_FUNCTIONS[name](x, config.CORRUPTIONS[name][severity - 1], seed)


def corrupted_accuracy(
    model: nn.Module, images: torch.Tensor, labels: np.ndarray, name: str | None, severity: int
) -> float:
    """Accuracy on the images with one corruption applied (in batches, so memory stays small)."""
    correct = 0
    for start in range(0, len(images), _BATCH):
        x = corrupt(images[start : start + _BATCH], name, severity, seed=config.SEED + start)
        correct += int((predict_probs(model, x).argmax(1).numpy() == labels[start : start + _BATCH]).sum())
    return correct / len(images)


def attack_logits(model: WbcClassifier, x: torch.Tensor) -> torch.Tensor:
    """What the attacks differentiate: the prediction users get (``model.predict``, test-time views included), not
    one view of it. In fp32, not under bf16 autocast: bf16 keeps 8 bits of mantissa, so its rounding of an input
    near 1.0 (≈ 1/256) is the size of a one-grey-level perturbation, and the gradient the attack follows would be
    rounding noise. channels_last stays (the fast oneDNN layout, exact in fp32)."""
    return model.predict(x.contiguous(memory_format=torch.channels_last))[0].float()


def adversarial_images(
    model: WbcClassifier, x: torch.Tensor, labels: torch.Tensor, attack: str, epsilon: float, seed: int = config.SEED
) -> torch.Tensor:
    """Untargeted L∞ attack of float images ``x`` in [0, 1]: FGSM (one step of ε), or PGD (Madry et al. 2018) from a
    random start in the ε-ball, ``config.PGD_STEPS`` steps of 2.5·ε/steps; the result stays within ε of ``x`` and in
    [0, 1]. ``seed`` fixes PGD's random start (same numbers every run, the caller's random state untouched)."""
    loss = nn.CrossEntropyLoss(reduction="none")  # captum's default loss expects probabilities; the model gives logits
    attacker = (FGSM if attack == "fgsm" else PGD)(
        partial(attack_logits, model), loss_func=loss, lower_bound=0.0, upper_bound=1.0
    )
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # captum says it set requires_grad on the (copied) inputs: as it should
        warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
        torch.manual_seed(seed)
        if attack == "fgsm":
            return attacker.perturb(x, epsilon=epsilon, target=labels).detach()
        return attacker.perturb(
            x,
            radius=epsilon,
            step_size=2.5 * epsilon / config.PGD_STEPS,
            step_num=config.PGD_STEPS,
            target=labels,
            random_start=True,
        ).detach()


def adversarial_accuracy(
    model: WbcClassifier, images: torch.Tensor, labels: np.ndarray, attack: str, epsilon: float
) -> float:
    """Accuracy under ``adversarial_images`` (uint8 images, in batches so memory stays small)."""
    correct = 0
    for start in range(0, len(images), _ATTACK_BATCH):
        x = to_unit(images[start : start + _ATTACK_BATCH])
        y = torch.as_tensor(labels[start : start + _ATTACK_BATCH])
        adv = adversarial_images(model, x, y, attack, epsilon, seed=config.SEED + start)
        correct += int((predict_probs(model, adv).argmax(1) == y).sum())
    return correct / len(images)


def model_label(model_path: Path | None) -> str:
    """A short name for a model in tables and legends (run folders all hold ``model.safetensors``)."""
    if model_path is None:
        return "default"
    path = Path(model_path)
    return f"{path.parent.name}/{path.name}" if path.stem == "model" else path.name


def robustness_of(model: WbcClassifier, test: LabelledImages, progress_label: str) -> dict:
    """Accuracy at every corruption severity and attack budget for one model."""
    steps = [(name, s) for name in config.CORRUPTIONS for s in range(1, 6)]
    steps += [(attack, eps) for attack in ("fgsm", "pgd") for eps in config.ATTACK_EPSILONS]
    clean = corrupted_accuracy(model, test.images, test.labels, None, 0)
    corruptions = {
        name: {"severity": list(range(6)), "parameter": [None, *params], "accuracy": [clean]}
        for name, params in config.CORRUPTIONS.items()
    }
    attacks = {attack: {"epsilon": [0.0, *config.ATTACK_EPSILONS], "accuracy": [clean]} for attack in ("fgsm", "pgd")}
    for name, level in tqdm(steps, desc=f"robustness {progress_label}", unit="test"):
        if name in corruptions:
            corruptions[name]["accuracy"].append(corrupted_accuracy(model, test.images, test.labels, name, level))
        else:
            attacks[name]["accuracy"].append(adversarial_accuracy(model, test.images, test.labels, name, level))
    worst = min(corruptions, key=lambda n: corruptions[n]["accuracy"][-1])
    return {
        "clean_accuracy": clean,
        # mean over all corruptions and severities 1-5: the "mean corruption accuracy" of ImageNet-C / MedMNIST-C
        "mean_corruption_accuracy": float(np.mean([c["accuracy"][1:] for c in corruptions.values()])),
        "worst_corruption": {"name": worst, "accuracy_at_severity_5": corruptions[worst]["accuracy"][-1]},
        "corruptions": corruptions,
        "attacks": attacks,
    }


def comparison_row(result: dict) -> dict:
    """One line of the model-comparison table."""
    row = {
        "model": result["model"],
        "arch": result["arch"],
        "n_images": result["n_images"],
        "clean": result["clean_accuracy"],
        "mean_corruption": result["mean_corruption_accuracy"],
        "worst_corruption": f"{result['worst_corruption']['name']} "
        f"({result['worst_corruption']['accuracy_at_severity_5']:.1%} at severity 5)",
    }
    for attack, values in result["attacks"].items():
        for eps, acc in zip(values["epsilon"][1:], values["accuracy"][1:]):
            row[f"{attack}_eps{eps * 255:g}/255"] = acc
    return row


def run_robustness(model_paths: list[Path | None], data: Path, out: Path, max_images: int | None = None) -> dict:
    """Measure every model in ``model_paths`` (None = the default model) on the labelled folder ``data``; write
    ``robustness.json``, ``robustness_accuracy.png`` (one panel per corruption and attack, one line per model) and
    ``robustness_examples.png`` (what each corruption looks like at severities 1-5)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for model_path in model_paths or [None]:
        model, meta = load_model(model_path)
        model = prepare_for_cpu(model)
        test = load_test_images(meta, data, max_images)
        print(test.description)
        label = model_label(model_path)
        result = {
            "model": label,
            "model_path": str(model_path) if model_path else "default",
            "arch": meta["arch"],
            "img_size": meta["img_size"],
            "n_images": len(test.labels),
            "data": test.description,
        }
        result.update(robustness_of(model, test, label))
        results.append(result)
    summary = {
        "corruption_parameters": {name: list(values) for name, values in config.CORRUPTIONS.items()},
        "attack": {
            "norm": "Linf",
            "input_range": [0, 1],
            "pgd_steps": config.PGD_STEPS,
            "pgd_step_size": "2.5*epsilon/steps",
            "pgd_random_start": True,
            "precision": "fp32",
            "library": "captum.robust",
        },
        "models": results,
        "comparison": [comparison_row(r) for r in results],
    }
    write_json(out / "robustness.json", summary)
    plots.robustness_curves(results, out / "robustness_accuracy.png")
    example = test.images[:1]
    images = [corrupt(example, name, s)[0].permute(1, 2, 0).numpy() for name in config.CORRUPTIONS for s in range(6)]
    captions = [f"{name} {s}" if s else f"{name}: clean" for name in config.CORRUPTIONS for s in range(6)]
    plots.image_gallery(
        images, captions, out / "robustness_examples.png", columns=6, title="Corruptions at severities 0 (clean) to 5"
    )
    return summary
