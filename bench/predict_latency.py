"""Prediction speed of the default model, in one run on this machine:

1. latency of one image (a 360×363 PBC JPEG as bytes, the app's input): ``Predictor.predict_bytes``, and the app's
   whole per-image work (predict + Grad-CAM overlay + display thumbnail, ``wbc_trust.app.analyse``): p50 and p95;
2. folder throughput (images/s): ``Predictor.predict_files`` (batched, channels_last, bf16 where the CPU has it)
   against a naive per-image loop (PIL open → torchvision ToTensor → fp32 eager forward, one image at a time) over
   the same files with the same weights and the same test-time views (``model.predict``).

    python bench/predict_latency.py [--repeats 100] [--folder DIR]

Target (issue 5): p50 of predict + Grad-CAM ≤ 100 ms on 2 cores.
"""

from __future__ import annotations

import argparse
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
from wbc_trust.data import find_unlabelled
from wbc_trust.modelfile import load_model

WARMUP = 5


def percentiles(fn, repeats: int, desc: str) -> tuple[float, float]:
    """p50 and p95 wall time of ``fn()`` in milliseconds, after a few warm-up calls (oneDNN builds kernels lazily)."""
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        start = time.perf_counter()
        fn()
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
    parser.add_argument("--repeats", type=int, default=100, help="timed calls per latency figure")
    parser.add_argument("--folder", type=Path, default=config.SAMPLE_DATA_DIR, help="images for the throughput test")
    args = parser.parse_args()

    image = sorted((config.SAMPLE_DATA_DIR / "neutrophil").iterdir())[0]
    data = image.read_bytes()
    width, height = Image.open(image).size
    loaded = load_model_for_app(config.DEFAULT_MODEL_PATH)
    predictor = loaded.predictor
    rows = [
        ("predict, one image", *percentiles(lambda: predictor.predict_bytes(data), args.repeats, "predict")),
        (
            "predict + Grad-CAM, one image",
            *percentiles(lambda: analyse(loaded, image.name, data), args.repeats, "predict + Grad-CAM"),
        ),
    ]

    paths = find_unlabelled([args.folder])
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
        f"{torch.get_num_threads()} threads; one image = {image.name} ({width}×{height}), {args.repeats} runs"
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
