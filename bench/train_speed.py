"""Training images/s of wbc's own training step against a naive fp32 eager PyTorch loop, same run, same images.

    python bench/train_speed.py [--data ../shared/datasets/pbc-wbc] [--archs cnn resnet50 efficientnet_lite0]
                                [--per-class 48] [--epochs 1] [--frozen-stages N] [--profile]
                                [--workers N] [--depthwise by-kernel|fp32|bf16] [--chunks at-once|in-turn]
                                # wbc's settings, to measure each one

Both sides train the same model (same initial weights, same frozen stages: by default the default recipe's,
config.DEFAULT_FROZEN_STAGES, i.e. EfficientNet-Lite0's first 4 stages), batch size (config.BATCH_SIZE),
augmentation, loss and optimiser on the same real PBC images, at the architecture's default size
(config.DEFAULT_IMG_SIZE):

* naive: torchvision ``ImageFolder`` + ``transforms`` (every batch decodes its JPEGs with PIL again), fp32, eager,
  default (channels-first) memory layout: the textbook loop.
* wbc: the code path of ``wbc train`` itself: images decoded once (``data.load_images``), batches from
  ``train.train_loader`` (uint8 cache + ``train_transform``; config.TRAIN_LOADER_WORKERS worker processes) and
  ``train.train_step`` (channels_last, bf16 autocast where the CPU supports it, the trained depthwise convolutions'
  kernels chosen by kernel size there, dropout masks from uniforms, frozen batch norms folded into their convolutions,
  the chunks of a step at once on threads of their own: 48 images are two chunks of 24, config.CHUNK_IMAGES), its
  optimiser as built (``train.make_optimizer``: the same AdamW, its fused kernel) and the weight average it updates
  after every step (``train.weight_average``), which the naive loop does not have.

Whole epochs of the two loops alternate (naive, wbc, naive, ...), so background load on a shared machine hits both
alike: only the ratios of one run are meaningful. Each epoch starts a fresh iterator and ends it before the other
loop runs, so wbc's worker never augments during the naive loop's time; its start and its first, not overlapped
batch are charged to wbc in every epoch (in ``wbc train``, once per ~125 batches). Each batch is timed in two parts,
``data`` (waiting for the augmented batch) and ``step`` (forward, backward, optimiser), so the table shows what the
decode-once cache and the worker give and what the step's settings give. The one-time decode of the wbc side is timed
too (it is cached on disk for later runs).

Each architecture runs in a fresh interpreter, as one would train it. The naive loop's speed depends on glibc's
malloc: its fp32 activations are large enough to be handed back to the system and faulted in again each step (4.8
million minor page faults in one seed-CNN run against 1.0 million with the thresholds below), while wbc's bf16 chunks
mostly are not. For the comparison of computation alone, give both loops an allocator that keeps its memory:
``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python bench/train_speed.py``.
``--profile`` prints torch.profiler's top operators for one wbc step per architecture.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import multiprocessing
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# isort: off
import wbc_trust  # noqa: F401  (before torch: it sets OpenMP's wait policy, config.OMP_WAIT_POLICY)

# isort: on
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from wbc_trust import config
from wbc_trust.data import LoadedImages, Record, find_dataset, load_images
from wbc_trust.models import bf16_supported, build_model, prepare_for_cpu
from wbc_trust.train import class_weights, make_optimizer, train_loader, train_step, weight_average


def pick_images(data: Path, per_class: int) -> list[Record]:
    """``per_class`` images of each class, spread over the whole class folder (sorted names, even stride)."""
    records = find_dataset(data).splits["all"]
    picked: list[Record] = []
    for label in range(len(config.CLASSES)):
        own = [r for r in records if r.label == label and not r.path.name.startswith(".")]
        picked += own[:: max(1, len(own) // per_class)][:per_class]
    return picked


def naive_loader(records: list[Record], size: int, batch_size: int, seed: int, folder: Path) -> DataLoader:
    """The textbook pipeline: ImageFolder (PIL decode on every access) + torchvision.transforms, same augmentation."""
    for r in records:
        link = folder / config.CLASSES[r.label] / r.path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(r.path)
    augment = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.RandomAffine(
                config.AUG_ROTATION_DEG,
                translate=(config.AUG_SHIFT, config.AUG_SHIFT),
                scale=(1 - config.AUG_ZOOM, 1 + config.AUG_ZOOM),
            ),
            transforms.RandomHorizontalFlip(),
            transforms.RandomVerticalFlip(),
            transforms.ColorJitter(brightness=config.AUG_BRIGHTNESS),
            transforms.ToTensor(),
        ]
    )
    dataset = datasets.ImageFolder(str(folder), transform=augment)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed)
    )


def naive_step(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, criterion: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """The textbook fp32 eager step (the baseline; wbc's own step is ``train.train_step``)."""
    loss = criterion(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@dataclass
class Timing:
    """What one loop spent: seconds waiting for batches and in steps, over its timed images and batches."""

    data_s: float = 0.0
    step_s: float = 0.0
    images: int = 0
    n_batches: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / (self.data_s + self.step_s)

    def columns(self) -> str:
        """ms per batch for data and step, then images/s."""
        n = self.n_batches
        return f"{1000 * self.data_s / n:>8.0f} {1000 * self.step_s / n:>7.0f} {self.images_per_s:>6.1f}"


class Side:
    """One training loop under test: its batches, its step, and the time spent in each."""

    def __init__(self, loader: DataLoader, step) -> None:
        self.loader, self.step = loader, step
        self.timing = Timing()

    def run_epoch(self, timed: bool, max_batches: int | None = None) -> None:
        """One epoch (or its first ``max_batches``) from a fresh iterator, ended (workers stopped) before returning;
        starting and ending it count as data time."""
        t = self.timing
        t0 = time.perf_counter()
        batches = iter(self.loader)
        for images, labels in itertools.islice(batches, max_batches):
            t1 = time.perf_counter()
            self.step(images, labels)
            t2 = time.perf_counter()
            if timed:
                t.data_s += t1 - t0
                t.step_s += t2 - t1
                t.images += len(labels)
                t.n_batches += 1
            t0 = time.perf_counter()
        del batches  # stops the workers
        if timed:
            t.data_s += time.perf_counter() - t0


def bench_arch(
    arch: str, records: list[Record], loaded: LoadedImages, size: int, args: argparse.Namespace, folder: Path
) -> tuple[Timing, Timing]:
    """Time interleaved batches of the naive loop and wbc's loop for one architecture."""
    use_bf16 = bf16_supported()
    torch.manual_seed(config.SEED)
    # random init (weights do not change the speed), the recipe's frozen stages (they do: no backward through them)
    naive_model = build_model(arch, frozen_stages=frozen_stages(arch, args))
    wbc_model = prepare_for_cpu(copy.deepcopy(naive_model))
    criterion = nn.CrossEntropyLoss(
        weight=class_weights(loaded.labels, len(config.CLASSES)), label_smoothing=config.LABEL_SMOOTHING
    )

    trained = [p for p in naive_model.parameters() if p.requires_grad]
    naive_opt = torch.optim.AdamW(trained, lr=config.LEARNING_RATE, weight_decay=config.WEIGHT_DECAY)
    wbc_opt, wbc_average = make_optimizer(wbc_model, config.LEARNING_RATE), weight_average(wbc_model)

    def wbc_step(images: torch.Tensor, labels: torch.Tensor) -> None:
        """What ``wbc train`` does for each batch: its step, then its weight average."""
        train_step(wbc_model, images, labels, criterion, wbc_opt, use_bf16)
        wbc_average.update_parameters(wbc_model)

    naive_model.train()
    wbc_model.train()
    naive = Side(
        naive_loader(records, size, config.BATCH_SIZE, config.SEED, folder),
        lambda x, y: naive_step(naive_model, x, y, criterion, naive_opt),
    )
    wbc = Side(
        train_loader(loaded, config.BATCH_SIZE, config.SEED),
        wbc_step,
    )
    for side in (naive, wbc):  # the first batches build oneDNN's kernels: not timed
        side.run_epoch(timed=False, max_batches=args.warmup)
    for _ in range(args.epochs):
        naive.run_epoch(timed=True)
        wbc.run_epoch(timed=True)
    if args.profile:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wbc.run_epoch(timed=False, max_batches=1)
        print(f"\n{arch}: one wbc training step, top operators by own CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return naive.timing, wbc.timing


def frozen_stages(arch: str, args: argparse.Namespace) -> int:
    """``--frozen-stages``, by default the default recipe's for this architecture."""
    return config.DEFAULT_FROZEN_STAGES.get(arch, 0) if args.frozen_stages is None else args.frozen_stages


def machine() -> str:
    """CPU model, cores, torch and its threads, and whether bf16 runs natively."""
    model = platform.processor() or "?"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            model,
        )
    return (
        f"{model}, {os.cpu_count()} CPU threads, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"native bf16: {bf16_supported()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(OpenMP default)')}"
    )


def measure(arch: str, args: argparse.Namespace) -> tuple[Timing, Timing, float]:
    """One architecture's two loops (naive, wbc) and wbc's one-time decode per image, in the process that calls it."""
    config.TRAIN_LOADER_WORKERS, config.CPU_TRAINED_DEPTHWISE = args.workers, args.depthwise
    config.CPU_CHUNKS_AT_ONCE = args.chunks == "at-once"
    records = pick_images(args.data, args.per_class)
    size = config.DEFAULT_IMG_SIZE[arch]
    t0 = time.perf_counter()
    loaded = load_images(records, size, cache=False)
    decode_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="wbc-naive-") as folder:
        naive, wbc = bench_arch(arch, loaded.records, loaded, size, args, Path(folder))
    return naive, wbc, decode_s / len(loaded.records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/pbc-wbc"))
    parser.add_argument("--archs", nargs="+", default=["cnn", "resnet50", "efficientnet_lite0"])
    parser.add_argument("--per-class", type=int, default=48, help="images per class (default 48: 240 images)")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per loop and architecture (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first (kernel creation)")
    parser.add_argument(
        "--frozen-stages", type=int, help="stages kept fixed on both sides (default: the default recipe's per arch)"
    )
    parser.add_argument("--profile", action="store_true", help="print the top operators of one wbc step per arch")
    parser.add_argument(
        "--workers",
        type=int,
        default=config.TRAIN_LOADER_WORKERS,
        help="wbc loader workers (config.TRAIN_LOADER_WORKERS)",
    )
    parser.add_argument(
        "--depthwise",
        choices=("by-kernel", "fp32", "bf16"),
        default=config.CPU_TRAINED_DEPTHWISE,
        help="wbc's trained depthwise convolutions under bf16 autocast (config.CPU_TRAINED_DEPTHWISE)",
    )
    parser.add_argument(
        "--chunks",
        choices=("at-once", "in-turn"),
        default="at-once" if config.CPU_CHUNKS_AT_ONCE else "in-turn",
        help="wbc's step chunks on threads of their own at once, or one after another (config.CPU_CHUNKS_AT_ONCE)",
    )
    args = parser.parse_args()

    print(f"machine: {machine()}")
    print(f"load average at start: {os.getloadavg()[0]:.1f} (shared machine: compare ratios, not absolute speeds)")
    rows = []
    for arch in args.archs:
        # each architecture in a fresh interpreter: the naive loop's fp32 activations are large enough that glibc's
        # malloc hands them back to the system and faults them in again every step, and how much it does depends on
        # what the process allocated before (its thresholds adapt), so the row of an architecture measured after
        # resnet50 in the same process had a naive loop up to 1.8x faster than the same loop on its own
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as fresh:
            naive, wbc, decode_per_image = fresh.submit(measure, arch, args).result()
        rows.append((arch, config.DEFAULT_IMG_SIZE[arch], naive, wbc, decode_per_image))
        print(f"{arch}: naive {naive.images_per_s:.1f} images/s, wbc {wbc.images_per_s:.1f} images/s", flush=True)

    print(
        f"\n{len(config.CLASSES) * args.per_class} real PBC images, batch {config.BATCH_SIZE}, {args.epochs} timed epoch(s) per loop "
        f"(alternating); wbc: {args.workers} loader worker(s), depthwise {args.depthwise}, chunks {args.chunks}; ms "
        "per batch split into data (waiting for the augmented batch) and step (forward + backward + AdamW)"
    )
    header = (
        f"{'arch':<19}{'px':>4}{'frozen':>7}  {'naive data':>10} {'step':>7} {'img/s':>6}  {'wbc data':>8} {'step':>7} "
        f"{'img/s':>6}  {'speed-up':>8}  {'step x':>6}  {'decode once':>14}"
    )
    print(header)
    print("-" * len(header))
    ratios = []
    for arch, size, naive, wbc, decode_per_image in rows:
        ratio = wbc.images_per_s / naive.images_per_s
        ratios.append(ratio)
        print(
            f"{arch:<19}{size:>4}{frozen_stages(arch, args):>7}  {naive.columns():>25}  {wbc.columns():>23}  "
            f"{ratio:>7.2f}x  {naive.step_s / wbc.step_s:>5.2f}x  {1000 * decode_per_image:>7.1f} ms/img"
        )
    print("(step x: forward+backward speed-up alone; decode once: wbc's one-time decode per image, cached on disk)")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    print(f"train speed-up vs naive: {min(ratios):.2f}x")


if __name__ == "__main__":
    main()
