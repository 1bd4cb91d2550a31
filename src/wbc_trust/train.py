"""The training loop: data folder → split → cached images → model → best-on-validation ``model.safetensors``.

Writes into the run folder: ``model.safetensors``, ``checkpoint.pt`` (for ``--resume``), ``history.json``,
``curves.png``, ``split.json``, when the data has a held-out test split ``test/metrics.json`` & co., and at the end
``args.yaml`` (the effective recipe: ``wbc train --config OUT/args.yaml`` repeats the run, as with timm's).

Laid out like torchvision's ``references/classification/train.py``: ``train_one_epoch``, the best-epoch rule
(``update_best``), the checkpoint (``checkpoint_state`` / ``restore_checkpoint``), and ``train`` wiring them together.
Under ``torchrun`` the same loop runs on every process with DistributedDataParallel (``distributed.py``): rank 0
decodes, splits and writes every file, the others read its decode cache; each trains on its share of every batch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.optim.swa_utils import AveragedModel
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2
from tqdm import tqdm

from wbc_trust import config, distributed, plots
from wbc_trust.calibration import Calibration, calibrate_loaded
from wbc_trust.crop import CropPolicy
from wbc_trust.data import (
    ImageTensorDataset,
    LoadedImages,
    data_fingerprint,
    find_dataset,
    lab_magnification,
    load_images,
    relative_paths,
    split_plan,
    split_records,
    train_transform,
)
from wbc_trust.errors import WbcError
from wbc_trust.evaluate import compute_metrics, write_outputs
from wbc_trust.io import atomic_write, write_json
from wbc_trust.modelfile import HEAD_CHECKPOINT_PREFIX, load_model, run_manifest, save_model
from wbc_trust.models import (
    VIEWS,
    autocast_dtype,
    build_model,
    default_img_size,
    get_arch,
    predict_probs,
    prepare_for_cpu,
)
from wbc_trust.recipe import TrainConfig, plain, save_recipe

log = logging.getLogger(__name__)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Check the settings before any image is decoded and fill in the architecture's defaults: input size, starting
    weights (ImageNet for the default architecture) and the stages kept at them."""
    get_arch(cfg.arch)  # an unknown --arch fails now, listing the registered ones
    train_transform(cfg.augment)  # an unknown --augment fails now
    CropPolicy(cfg.crop, 1)  # an unknown --crop fails now
    unknown = [v for v in cfg.test_views if v not in VIEWS]
    if unknown or not cfg.test_views:
        raise WbcError(
            f"--test-views: unknown view(s) {', '.join(unknown) or '(none given)'}: "
            f"use a comma-separated list of {', '.join(VIEWS)}"
        )
    distributed.resolve_device(cfg.device)
    if not cfg.mixup >= 0:
        raise WbcError(f"mixup: {cfg.mixup}: mixup's alpha must be 0 (off) or positive (e.g. 0.2)")
    pretrained = cfg.pretrained if cfg.pretrained is not None else config.DEFAULT_PRETRAINED.get(cfg.arch, "none")
    frozen = cfg.frozen_stages
    if frozen is None:
        frozen = config.DEFAULT_FROZEN_STAGES.get(cfg.arch, 0) if pretrained.lower() != "none" else 0
    return replace(
        cfg,
        data=Path(cfg.data),
        out=Path(cfg.out),
        pretrained=pretrained,
        frozen_stages=frozen,
        img_size=cfg.img_size or default_img_size(cfg.arch),
        test_views=tuple(cfg.test_views),
    )


# ---------------------------------------------------------------------------------------------------------------
# Data: split once, decode once
# ---------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Same seed → same split, same initialisation, same augmentation order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Splits:
    """Decoded images per split, and what the split file records."""

    loaded: dict[str, LoadedImages]
    split_file: dict
    #: the policy the model carries: ``cfg.crop``, and for the cell view the training lab's magnification
    crop: CropPolicy


def prepare_splits(cfg: TrainConfig, img_size: int, write: bool = True) -> tuple[Splits, dict]:
    """Find the data, decode it once (each image cut by the crop policy ``cfg.crop``; the cell view's training images
    at the lab's one magnification, ``home_scale``), split it (duplicates kept on one side; ``calib`` carved out of
    ``val``) and write ``split.json`` (unless ``write`` is False: the other processes of a torchrun job)."""
    index = find_dataset(cfg.data, require_all_classes=True)
    if index.ignored_classes:
        log.info(
            "left out (not white-cell classes): "
            + ", ".join(f"{name} ({n} files)" for name, n in index.ignored_classes.items())
        )
    pool, fractions, fixed = split_plan(index)
    model_crop = home_scale(CropPolicy(cfg.crop, img_size), [r.path for r in pool])
    crop = model_crop.with_lab_scale(model_crop.home_px_per_um)  # every training image at the lab's one scale
    loaded_pool = load_images(pool, crop, desc="decoding training images")
    for path, reason in loaded_pool.unreadable:
        log.info(f"skipped unreadable file {path}: {reason}")
    parts = split_records(
        loaded_pool.records, loaded_pool.digests, fractions, seed=cfg.seed, calib_fraction=config.CALIB_FRACTION
    )
    position = {r.path: i for i, r in enumerate(loaded_pool.records)}
    loaded: dict[str, LoadedImages] = {}
    for name, records in parts.items():
        idx = [position[r.path] for r in records]
        if cfg.max_images:
            idx = idx[:: max(1, len(idx) // cfg.max_images)][: cfg.max_images]
        loaded[name] = loaded_pool.subset(idx)
    # the held-out images are read as wbc predict reads a folder: at their own batch's scale (data.batch_policy)
    for name, records in fixed.items():
        loaded[name] = load_images(records, model_crop, desc=f"decoding {name} images")
    if crop != model_crop and "test" in parts:
        loaded["test"] = load_images(loaded["test"].records, model_crop, desc="decoding test images")
    split_file = {
        "data_root": str(index.root),
        "layout": index.layout,
        "seed": cfg.seed,
        "fractions": fractions,
        "calib_fraction": config.CALIB_FRACTION,
        "unreadable": [[str(p), why] for p, why in loaded_pool.unreadable],
        "data_fingerprint": data_fingerprint(loaded_pool),
        **{name: relative_paths(li.records, index.root) for name, li in loaded.items()},
    }
    # a refused resume must not overwrite the run's split
    if write and not (cfg.resume and (Path(cfg.out) / "split.json").exists()):
        write_json(Path(cfg.out) / "split.json", split_file)
    return Splits(loaded, split_file, model_crop), index.summary()


def home_scale(crop: CropPolicy, paths: list[Path]) -> CropPolicy:
    """The cell view at the training lab's magnification (``data.lab_magnification``). Cutting every training image at
    each one's own red-cell ruler trained on its 7.6 % scatter: with one scale, PBC's held-out accuracy (read at each
    image's own scale) rose from 99.01 to 99.16 % and BCCD's fields with no label from 62.7 to 73.7 % (docs/one-view.md)."""
    scale = lab_magnification(crop, paths, "the training lab's", missing=logging.WARNING)
    return crop if scale is None else replace(crop, home_px_per_um=scale)


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Square-root inverse-frequency weights (√(n / (k · count))): rare basophils and lymphocytes count more, but
    not 2.7× more, which on PBC turned neutrophils and monocytes into false basophils."""
    counts = torch.bincount(labels, minlength=n_classes).float().clamp(min=1)
    return (counts.sum() / (n_classes * counts)).sqrt()


def eval_batch_size(images: torch.Tensor) -> int:
    """Evaluation batches within the training step's pixel budget: predict_probs' default of 128 images at 224 px
    needed 0.6 GiB more than training itself (bench/train_memory.py)."""
    return max(1, config.MICRO_BATCH_PIXELS // (images.shape[-2] * images.shape[-1]))


def train_loader(
    train_set: LoadedImages, batch_size: int, seed: int, augment: str = "seed", ctx: distributed.Context | None = None
) -> DataLoader:
    """Shuffled, augmented batches straight from the decoded uint8 cache (no file is read again after decoding).

    Under torchrun each of the N processes gets ``batch_size / N`` images of every step from a ``DistributedSampler``
    (seeded by ``seed`` and the epoch): the step and its number per epoch stay those of one process, so a recipe means
    the same at any world size and a checkpoint resumes at any world size. Pinned memory where a GPU is the target.
    """
    dataset = ImageTensorDataset(train_set.images, train_set.labels, train_transform(augment))
    drop_last = len(train_set.records) > batch_size
    common = {
        "drop_last": drop_last,
        "pin_memory": ctx is not None and ctx.device.type == "cuda",
        "collate_fn": dataset.collate,
        **_workers(),
    }
    if ctx is None or not ctx.distributed:
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed), **common
        )
    # with both drops, steps per epoch = ⌊⌊n/N⌋ / (b/N)⌋ = ⌊n/b⌋, exactly one process's
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=drop_last
    )
    return DataLoader(dataset, batch_size=batch_size // ctx.world_size, sampler=sampler, **common)


def _workers() -> dict:
    """DataLoader settings for ``config.TRAIN_LOADER_WORKERS`` augmenting processes, which prepare the next batches
    while the step runs. Not persistent: every epoch's workers are seeded afresh from the loader's generator (under
    torchrun: from the per-epoch seed), which the checkpoint holds, so ``--resume`` repeats the uninterrupted run's
    augmentation exactly. Forked, so the uint8 cache is shared with the workers, not copied."""
    if config.TRAIN_LOADER_WORKERS <= 0:
        return {}
    return {"num_workers": config.TRAIN_LOADER_WORKERS, "multiprocessing_context": "fork", "prefetch_factor": 2}


# ---------------------------------------------------------------------------------------------------------------
# One step, one epoch
# ---------------------------------------------------------------------------------------------------------------


class TrainableDepthwiseKernels(TorchFunctionMode):
    """Inside a CPU bf16 autocast region, choose the kernels of the depthwise convolutions whose weights are trained
    (``config.CPU_TRAINED_DEPTHWISE``: ``by-kernel``, or all of them in ``fp32``).

    Why: oneDNN computes a depthwise convolution's weight gradient with its depthwise kernel (``jit_dw``) only for 3×3
    kernels; larger ones fall to a generic grouped kernel on a 16×16-blocked layout (ONEDNN_VERBOSE on this
    AVX512-BF16 CPU, no AMX; 24 images, 480 channels at 10×10, one thread: 0.48 ms for 3×3 in bf16, 23.5 ms for 5×5).
    So, by kernel:

    * 3×3: bf16, as autocast runs it;
    * larger, stride 1: bf16, the weight gradient computed as a forward convolution (``DepthwiseGradByConvolution``);
    * larger, strided: fp32, where the generic kernel is least slow (that trick would need a dilated convolution,
      slow in bf16 too).

    Forward + backward of one chunk's layers of EfficientNet-Lite0 (24 images, one thread; ms; all in fp32 → by
    kernel): 480 channels at 10×10, 3×3: 6.1 → 0.9; 672 at 10×10, 5×5: 13.1 → 6.8 (plain bf16: 34.6); 1152 at 5×5,
    5×5: 9.0 → 2.7 (plain bf16: 30.0); 672 at 10×10, 5×5, stride 2: 8.6, fp32 both (plain bf16: 66.2). The default
    recipe's step, 12 steps of each alternated: median 302 ms with all of them in fp32, 259 ms by kernel.
    A function mode, not a module change: the model, its ``state_dict`` keys, its weight average and the saved file
    stay the plain modules.
    """

    def __init__(self, all_fp32: bool = False) -> None:
        super().__init__()
        self.all_fp32 = all_fp32

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.conv2d:
            return func(*args, **kwargs)
        call = dict(zip(_CONV2D_ARGS, args)) | kwargs
        weight = call["weight"]
        if not (weight.requires_grad and call.get("groups", 1) > 1 and weight.shape[1] == 1):  # not trained depthwise
            return func(**call)
        if not self.all_fp32 and max(weight.shape[-2:]) <= 3:
            return func(**call)
        stride, dilation, padding = call.get("stride", 1), call.get("dilation", 1), call.get("padding", 0)
        if not self.all_fp32 and _pair(stride) == _pair(dilation) == (1, 1) and not isinstance(padding, str):
            x = call["input"].to(torch.get_autocast_dtype("cpu"))
            return DepthwiseGradByConvolution.apply(x, weight, call.get("bias"), _pair(padding))
        with torch.autocast("cpu", enabled=False):
            return func(**{k: v.float() if isinstance(v, torch.Tensor) else v for k, v in call.items()})


_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[-1])


class DepthwiseGradByConvolution(torch.autograd.Function):
    """A depthwise convolution (stride 1, no dilation) in the input's dtype whose weight gradient is computed as a
    forward depthwise convolution, since oneDNN's own kernel for it serves only 3×3 (``TrainableDepthwiseKernels``).

    The weight gradient of channel c at kernel offset (i, j) is Σ over images n and output pixels (y, x) of
    grad[n, c, y, x] · input[n, c, y + i - p, x + j - p]: the correlation of each (image, channel) input plane with
    its gradient plane. As one convolution, with every (channel, image) pair a group of its own: the inputs as one
    image of C·N channels, the gradients as its C·N kernels, the same padding; its k×k output per pair, summed over
    the images in the weight's dtype, is the weight gradient. The input gradient is oneDNN's depthwise backward-data kernel.
    Written here because neither torch nor oneDNN offers another weight-gradient kernel for depthwise convolutions.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int]):
        low = weight.to(x.dtype)
        ctx.save_for_backward(x, low)
        ctx.padding, ctx.weight_dtype = padding, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.conv2d(x, low, None if bias is None else bias.to(x.dtype), 1, padding, 1, low.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, low = ctx.saved_tensors
        channels, images = low.shape[0], x.shape[0]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, low, None, [1, 1], list(ctx.padding), [1, 1], False, [0, 0], channels, [True, False, False]
            )[0]
        if ctx.needs_input_grad[1]:
            planes = x.transpose(0, 1).reshape(1, channels * images, *x.shape[2:])
            kernels = grad.to(x.dtype).transpose(0, 1).reshape(channels * images, 1, *grad.shape[2:])
            per_image = F.conv2d(planes, kernels, None, 1, ctx.padding, 1, channels * images)
            per_image = per_image.reshape(channels, images, *low.shape[2:])
            grad_weight = per_image.sum(1, keepdim=True, dtype=ctx.weight_dtype)  # summed in the weight's dtype
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3), dtype=ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None


class DropoutMaskFromUniform(TorchFunctionMode):
    """In CPU training, draw dropout's mask as ``uniform >= p`` instead of with ``bernoulli_``: the same mask
    distribution (each element kept independently with probability 1 - p, kept ones scaled by 1 / (1 - p)).

    Why: ATen's CPU ``bernoulli_(p)`` draws about 3× slower than ``torch.rand`` (42.5 against 14.6 ms for the seed
    CNN's first dropout, 48×32×64×64), and the seed CNN's six dropouts were 13.6 % of its training step
    (``bench/train_speed.py --profile``); dropout forward + backward took 50 ms there, 25 ms this way. A function mode,
    like ``TrainableDepthwiseKernels``: the model and its saved file keep their ``nn.Dropout`` modules.
    ``generator``: where the uniforms come from (torch's default generator if None); chunks of a step that run at once
    each draw from their own, so that which chunk gets which mask does not depend on the threads' timing.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = generator

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            return _uniform_dropout(*args, **kwargs, generator=self.generator)
        return func(*args, **kwargs)


def _uniform_dropout(
    input: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``F.dropout``'s contract, with the mask from uniforms (fp32, the input's memory layout; what ``torch.rand_like``
    draws, from ``generator``)."""
    if not training or p == 0.0 or p == 1.0:  # the edge cases as ATen does them
        return F.dropout(input, p, training, inplace)
    uniform = torch.empty_like(input, dtype=torch.float32).uniform_(generator=generator)
    mask = (uniform >= p).to(input.dtype).mul_(1.0 / (1.0 - p))
    return input.mul_(mask) if inplace else input * mask


class FrozenBatchNormFolded(TorchFunctionMode):
    """Run each frozen convolution with the frozen batch norm that follows it folded in, and skip that batch norm.

    Why: a frozen stage (the default recipe's first 4) runs forward only, with its batch norms in eval mode, each an
    affine map per channel that the convolution's weight and bias can absorb (``fuse_conv_bn_weights``, the fold of
    ``torch.fx``'s and ``torch.ao``'s conv-bn fusion). PyTorch folds only whole models in eval mode, not the frozen
    part of a model in training, and on this CPU the separate bf16 batch-norm pass is most of a frozen stage's cost:
    EfficientNet-Lite0's frozen stages took 51.8 ms with their batch norms and 17.8 ms folded (24 images at 160 px,
    bf16 autocast). The folded weights are made when the mode is entered, from the weights and running statistics of
    that moment. A function mode, like the others: the model, its ``state_dict`` and its file stay the plain modules.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        #: id(conv weight) → (that weight, folded weight, folded bias); holding the weight keeps its id unique
        self.convs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        #: id(running mean) → running mean of the batch norms folded away
        self.norms: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for conv, norm in frozen_conv_norm_pairs(model):
                weight, bias = fuse_conv_bn_weights(
                    conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
                )
                self.convs[id(conv.weight)] = (conv.weight, weight.detach(), bias.detach())
                self.norms[id(norm.running_mean)] = norm.running_mean

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and len(args) > 2:  # F.conv2d(input, weight, bias, stride, padding, dilation, groups)
            folded = self.convs.get(id(args[1]))
            if folded is not None and folded[0] is args[1]:
                args = (args[0], folded[1], folded[2], *args[3:])
        elif func is F.batch_norm:  # it passes (input, running_mean, running_var), the rest by keyword
            mean = args[1] if len(args) > 1 else kwargs.get("running_mean")
            training = args[5] if len(args) > 5 else kwargs.get("training", False)
            if self.norms.get(id(mean)) is mean and mean is not None and not training:
                return args[0] if args else kwargs["input"]
        return func(*args, **kwargs)


def frozen_conv_norm_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.modules.batchnorm._BatchNorm]]:
    """(convolution, batch norm) pairs that ``FrozenBatchNormFolded`` folds: siblings registered one after the other
    (how torchvision's and timm's blocks declare a convolution and the norm of its output), matching in channels,
    the norm in eval mode with running statistics, and no parameter of either trained. ``tests`` check, for every
    registered architecture, that the folded network computes what the plain one does."""
    pairs = []
    for parent in model.modules():
        children = list(parent.children())
        for conv, norm in zip(children, children[1:]):
            if (
                isinstance(conv, nn.Conv2d)
                and isinstance(norm, nn.modules.batchnorm._BatchNorm)
                and conv.out_channels == norm.num_features
                and not norm.training
                and norm.running_mean is not None
                and not any(p.requires_grad for p in (*conv.parameters(), *norm.parameters()))
            ):
                pairs.append((conv, norm))
    return pairs


@contextmanager
def cpu_training_kernels(
    model: nn.Module,
    device_type: str,
    use_bf16: bool,
    generator: torch.Generator | None = None,
    folded: FrozenBatchNormFolded | None = None,
) -> Iterator[None]:
    """The kernel choices of a training pass on CPU, for every loop that trains (``train_step`` and
    ``wbc adapt``'s fine-tuning): the kernels of the trained depthwise convolutions under bf16 autocast
    (``TrainableDepthwiseKernels``, ``config.CPU_TRAINED_DEPTHWISE``), dropout masks from uniforms
    (``DropoutMaskFromUniform``, drawn from ``generator``) and frozen batch norms folded into their convolutions
    (``FrozenBatchNormFolded``; ``folded`` when already made for this step). On CUDA, none. Function modes are per
    thread: each thread that trains enters its own (a mode keeps no state of its own on entering, so threads can
    share one)."""
    if config.CPU_TRAINED_DEPTHWISE not in ("by-kernel", "fp32", "bf16"):
        raise WbcError(
            f"config.CPU_TRAINED_DEPTHWISE = {config.CPU_TRAINED_DEPTHWISE!r}: choose by-kernel, fp32 or bf16"
        )
    with ExitStack() as modes:
        if device_type == "cpu":
            if use_bf16 and config.CPU_TRAINED_DEPTHWISE != "bf16":
                modes.enter_context(TrainableDepthwiseKernels(all_fp32=config.CPU_TRAINED_DEPTHWISE == "fp32"))
            modes.enter_context(DropoutMaskFromUniform(generator))
            modes.enter_context(folded or FrozenBatchNormFolded(model))
        yield


class ChunkRunningStatistics(TorchFunctionMode):
    """Inside one of a step's chunks that run at once (``train_step``): the batch norms in training mode update this
    chunk's own copies of their running mean, variance and batch count, not the model's buffers, which two threads
    would update in place at the same time. ``merge_running_statistics`` then applies the chunks' updates to the
    buffers in chunk order, as running the chunks one after another does."""

    def __init__(self, counters: set[int]) -> None:
        super().__init__()
        #: ids of the model's ``num_batches_tracked`` buffers (batch norms count their batches with ``add_``)
        self.counters = counters
        #: id(buffer) → [buffer, this chunk's copy, updates made, the update's momentum]
        self.copies: dict[int, list] = {}

    def _copy(self, buffer: torch.Tensor, momentum: float | None = None) -> torch.Tensor:
        entry = self.copies.setdefault(id(buffer), [buffer, buffer.detach().clone(), 0, momentum])
        entry[2] += 1
        return entry[1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = dict(zip(_BATCH_NORM_ARGS, args)) | kwargs
            if call.get("training") and call.get("running_mean") is not None:
                momentum = call.get("momentum", 0.1)
                call["running_mean"] = self._copy(call["running_mean"], momentum)
                call["running_var"] = self._copy(call["running_var"], momentum)
            return func(**call)
        if func is torch.Tensor.add_ and args and id(args[0]) in self.counters:
            return self._copy(args[0]).add_(*args[1:], **kwargs)
        return func(*args, **kwargs)


_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


@torch.no_grad()
def merge_running_statistics(chunks: list[ChunkRunningStatistics]) -> None:
    """Each chunk's copy is ``keep · start + delta`` (``keep`` = (1 - momentum) to the number of its updates);
    one after another the buffer would have become ``keep · buffer + delta`` chunk by chunk: so it does now."""
    starts = {key: entry[0].clone() for chunk in chunks for key, entry in chunk.copies.items()}
    for chunk in chunks:
        for key, (buffer, copy, updates, momentum) in chunk.copies.items():
            if momentum is None:  # a batch count: add the chunk's batches
                buffer.add_(copy - starts[key])
            else:
                keep = (1.0 - momentum) ** updates
                buffer.mul_(keep).add_(copy - keep * starts[key])


def _sync_last_chunk_only(model: nn.Module, last: bool):
    """Under DDP, gradients are averaged across processes once per step (on the last chunk's backward), not per
    chunk: ``no_sync`` lets the earlier chunks accumulate locally."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    use_bf16: bool,
    scaler: torch.amp.GradScaler | None = None,
    batch_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch: channels_last input (oneDNN's and cuDNN's fast layout), forward under
    autocast (bf16 on CPUs that have it natively; on CUDA bf16, or fp16 when ``scaler`` is given) with the CPU's
    kernel choices (``cpu_training_kernels``), loss in fp32.
    Returns (logits, loss); ``bench/train_speed.py`` times this.

    Large inputs run forward + backward in equal chunks of at most ``config.MICRO_BATCH_PIXELS`` pixels and
    ``config.CHUNK_IMAGES`` images (batch norm's "ghost batch"), each chunk's
    (class-weighted) mean loss scaled by its share of the batch's weight, so the summed gradient is the whole batch's
    (batch norm sees each chunk's statistics). It cuts activation memory at 224 px to a third, which
    keeps training on all of pbc-wbc at 224 px under 4 GiB (bench/train_memory.py). On CPU, when there are at most as
    many chunks as torch threads, the chunks run at once (``_chunks_at_once``).

    ``batch_weight``: the weight the loss is normalised by, by default this batch's. Under DDP it is the mean over the
    processes of their batches' weights, so that DDP's average of the processes' gradients is the gradient of the
    whole step's weighted mean loss.

    ``labels``: class indices, or one row of class probabilities per image (mixup's blended targets).
    """
    images = images.contiguous(memory_format=torch.channels_last)
    n_chunks = max(  # ceiling divisions
        -(-len(images) * images.shape[-2] * images.shape[-1] // config.MICRO_BATCH_PIXELS),
        -(-len(images) // config.CHUNK_IMAGES),
    )
    sample_weights = _sample_weights(getattr(criterion, "weight", None), labels)
    total = sample_weights.sum() if batch_weight is None else batch_weight
    dtype = torch.float16 if scaler is not None and scaler.is_enabled() else torch.bfloat16
    optimizer.zero_grad(set_to_none=True)
    chunks = list(
        zip(images.tensor_split(n_chunks), labels.tensor_split(n_chunks), sample_weights.tensor_split(n_chunks))
    )

    def chunk_loss(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(images.device.type, dtype=dtype, enabled=use_bf16):
            chunk_logits = model(x)
        if y.is_floating_point():
            # mixup's blended targets: the loss's mean would divide by the images, not by their class weights
            per_image = F.cross_entropy(
                chunk_logits.float(),
                y,
                weight=criterion.weight,
                label_smoothing=criterion.label_smoothing,
                reduction="none",
            )
            return chunk_logits, per_image.sum() / total
        return chunk_logits, criterion(chunk_logits.float(), y) * (w.sum() / total)

    if _can_run_chunks_at_once(model, images.device.type, len(chunks)):
        results = _chunks_at_once(model, chunks, chunk_loss, use_bf16)
    else:
        results = []
        with cpu_training_kernels(model, images.device.type, use_bf16):
            for i, chunk in enumerate(chunks):
                with _sync_last_chunk_only(model, last=i == len(chunks) - 1):
                    chunk_logits, loss = chunk_loss(*chunk)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                results.append((chunk_logits.detach(), loss.detach()))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return torch.cat([logits for logits, _ in results]), sum(loss for _, loss in results)


def _can_run_chunks_at_once(model: nn.Module, device_type: str, n_chunks: int) -> bool:
    """``config.CPU_CHUNKS_AT_ONCE``, on CPU, outside DDP, 2 to ``torch.get_num_threads()`` chunks, every batch norm
    in training mode with a momentum (a cumulative average would read the batch count that
    ``ChunkRunningStatistics`` keeps apart)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    return (
        config.CPU_CHUNKS_AT_ONCE
        and device_type == "cpu"
        and not isinstance(model, DistributedDataParallel)
        and 2 <= n_chunks <= torch.get_num_threads()
        and all(m.momentum is not None for m in norms)
    )


def _chunks_at_once(model: nn.Module, chunks: list[tuple], chunk_loss, use_bf16: bool) -> list[tuple]:
    """Forward and backward of a step's chunks on as many threads at once, each thread with its share of torch's
    threads (one each on 2 cores); the gradients summed in chunk order.

    Why: a CPU step of small convolutions scales poorly over threads, because every operator is a parallel region
    whose threads must wake up and meet (OpenMP's passive wait, ``config.OMP_WAIT_POLICY``): the default recipe's step
    (EfficientNet-Lite0, 48 images at 160 px, two chunks) took about 480 ms on one thread, 355 ms on two, and 261 ms
    as two one-thread chunks at once (medians of 10 steps each, alternated; one-off timings). PyTorch's own data parallelism in one
    process, ``nn.DataParallel``, runs only on CUDA devices; autograd supports concurrent backward passes on CPU.
    Kept the same as one after another: each chunk draws its dropout masks from its own generator (seeded from
    torch's default one, in chunk order), its batch norms update copies of their running statistics, merged in chunk
    order (``ChunkRunningStatistics``), and each chunk's gradients are summed in chunk order, so a step gives the
    same result whatever the threads' timing. The chunks' activations are held at once (the batch's, not a chunk's).
    """
    threads = torch.get_num_threads()
    seeds = [int(torch.empty((), dtype=torch.int64).random_()) for _ in chunks]
    trained = [p for p in model.parameters() if p.requires_grad]
    counters = {
        id(m.num_batches_tracked) for m in model.modules() if getattr(m, "num_batches_tracked", None) is not None
    }
    statistics = [ChunkRunningStatistics(counters) for _ in chunks]
    folded = FrozenBatchNormFolded(model)  # once for the step, shared by the chunks' threads

    def run(i: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
        torch.set_num_threads(max(1, threads // len(chunks)))
        generator = torch.Generator().manual_seed(seeds[i])
        with cpu_training_kernels(model, "cpu", use_bf16, generator, folded), statistics[i]:
            chunk_logits, loss = chunk_loss(*chunks[i])
            grads = torch.autograd.grad(loss, trained, allow_unused=True)
        return chunk_logits.detach(), loss.detach(), grads

    try:
        results = list(_chunk_threads(len(chunks)).map(run, range(len(chunks))))
    finally:
        torch.set_num_threads(threads)  # torch's count for threads started later (this thread kept its own)
    merge_running_statistics(statistics)
    for p, grads in zip(trained, zip(*(grads for *_, grads in results))):
        present = [g for g in grads if g is not None]
        p.grad = functools.reduce(torch.add, present) if present else None
    return [(logits, loss) for logits, loss, _ in results]


@functools.cache
def _chunk_threads(n: int) -> ThreadPoolExecutor:
    """The ``n`` threads that run a step's chunks at once, started once per process."""
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="wbc-chunk")


def _ema_update(averages: list[torch.Tensor], currents: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
    """One exponential-moving-average step of all weights and buffers of one dtype (``AveragedModel``'s
    ``multi_avg_fn``), with timm's warm-up (decay (1+n)/(10+n) until it reaches config.EMA_DECAY), so that short runs
    average their recent weights, not their initialisation. Integer buffers (batch counts) take the current value.
    One foreach kernel per dtype instead of a Python step per tensor: 9.7 → 4.1 ms for EfficientNet-Lite0. Written
    out because torch's ``get_ema_multi_avg_fn`` takes one fixed decay and has no warm-up."""
    n = float(n_averaged)
    decay = min(config.EMA_DECAY, (1.0 + n) / (10.0 + n))
    if averages[0].is_floating_point():
        torch._foreach_lerp_(averages, currents, 1.0 - decay)
    else:
        torch._foreach_copy_(averages, currents)


@dataclass
class Trainer:
    """What an epoch updates: the network (DDP-wrapped under torchrun), its weight average, optimiser, schedule."""

    model: nn.Module  # the bare WbcClassifier
    network: nn.Module  # what the step calls: ``model`` or its DistributedDataParallel wrapper
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    mixup: v2.MixUp | None = None  # blends each batch (images and one-hot targets) when the recipe asks for it


def _sample_weights(weight: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    """Each image's class weight: its class's, or for mixup's soft targets the blend of its classes' weights."""
    if weight is None:
        return torch.ones(len(targets), device=targets.device)
    return targets @ weight if targets.is_floating_point() else weight[targets]


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The augmentation stream of one process in one epoch under torchrun: differs between processes (they must not
    all draw the same flips), needs no saved state, so a resume at any world size is well defined."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def train_one_epoch(
    trainer: Trainer, loader: DataLoader, epoch: int, epochs: int, seed: int, ctx: distributed.Context
) -> dict[str, float]:
    """One pass over the training split; returns its loss and accuracy over all processes."""
    trainer.model.train()
    if ctx.distributed:
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(_epoch_seed(seed, epoch, ctx.rank))
    seen, correct, loss_sum = 0, 0, 0.0
    weight = getattr(trainer.criterion, "weight", None)
    bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, disable=not ctx.is_main)
    for images, labels in bar:
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        targets = labels
        if trainer.mixup is not None:
            images, targets = trainer.mixup(images, labels)
        batch_weight = None
        if ctx.distributed:
            local = _sample_weights(weight, targets).sum()
            batch_weight = torch.tensor(ctx.sum(float(local))[0] / ctx.world_size, device=ctx.device)
        logits, loss = train_step(
            trainer.network,
            images,
            targets,
            trainer.criterion,
            trainer.optimizer,
            trainer.amp is not None,
            trainer.scaler if trainer.scaler.is_enabled() else None,
            batch_weight,
        )
        trainer.scheduler.step()
        trainer.ema.update_parameters(trainer.model)
        seen += len(labels)
        correct += int((logits.argmax(1) == labels).sum())  # with mixup: against the image's own class
        loss_sum += float(loss.detach()) * len(labels)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    seen, correct, loss_sum = ctx.sum(seen, correct, loss_sum)
    return {"train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}


def _evaluate_split(model: nn.Module, loaded: LoadedImages, criterion: nn.Module) -> tuple[float, dict, torch.Tensor]:
    probs = predict_probs(model, loaded.images, batch_size=eval_batch_size(loaded.images))
    labels = loaded.labels
    loss = float(criterion(torch.log(probs.clamp_min(1e-8)), labels)) if len(labels) else float("nan")
    metrics = compute_metrics(labels.numpy(), probs.argmax(1).numpy(), list(config.CLASSES))
    return loss, metrics, probs


def update_best(best: dict | None, stale: int, row: dict, epochs: int) -> tuple[dict | None, int, bool]:
    """The best-epoch rule: returns (best row, epochs without improvement, whether ``row`` is the new best).

    One-cycle weights of the first half of the run are mid-flight (high learning rate): such an epoch is kept only
    as a stand-in until the annealing half starts; from then on the best validated epoch (macro-F1, then lower loss)
    is kept, and epochs of that half that do not improve count towards early stopping.
    """
    half = epochs // 2
    better = best is not None and (row["val_macro_f1"], -row["val_loss"]) > (best["val_macro_f1"], -best["val_loss"])
    if best is None or (row["epoch"] > half and (best["epoch"] <= half or better)):
        return row, 0, True
    return best, stale + 1 if row["epoch"] > half else stale, False


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint: everything an interrupted run needs to continue exactly
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run stands after an epoch."""

    history: list[dict]
    best: dict | None = None
    stale: int = 0
    epoch: int = 0  # the last finished epoch
    #: the weight average's last layer after each epoch: the real checkpoints TracInCP replays (trust/influence.py)
    heads: list[dict[str, torch.Tensor]] = field(default_factory=list)


def head_checkpoint_tensors(heads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The last-layer checkpoints of epochs 1..best as model-file tensors (``influence.checkpoint<i>.weight|bias``):
    a few KB each, so influence explains the model's real training, not a replay (``trust/influence.py``)."""
    return {f"{HEAD_CHECKPOINT_PREFIX}{i}.{k}": v for i, head in enumerate(heads) for k, v in head.items()}


def checkpoint_state(
    trainer: Trainer, loader: DataLoader, progress: Progress, fingerprint: str, ctx: distributed.Context
) -> dict:
    """The per-epoch checkpoint: weights and their average, optimiser, schedule, both random streams (one process:
    augmentation and shuffling; torchrun derives both from seed and epoch) and the run's progress."""
    state = {
        "model": trainer.model.net.state_dict(),
        "ema": trainer.ema.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "rng": torch.get_rng_state(),
        "history": progress.history,
        "best": progress.best,
        "stale": progress.stale,
        "epoch": progress.epoch,
        "heads": progress.heads,
        "data_fingerprint": fingerprint,
        "world_size": ctx.world_size,
    }
    if not ctx.distributed:
        state["loader_rng"] = loader.generator.get_state()
    if ctx.device.type == "cuda":  # dropout on a GPU draws from its own generator
        state["cuda_rng"] = torch.cuda.get_rng_state(ctx.device)
    return state


def restore_checkpoint(checkpoint: Path, fingerprint: str, trainer: Trainer, loader: DataLoader) -> Progress:
    """Restore an interrupted run from its last per-epoch checkpoint, written by any number of processes, so the
    resumed run repeats what the uninterrupted one would do (exactly, at the same world size).

    ``weights_only=True`` unpickles only tensors and plain containers: a crafted checkpoint cannot run code.
    """
    if not checkpoint.exists():
        raise WbcError(f"--resume: no checkpoint.pt in {checkpoint.parent}; start without --resume")
    not_ours = f"--resume: {checkpoint} is not a checkpoint written by `wbc train` and was not loaded"
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code-carrying pickles, RuntimeError/EOFError for other files
        raise WbcError(f"{not_ours} ({exc.__class__.__name__}); start without --resume") from exc
    if not isinstance(state, dict):
        raise WbcError(f"{not_ours}; start without --resume")
    if state.get("data_fingerprint", fingerprint) != fingerprint:
        raise WbcError(
            f"--resume: {checkpoint} belongs to other data (the images or labels changed since the "
            "interrupted run); start without --resume"
        )
    try:
        trainer.model.net.load_state_dict(state["model"])
        trainer.ema.load_state_dict(state["ema"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:  # checkpoints from before it was saved still resume
            trainer.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if "loader_rng" in state and isinstance(loader.generator, torch.Generator):
            loader.generator.set_state(state["loader_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"], torch.cuda.current_device())
        log.info(f"resuming after epoch {state['epoch']}")
        return Progress(state["history"], state["best"], state["stale"], state["epoch"], state.get("heads", []))
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise WbcError(
            f"--resume: {checkpoint} does not fit this run ({exc.__class__.__name__}): resume with the "
            "same --arch, --img-size and --batch-size, or start without --resume"
        ) from exc


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def weight_average(model: nn.Module) -> AveragedModel:
    """The weights that are validated, saved and shipped: an exponential moving average (batch-norm statistics
    included), which smooths the epoch-to-epoch swings of the last weights on a small dataset; updated every step."""
    return AveragedModel(model, multi_avg_fn=_ema_update, use_buffers=True)


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trained weights, fused: one kernel for all of them (12.9 → 6.3 ms a step for Lite0 on CPU)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=config.WEIGHT_DECAY, fused=True
    )


def _build_trainer(cfg: TrainConfig, train_set: LoadedImages, loader: DataLoader, ctx: distributed.Context) -> Trainer:
    model = prepare_for_cpu(
        build_model(
            cfg.arch, pretrained=cfg.pretrained, freeze_backbone=cfg.freeze_backbone, frozen_stages=cfg.frozen_stages
        )
    ).to(ctx.device)
    ema, optimizer = weight_average(model), make_optimizer(model, cfg.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * len(loader), pct_start=0.15
    )
    weights = class_weights(train_set.labels, len(config.CLASSES)).to(ctx.device)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
    amp = autocast_dtype(ctx.device, cfg.bf16)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp is torch.float16)
    network = model
    if ctx.distributed:
        network = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    mixup = v2.MixUp(alpha=cfg.mixup, num_classes=len(config.CLASSES)) if cfg.mixup > 0 else None
    return Trainer(model, network, ema, optimizer, scheduler, criterion, scaler, amp, mixup)


def _split_digest(split_file: dict) -> str:
    return hashlib.sha256(json.dumps(split_file, sort_keys=True).encode()).hexdigest()


def train(cfg: TrainConfig) -> dict:
    """Train one model; returns the best validation metrics (and test metrics when a test split exists).

    Under torchrun every process calls this; rank 0 returns the result, the others an empty dict.
    """
    run_started = time.perf_counter()
    cfg = resolve(cfg)
    ctx = distributed.setup(distributed.resolve_device(cfg.device))
    try:
        return _train(cfg, ctx, run_started)
    finally:
        ctx.close()


def _train(cfg: TrainConfig, ctx: distributed.Context, run_started: float) -> dict:
    if cfg.batch_size % ctx.world_size:
        raise WbcError(
            f"--batch-size {cfg.batch_size} is one step's batch of all {ctx.world_size} processes and "
            f"must divide evenly among them: use a multiple of {ctx.world_size}"
        )
    if ctx.is_main:
        cfg.out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    with ctx.main_first():  # rank 0 decodes and writes the cache; the others read it
        splits, data_summary = prepare_splits(cfg, cfg.img_size, write=ctx.is_main)
    if ctx.broadcast(_split_digest(splits.split_file)) != _split_digest(splits.split_file):
        raise WbcError(
            f"process {ctx.rank} sees other images in {cfg.data} than process 0: every node needs the "
            "same data folder (shared storage or identical copies)"
        )
    train_set, val_set = splits.loaded["train"], splits.loaded["val"]
    loader = train_loader(train_set, cfg.batch_size, cfg.seed, cfg.augment, ctx)
    trainer = _build_trainer(cfg, train_set, loader, ctx)
    log.info(
        f"{cfg.arch} at {cfg.img_size} px on {ctx.device.type}"
        + (f" × {ctx.world_size} processes" if ctx.distributed else "")
        + f", {'fp32' if trainer.amp is None else str(trainer.amp).removeprefix('torch.') + ' autocast'}: "
        f"{len(train_set.records)} training, {len(val_set.records)} validation, "
        f"{len(splits.loaded['calib'].records)} calibration images"
    )
    eval_criterion = nn.NLLLoss()
    checkpoint_path, model_path = cfg.out / "checkpoint.pt", cfg.out / "model.safetensors"
    fingerprint = splits.split_file["data_fingerprint"]
    progress = restore_checkpoint(checkpoint_path, fingerprint, trainer, loader) if cfg.resume else Progress([])

    started = time.perf_counter() - (progress.history[-1]["seconds"] if progress.history else 0.0)
    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        row = {"epoch": epoch, **train_one_epoch(trainer, loader, epoch, cfg.epochs, cfg.seed, ctx)}
        stop = False
        if ctx.is_main:  # one process validates and decides; its decision is broadcast
            stop = _finish_epoch(
                cfg, trainer, loader, progress, row, splits, data_summary, ctx, started, eval_criterion
            )
        if ctx.broadcast(stop):
            break

    ctx.barrier()
    if not ctx.is_main:
        return {}
    best = progress.best
    result = {
        "best_epoch": best["epoch"],
        "val_accuracy": best["val_accuracy"],
        "val_macro_f1": best["val_macro_f1"],
        "train_seconds": progress.history[-1]["seconds"],
        "world_size": ctx.world_size,
    }
    best_model, best_meta = load_model(model_path)
    calib = splits.loaded["calib"]
    try:
        result["calibration"] = calibrate_loaded(
            model_path,
            prepare_for_cpu(best_model).to(ctx.device),
            best_meta,
            calib,
            f"calibration split of {best_meta['data']['root']} (seed {cfg.seed})",
        )
    except WbcError as exc:  # too few calibration images: the model is still usable, without trust flags
        log.info(f"model saved without calibration: {exc}")
    result["seconds_to_model"] = (
        time.perf_counter() - run_started
    )  # decoding, training, calibration; not the test report
    # written once the run has finished (the model file carries the same settings from its first save on), so that
    # an interrupted run leaves only what --resume needs
    save_recipe(cfg, cfg.out / "args.yaml")
    for name in ("test", "test_b"):
        if name in splits.loaded and splits.loaded[name].records:
            result[name] = _test_report(model_path, splits.loaded[name], cfg.out / name, ctx.device)
    return result


def _finish_epoch(
    cfg: TrainConfig,
    trainer: Trainer,
    loader: DataLoader,
    progress: Progress,
    row: dict,
    splits: Splits,
    data_summary: dict,
    ctx: distributed.Context,
    started: float,
    eval_criterion: nn.Module,
) -> bool:
    """Rank 0 after an epoch: validate the weight average, apply the best-epoch rule, save the model when it is the
    best, write checkpoint, history and curves. Returns whether to stop early."""
    val_loss, val_metrics, _ = _evaluate_split(trainer.ema.module, splits.loaded["val"], eval_criterion)
    row.update(
        {
            "val_loss": val_loss,
            "val_accuracy": val_metrics["accuracy"],
            "val_macro_f1": val_metrics["macro_f1"],
            "seconds": time.perf_counter() - started,
        }
    )
    progress.history.append(row)
    progress.best, progress.stale, improved = update_best(progress.best, progress.stale, row, cfg.epochs)
    progress.epoch = row["epoch"]
    progress.heads.append(
        {k: v.detach().float().cpu().clone() for k, v in trainer.ema.module.last_linear().state_dict().items()}
    )
    log.info(
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
        f"val loss {val_loss:.4f} acc {row['val_accuracy']:.4f} macro-F1 {row['val_macro_f1']:.4f}"
        + ("  (best so far, saved)" if improved else "")
    )
    if improved:
        save_model(
            cfg.out / "model.safetensors",
            trainer.ema.module,
            _metadata(cfg, data_summary, splits, row, trainer, ctx),
            extra=head_checkpoint_tensors(progress.heads),
        )
    state = checkpoint_state(trainer, loader, progress, splits.split_file["data_fingerprint"], ctx)
    atomic_write(cfg.out / "checkpoint.pt", lambda f: torch.save(state, f))
    write_json(cfg.out / "history.json", progress.history)
    plots.training_curves(progress.history, cfg.out / "curves.png")
    if progress.stale >= cfg.patience:
        log.info(f"early stop: no validation improvement for {cfg.patience} epochs")
        return True
    return False


def _test_report(model_path: Path, loaded: LoadedImages, out: Path, device: torch.device | None = None) -> dict:
    """Evaluate the best saved model on a held-out split; writes the usual evaluation files into ``out``."""
    model, meta = load_model(model_path)
    model.to(device or "cpu")
    probs = predict_probs(
        model, loaded.images, batch_size=eval_batch_size(loaded.images), temperature=Calibration.temperature_of(meta)
    ).numpy()
    y_true = loaded.labels.numpy()
    metrics = compute_metrics(y_true, probs.argmax(1), meta["classes"])
    metrics["n_unreadable"] = len(loaded.unreadable)
    metrics["evaluated"] = f"held-out {out.name} split of the training data"
    write_outputs(out, metrics, probs, loaded.records, y_true, meta["classes"])
    log.info(
        f"held-out {out.name}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
        f"({metrics['n_images']} images) → {out}"
    )
    return {k: metrics[k] for k in ("accuracy", "macro_f1", "n_images")}


def _metadata(
    cfg: TrainConfig, data_summary: dict, splits: Splits, best: dict, trainer: Trainer, ctx: distributed.Context
) -> dict:
    return {
        "arch": cfg.arch,
        "classes": list(config.CLASSES),
        "img_size": cfg.img_size,
        "mean": list(config.IMAGENET_MEAN),
        "std": list(config.IMAGENET_STD),
        "input": "RGB in [0, 1], the crop policy's view (crop.py) at img_size × img_size; normalisation is inside the "
        "model",
        "crop": splits.crop.to_meta(),
        "data": {
            **data_summary,
            "seed": cfg.seed,
            "n_train": len(splits.loaded["train"].records),
            "n_val": len(splits.loaded["val"].records),
            "n_calib": len(splits.loaded["calib"].records),
            "calib_fraction": config.CALIB_FRACTION,
            "test_files": splits.split_file.get("test", []),
            "fingerprint": splits.split_file["data_fingerprint"],
        },
        "validation": {k: best[k] for k in ("epoch", "val_accuracy", "val_macro_f1", "val_loss")},
        "training": {
            **plain(asdict(cfg)),
            "bf16": trainer.amp is torch.bfloat16,
            "autocast": str(trainer.amp).removeprefix("torch.") if trainer.amp else "none",
            "device": ctx.device.type,
            "world_size": ctx.world_size,
            "batch_per_process": cfg.batch_size // ctx.world_size,
            "effective_batch_size": cfg.batch_size,
        },
        "test_views": list(cfg.test_views),
        "credit": config.PBC_CREDIT,
        "manifest": run_manifest(),
    }
