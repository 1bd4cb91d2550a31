"""Prediction speed of the default model, in one run on this machine:

1. latency of one image (JPEG bytes, the app's input; each call another image of ``--folder``, new to the finder):
   ``Predictor.predict_bytes``, and the app's whole per-image work (predict + Grad-CAM overlay + display thumbnail,
   ``wbc_trust.app.analyse``): p50 and p95;
2. folder throughput (images/s): ``Predictor.predict_files`` (the folder's scale measured, each image's cell found
   and cut, batched, channels_last, bf16 where the CPU has it) against a naive per-image loop (PIL open → resize of
   the whole frame → torchvision ToTensor → fp32 eager forward, one image at a time: no finder, so not the same work
   for a cell-view model) over the same files with the same weights and test-time views (``model.predict``).

    python bench/predict_latency.py [--repeats 100] [--folder DIR]

Target (issue 5): p50 of predict + Grad-CAM ≤ 100 ms on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor
from tqdm import tqdm

from wbc_trust import config
from wbc_trust.app import analyse, load_model_for_app
from wbc_trust.crop import shared_finder
from wbc_trust.data import find_unlabelled
from wbc_trust.modelfile import load_model

WARMUP = 5


def percentiles(fn, images: list[bytes], desc: str) -> tuple[float, float]:
    """p50 and p95 wall time of ``fn(image)`` in milliseconds, each call on another image (as each upload to the app
    is), after a few warm-up calls (oneDNN builds kernels lazily). The finder starts with nothing remembered
    (``CellFinder.find`` keeps results by pixel content: the same image again would skip its search)."""
    shared_finder.cache_clear()
    for image in images[:WARMUP]:
        fn(image)
    times = []
    for image in tqdm(images[WARMUP:], desc=desc, leave=False):
        start = time.perf_counter()
        fn(image)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


@torch.no_grad()
def naive_loop(model: torch.nn.Module, paths: list[Path], size: int) -> list[int]:
    """The per-image loop a first script would write: decode, resize, one fp32 forward pass (of the model's test
    views) per file."""
    answers = []
    for path in tqdm(paths, desc="naive loop", leave=False):
        image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        answers.append(int(model.predict(to_tensor(image)[None])[0].argmax()))
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=100, help="timed calls (images) per latency figure")
    parser.add_argument("--folder", type=Path, default=config.SAMPLE_DATA_DIR, help="images for the throughput test")
    args = parser.parse_args()

    paths = find_unlabelled([args.folder])
    images = [p.read_bytes() for p in paths[: WARMUP + args.repeats]]
    sizes = {Image.open(io.BytesIO(data)).size for data in images}
    loaded = load_model_for_app(config.DEFAULT_MODEL_PATH)
    predictor = loaded.predictor
    rows = [
        ("predict, one image", *percentiles(predictor.predict_bytes, images, "predict")),
        (
            "predict + Grad-CAM, one image",
            *percentiles(lambda data: analyse(loaded, "upload.jpg", data), images, "predict + Grad-CAM"),
        ),
    ]

    shared_finder.cache_clear()
    start = time.perf_counter()
    batched = predictor.predict_files(paths)
    batched_rate = len(paths) / (time.perf_counter() - start)
    naive_model, _ = load_model(None)
    start = time.perf_counter()
    naive = naive_loop(naive_model, paths, predictor.img_size)
    naive_rate = len(paths) / (time.perf_counter() - start)
    agree = np.mean([predictor.classes[n] == b.prediction for n, b in zip(naive, batched)])

    print(
        f"\ndefault model ({predictor.meta['arch']}, {predictor.img_size} px, test views "
        f"{'+'.join(naive_model.views)}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; one image = each of {args.repeats} images of {args.folder} in turn "
        f"({', '.join(f'{w}×{h}' for w, h in sorted(sizes))})"
    )
    print(f"{'latency':<34}{'p50 ms':>10}{'p95 ms':>10}")
    for name, p50, p95 in rows:
        print(f"{name:<34}{p50:>10.1f}{p95:>10.1f}")
    print(f"\nfolder of {len(paths)} images ({args.folder})")
    print(f"{'throughput':<34}{'images/s':>10}")
    print(f"{'wbc predict (Predictor.predict_files)':<34}{batched_rate:>10.1f}")
    print(f"{'naive per-image fp32 loop':<34}{naive_rate:>10.1f}")
    print(f"speed-up {batched_rate / naive_rate:.1f}x; same class for {agree:.1%} of images")
    print(f"\ncommand: python {shlex.join(sys.argv)}")
    print(f"predict + Grad-CAM p50: {rows[1][1]:.1f} ms (target ≤ 100 ms)")


if __name__ == "__main__":
    main()
