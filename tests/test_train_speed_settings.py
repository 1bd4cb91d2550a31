"""The training step's speed settings keep training what it was: the kernels chosen for trained depthwise convolutions
under CPU bf16 autocast (everything else bf16, the model untouched), dropout masks from uniforms, frozen batch norms folded into
their convolutions, a step's chunks at once on threads of their own, loader workers that augment reproducibly and
resume exactly, and OpenMP threads that wait passively.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import pytest
import torch
from conftest import pbc_files
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from wbc_trust import config
from wbc_trust import train as train_module
from wbc_trust.adapt import FineTuning
from wbc_trust.data import Record, load_images
from wbc_trust.distributed import Context
from wbc_trust.models import REGISTRY, bf16_supported, build_model, prepare_for_cpu
from wbc_trust.recipe import make_config
from wbc_trust.train import (
    DepthwiseGradByConvolution,
    DropoutMaskFromUniform,
    FrozenBatchNormFolded,
    frozen_conv_norm_pairs,
    resolve,
    train_loader,
    train_step,
)

SIZE = 96


@pytest.fixture(scope="module")
def loaded():
    """8 real PBC images per class at 96 px."""
    records = [Record(p, label) for label, cls in enumerate(config.CLASSES) for p in pbc_files(cls, 8)]
    return load_images(records, SIZE, cache=False)


def _lite0() -> nn.Module:
    """The default recipe's network layout: EfficientNet-Lite0 with its first 4 stages frozen (random weights)."""
    torch.manual_seed(0)
    return prepare_for_cpu(
        build_model(
            "efficientnet_lite0", pretrained="imagenet", frozen_stages=config.DEFAULT_FROZEN_STAGES[config.DEFAULT_ARCH]
        )
    )


def _step(model: nn.Module, loaded, use_bf16: bool) -> dict[str, tuple[torch.dtype, str]]:
    """One train_step on the first 16 images; returns each convolution's output dtype and the name of the autograd
    node that made it, by module name."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)  # lr 0: weights stay
    model.train()
    images, labels = loaded.images[:16].float() / 255, loaded.labels[:16]
    with _convolution_outputs(model) as outputs:
        train_step(model, images, labels, nn.CrossEntropyLoss(), optimizer, use_bf16)
    return outputs


@contextmanager
def _convolution_outputs(model: nn.Module) -> Iterator[dict[str, tuple[torch.dtype, str]]]:
    """While open, records (output dtype, grad_fn name) of each convolution's last forward; the hooks go at exit."""
    outputs: dict[str, tuple[torch.dtype, str]] = {}
    hooks = [
        m.register_forward_hook(
            lambda _m, _i, out, name=name: outputs.__setitem__(name, (out.dtype, type(out.grad_fn).__name__))
        )
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


BY_CONVOLUTION = "DepthwiseGradByConvolutionBackward"


def _expected_by_kernel(model: nn.Module) -> dict[str, tuple[torch.dtype, bool]]:
    """Per convolution, what ``TrainableDepthwiseKernels`` should run under bf16 autocast: (output dtype, whether its
    weight gradient is ``DepthwiseGradByConvolution``'s). Trained depthwise ones larger than 3×3: bf16 through the
    function with stride 1, fp32 when strided; everything else bf16 as autocast runs it."""
    expected = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            large = m.groups > 1 and m.weight.shape[1] == 1 and m.weight.requires_grad and max(m.kernel_size) > 3
            strided = max(m.stride) > 1
            expected[name] = (torch.float32 if large and strided else torch.bfloat16, large and not strided)
    return expected


def _check_by_kernel(model: nn.Module, outputs: dict[str, tuple[torch.dtype, str]]) -> None:
    expected = _expected_by_kernel(model)
    assert outputs.keys() == expected.keys()
    for name, (dtype, by_convolution) in expected.items():
        assert outputs[name][0] == dtype, name
        assert (outputs[name][1] == BY_CONVOLUTION) == by_convolution, name


def test_trained_depthwise_convolutions_take_the_kernels_chosen_for_them(
    loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under bf16 autocast the default recipe's trained depthwise convolutions larger than 3×3 leave autocast's plain
    bf16 kernel (bf16 with the weight gradient by convolution at stride 1, fp32 when strided), and only they; the
    other settings put all of them in fp32 or leave all in bf16; the model is left alone."""
    if not bf16_supported():
        pytest.skip("this CPU has no native bf16: autocast stays off and every convolution runs in fp32")
    model = _lite0()
    expected = _expected_by_kernel(model)
    assert {kind for kind in expected.values()} == {
        (torch.bfloat16, False),
        (torch.bfloat16, True),
        (torch.float32, False),
    }  # all three occur
    _check_by_kernel(model, _step(model, loaded, use_bf16=True))
    trained_depthwise = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    trained_depthwise = {n for n in trained_depthwise if model.get_submodule(n).weight.requires_grad}
    monkeypatch.setattr(config, "CPU_TRAINED_DEPTHWISE", "fp32")
    outputs = _step(model, loaded, use_bf16=True)
    assert {n for n, (dtype, _) in outputs.items() if dtype == torch.float32} == trained_depthwise
    monkeypatch.setattr(config, "CPU_TRAINED_DEPTHWISE", "bf16")
    assert {dtype for dtype, _ in _step(model, loaded, use_bf16=True).values()} == {torch.bfloat16}
    # and it leaves the model alone: same parameter names, plain modules
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in _lite0().named_parameters()]
    assert all(type(m).__module__.split(".")[0] in ("torch", "timm", "wbc_trust") for m in model.modules())


@pytest.mark.parametrize("kernel", [5, 7])
def test_depthwise_weight_gradient_by_convolution_is_the_gradient(kernel: int, loaded) -> None:
    """``DepthwiseGradByConvolution`` computes what torch's depthwise convolution does, on real images in fp64: the
    output, the input gradient, the weight and bias gradients (channels_last, as in training)."""
    torch.manual_seed(0)
    x = (loaded.images[:4].double() / 255).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(3, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, 3, SIZE, SIZE, dtype=torch.float64)
    results = []
    for run in (
        lambda: nn.functional.conv2d(x, weight, bias, 1, kernel // 2, 1, 3),
        lambda: DepthwiseGradByConvolution.apply(x, weight, bias, (kernel // 2, kernel // 2)),
    ):
        out = run()
        grads = torch.autograd.grad(out, (x, weight, bias), upstream)
        results.append((out, *grads))
    for reference, ours in zip(*results):
        assert torch.allclose(ours, reference, rtol=1e-10, atol=1e-10)
    assert results[0][2].abs().max() > 1  # a gradient worth comparing


def test_by_kernel_depthwise_keeps_the_bf16_step_as_close_to_fp32(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step's gradients with the trained depthwise convolutions by kernel agree with the fp32 step's at least as
    well as the all-bf16 step's did (the recipe trains the same network), and are not the all-bf16 step's."""
    grads = {}
    for name, use_bf16, depthwise in (
        ("fp32", False, "by-kernel"),
        ("by-kernel", True, "by-kernel"),
        ("bf16", True, "bf16"),
    ):
        monkeypatch.setattr(config, "CPU_TRAINED_DEPTHWISE", depthwise)
        model = _lite0()
        _step(model, loaded, use_bf16)
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    agreement = {
        k: float(nn.functional.cosine_similarity(grads[k], grads["fp32"], dim=0)) for k in ("by-kernel", "bf16")
    }
    assert agreement["by-kernel"] >= agreement["bf16"] - 0.02, agreement
    assert agreement["by-kernel"] > 0.5, agreement  # bf16 autocast's own noise at 16 images
    assert not torch.equal(grads["by-kernel"], grads["bf16"])


def test_dropout_from_uniforms_is_dropout(loaded) -> None:
    """The seed CNN's step draws its dropout masks from uniforms (no ``bernoulli_``), and such a mask is dropout's:
    each element kept with probability 1 - p and scaled by 1 / (1 - p), the input's memory layout and dtype kept, the
    gradient masked alike; outside training, and at p = 0, the input comes back unchanged."""
    torch.manual_seed(0)
    x = torch.rand(48, 32, 64, 64).to(torch.bfloat16).contiguous(memory_format=torch.channels_last).requires_grad_()
    with DropoutMaskFromUniform():
        y = nn.functional.dropout(x, 0.25, training=True)
        assert torch.equal(nn.functional.dropout(x, 0.25, training=False), x)
        assert torch.equal(nn.functional.dropout(x, 0.0, training=True), x)
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.75) < 0.002  # 6.3 M draws: the standard error is 0.0002
    assert torch.allclose(y[kept].float(), (x[kept] / 0.75).float(), rtol=1e-2)
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)

    model = prepare_for_cpu(build_model("cnn"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    images, labels = loaded.images[:16].float() / 255, loaded.labels[:16]
    with torch.profiler.profile() as prof:
        train_step(model, images, labels, nn.CrossEntropyLoss(), optimizer, use_bf16=False)
    ops = {event.key for event in prof.key_averages()}
    assert "aten::uniform_" in ops and "aten::bernoulli_" not in ops, sorted(ops)


def test_wbc_adapt_fine_tunes_with_the_same_kernels(loaded) -> None:
    """``wbc adapt``'s fine-tuning step is a training step too: under bf16 autocast its trained depthwise convolutions
    take the kernels chosen for them (``TrainableDepthwiseKernels``) and the rest bf16."""
    if not bf16_supported():
        pytest.skip("this CPU has no native bf16: autocast stays off and every convolution runs in fp32")
    model = _lite0()
    cells = (loaded.images[:16], loaded.labels[:16])
    with _convolution_outputs(model) as outputs:
        FineTuning(None, "seed", config.DEFAULT_FROZEN_STAGES[config.DEFAULT_ARCH], steps=1).run(model, cells)
    _check_by_kernel(model, outputs)


class _BatchNormKernels(TorchDispatchMode):
    """Counts the batch-norm kernels that run (aten ops, after every function mode has had its say). Not
    ``torch.profiler``: parsing its trace of an fp64 EfficientNet took 31 of this test's 35 s."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += "batch_norm" in func.name()
        return func(*args, **(kwargs or {}))


def _batch_norm_calls(run) -> int:
    with _BatchNormKernels() as kernels:
        run()
    return kernels.count


# Lite1 and Lite2 come from the same spec function as Lite0 (models._efficientnet_lite), with the same block types,
# so Lite0 stands for the family here: each of them would add ~30 s of fp64 to the suite.
@pytest.mark.parametrize("arch", [a for a in sorted(REGISTRY) if a not in ("efficientnet_lite1", "efficientnet_lite2")])
def test_frozen_batch_norms_fold_into_their_convolutions(arch: str, loaded) -> None:
    """Every batch norm of the frozen stages that follows a convolution is folded into it (none of the trained ones),
    and the folded network computes what the plain one does, on real images: the same logits, the same training
    gradients, one batch-norm pass fewer per fold; the frozen layers themselves are left as they were."""
    torch.manual_seed(0)
    model = prepare_for_cpu(build_model(arch, frozen_stages=2)).double()  # fp64: rounding cannot hide a difference
    model.train()  # the frozen stages' batch norms go to eval mode
    pairs = frozen_conv_norm_pairs(model)
    frozen = {m for stage in model.stages()[:2] for m in stage.modules()}
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert {norm for _, norm in pairs} == {m for m in norms if m in frozen}
    assert bool(pairs) == bool(norms)  # vgg16 has no batch norm; the others fold some
    kept = [t for pair in pairs for m in pair for t in (*m.parameters(), *m.buffers())]
    before = [t.clone() for t in kept]
    images, labels = loaded.images[:8].double() / 255, loaded.labels[:8]

    def gradients(fold: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks
        with FrozenBatchNormFolded(model) if fold else nullcontext():
            logits = model(images)
            nn.functional.cross_entropy(logits, labels).backward()
        return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    (plain_logits, plain_grads), (folded_logits, folded_grads) = gradients(False), gradients(True)
    assert torch.allclose(folded_logits, plain_logits, atol=1e-4, rtol=1e-4)
    # fp32 rounding differs, and the trained stages' batch statistics of 8 small images amplify it
    assert float((folded_grads - plain_grads).norm() / plain_grads.norm()) < 1e-2
    model.eval()
    with torch.no_grad():
        plain = _batch_norm_calls(lambda: model(images))
        assert plain == len(norms)  # one kernel per batch norm: the count counts passes
        model.train()
        fold = FrozenBatchNormFolded(model)
        model.eval()
        with fold:
            assert _batch_norm_calls(lambda: model(images)) == plain - len(pairs)
    assert all(torch.equal(a, b) for a, b in zip(before, kept))  # folded into copies: the frozen layers untouched


def _chunked_step(model: nn.Module, loaded, at_once: bool, use_bf16: bool, monkeypatch: pytest.MonkeyPatch):
    """One train_step (SGD, lr 0.5) of 16 real images in two chunks of 8, the chunks at once or one after another;
    returns (logits, loss, state_dict after the step, names of the threads that ran the forward passes)."""
    monkeypatch.setattr(config, "MICRO_BATCH_PIXELS", 8 * SIZE * SIZE)
    monkeypatch.setattr(train_module, "_can_run_chunks_at_once", lambda *_: at_once)
    threads: set[str] = set()
    hook = model.register_forward_hook(lambda *_: threads.add(threading.current_thread().name))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    dtype = torch.float32 if use_bf16 else torch.float64
    torch.manual_seed(3)
    try:
        logits, loss = train_step(
            model, loaded.images[:16].to(dtype) / 255, loaded.labels[:16], nn.CrossEntropyLoss(), optimizer, use_bf16
        )
    finally:
        hook.remove()
    return logits, loss, {k: v.clone() for k, v in model.state_dict().items()}, threads


def test_chunks_at_once_train_as_one_after_another(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's chunks run on threads of their own at once and give what they give one after another, on real images
    in fp64: the same logits and loss, the same weights after the step, the same running statistics and batch counts
    of every batch norm (each chunk's updates applied in chunk order). With dropout and bf16, as ``wbc train`` runs,
    the same step twice gives the same weights bit for bit, whatever the threads' timing."""
    model = _lite0().double()
    model.net.drop_rate = 0.0  # the only random part: one after another, the chunks draw from torch's generator
    start = copy.deepcopy(model.state_dict())
    logits, loss, after, threads = _chunked_step(model, loaded, True, False, monkeypatch)
    assert len(threads) == 2 and all(name.startswith("wbc-chunk") for name in threads)
    model.load_state_dict(start)
    plain_logits, plain_loss, plain_after, plain_threads = _chunked_step(model, loaded, False, False, monkeypatch)
    assert plain_threads == {threading.current_thread().name}
    assert torch.allclose(logits, plain_logits, rtol=0, atol=1e-10) and torch.allclose(loss, plain_loss, atol=1e-12)
    norms = {name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.weight.requires_grad}
    buffers = {"running_mean", "running_var", "num_batches_tracked"}
    statistics = [k for k in after if k.rsplit(".", 1)[0] in norms and k.rsplit(".", 1)[1] in buffers]
    moved = [k for k in statistics if not torch.equal(after[k], start[k])]
    assert len(moved) == 3 * len(norms)  # running mean, variance and count of every trained batch norm
    assert all(int(after[k]) == int(start[k]) + 2 for k in moved if k.endswith("num_batches_tracked"))
    for key, value in plain_after.items():
        assert torch.allclose(after[key].double(), value.double(), rtol=1e-9, atol=1e-12), key

    model = _lite0()  # dropout on, bf16 where the CPU has it
    start = copy.deepcopy(model.state_dict())
    use_bf16 = bf16_supported()
    first = _chunked_step(model, loaded, True, use_bf16, monkeypatch)[2]
    model.load_state_dict(start)
    second = _chunked_step(model, loaded, True, use_bf16, monkeypatch)[2]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], start[k]) for k in first)


def test_batch_norm_sees_at_most_chunk_images(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch small in pixels (the seed CNN's 16 real images at 96 px, far under the pixel budget) is still cut into
    chunks of ``config.CHUNK_IMAGES``: every batch norm normalises over 8 images, twice, and on CPU with two torch
    threads the two chunks run at once."""
    monkeypatch.setattr(config, "CHUNK_IMAGES", 8)
    torch.manual_seed(0)
    model = prepare_for_cpu(build_model("cnn"))
    model.train()
    seen: list[int] = []
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(len(args[0]))) for m in norms]
    threads: set[str] = set()
    hooks.append(model.register_forward_hook(lambda *_: threads.add(threading.current_thread().name)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        train_step(model, loaded.images[:16].float() / 255, loaded.labels[:16], nn.CrossEntropyLoss(), optimizer, False)
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(seen) == [8] * (2 * len(norms))
    if torch.get_num_threads() >= 2:
        assert len(threads) == 2 and all(name.startswith("wbc-chunk") for name in threads)


def test_mixup_targets_train_as_the_classes_they_blend(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixup's soft targets (``--config`` ``mixup: α``, torchvision's ``v2.MixUp``) on real images (an fp64 network, the
    loss in fp32 as always), two chunks,
    unequal class weights: one-hot targets give the hard labels' loss and weights after the step (the loss is the
    class-weighted mean either way), and the trainer of a mixup recipe blends each batch (images and targets)."""
    monkeypatch.setattr(config, "MICRO_BATCH_PIXELS", 8 * SIZE * SIZE)
    monkeypatch.setattr(train_module, "_can_run_chunks_at_once", lambda *_: False)
    images, labels = loaded.images[:16].double() / 255, loaded.labels[:16]
    criterion = nn.CrossEntropyLoss(weight=torch.tensor([3.0, 0.5, 2.0, 1.0, 0.7]))  # the loss is taken in fp32
    model = _lite0().double()
    model.net.drop_rate = 0.0
    start = copy.deepcopy(model.state_dict())
    results = []
    for targets in (labels, nn.functional.one_hot(labels, len(config.CLASSES)).float()):
        model.load_state_dict(start)
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        _, loss = train_step(model, images, targets, criterion, optimizer, use_bf16=False)
        results.append((loss, {k: v.clone() for k, v in model.state_dict().items()}))
    (hard_loss, hard), (soft_loss, soft) = results
    assert torch.allclose(hard_loss, soft_loss, rtol=1e-6)
    assert all(torch.allclose(hard[k].double(), soft[k].double(), rtol=1e-5, atol=1e-7) for k in hard)
    assert not all(torch.equal(hard[k], start[k]) for k in hard)  # the step did train

    cfg = resolve(make_config(data="d", out="o", mixup=0.4))
    trainer = train_module._build_trainer(cfg, loaded, train_loader(loaded, 8, 0), Context(torch.device("cpu")))
    torch.manual_seed(0)
    blended, targets = trainer.mixup(images.float(), labels)
    assert targets.shape == (16, len(config.CLASSES)) and torch.allclose(targets.sum(1), torch.ones(16))
    mix = float(targets[0, labels[0]])  # λ (or 1 - λ where both images of the pair share a class)
    assert 0 < mix < 1 and not torch.equal(blended, images.float())


def _epoch(loader) -> list[torch.Tensor]:
    return [images for images, _ in loader]


def test_loader_workers_augment_reproducibly_and_resume_exactly(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """With worker processes the same seed gives the same augmented batches, another seed others, every epoch new
    ones; and restoring the generator state the checkpoint holds repeats the next epoch exactly (``--resume``)."""
    monkeypatch.setattr(config, "TRAIN_LOADER_WORKERS", 1)
    first = train_loader(loaded, 16, seed=0)
    assert first.num_workers == config.TRAIN_LOADER_WORKERS
    epoch1 = _epoch(first)
    state = first.generator.get_state()
    epoch2 = _epoch(first)
    same_seed = _epoch(train_loader(loaded, 16, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(epoch1, same_seed))
    assert not torch.equal(epoch1[0], _epoch(train_loader(loaded, 16, seed=1))[0])
    assert not torch.equal(epoch1[0], epoch2[0])
    resumed = train_loader(loaded, 16, seed=0)
    resumed.generator.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(_epoch(resumed), epoch2))


def test_openmp_waits_passively_unless_the_environment_says_otherwise() -> None:
    """Importing wbc_trust sets OMP_WAIT_POLICY before torch loads OpenMP; a user's own setting is kept."""
    code = "import wbc_trust, os, sys; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}

    def policy(environment: dict[str, str]) -> str:
        return subprocess.run(
            [sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True
        ).stdout.split()

    assert policy(env) == [config.OMP_WAIT_POLICY, "False"]  # set, and torch not loaded yet: it takes effect
    assert policy({**env, "OMP_WAIT_POLICY": "ACTIVE"})[0] == "ACTIVE"
