"""Grad-CAM: where in the image the model looked, from pytorch-grad-cam (GradCAM and GradCAM++).

The target layer is the model's last convolutional layer, found per architecture by ``WbcClassifier.feature_layer``.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from wbc_trust.errors import WbcError
from wbc_trust.models import WbcClassifier

#: The CAM methods a user may ask for, by name.
CAM_METHODS: dict[str, type[BaseCAM]] = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}


def cam_method(name: str) -> type[BaseCAM]:
    """The pytorch-grad-cam class for a method name (``gradcam`` or ``gradcam++``)."""
    try:
        return CAM_METHODS[name.lower()]
    except KeyError:
        raise WbcError(f"unknown Grad-CAM method {name!r}: choose one of {', '.join(CAM_METHODS)}") from None


def compute_cams(model: WbcClassifier, images: torch.Tensor, targets: list[int] | None = None,
                 method: str = "gradcam++") -> np.ndarray:
    """Heat maps (N×S×S, each scaled to [0, 1]) for uint8 images N×3×S×S; ``targets`` None = the predicted class."""
    x = images.float() / 255.0
    cam_targets = [ClassifierOutputTarget(int(t)) for t in targets] if targets is not None else None
    with cam_method(method)(model=model, target_layers=[model.feature_layer()]) as cam:
        return cam(input_tensor=x, targets=cam_targets)


def overlay(image: torch.Tensor, heatmap: np.ndarray) -> np.ndarray:
    """The heat map (jet colours) blended over a uint8 3×S×S image → uint8 S×S×3."""
    rgb = image.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
    return show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=0.6)


def gradcam_overlay(model: WbcClassifier, image: torch.Tensor, target: int | None = None,
                    method: str = "gradcam++") -> tuple[np.ndarray, np.ndarray]:
    """One image's heat map (float S×S in [0, 1]) and its overlay (uint8 S×S×3); ``target`` None = predicted class.

    The app calls this for every uploaded image, so it runs one forward and one backward pass and nothing else.
    """
    heatmap = compute_cams(model, image.unsqueeze(0), None if target is None else [target], method)[0]
    return heatmap, overlay(image, heatmap)
