"""Headline numbers of the robustness, Grad-CAM and Fisher methods on real held-out PBC cells, with their run times.

    python bench/trust_methods.py [--model M] [--data DIR] [--max-images N] [--out DIR]

By default: the shipped model on ../shared/datasets/pbc-wbc, which is its training folder, so only its held-out test
split is used (``--max-images`` takes a stratified subset of it). Also times ``gradcam_overlay`` on one image
(p50 of 20 calls), the function the app calls for every upload.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from wbc_trust import config
from wbc_trust.evaluate import load_test_images
from wbc_trust.modelfile import load_model
from wbc_trust.trust.fisher import run_fisher
from wbc_trust.trust.gradcam import gradcam_overlay, run_gradcam
from wbc_trust.trust.robustness import run_robustness

PBC = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "pbc-wbc"


def timed(fn, *args, **kwargs) -> tuple[dict, float]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def overlay_latency_ms(model_path: Path | None, data: Path, repeats: int = 20) -> float:
    """Median wall time of one ``gradcam_overlay`` call (its default method, predicted class) after two warm-up calls."""
    model, meta = load_model(model_path)
    image = load_test_images(meta, data, max_images=1).images[0]
    times = []
    for i in range(repeats + 2):
        started = time.perf_counter()
        gradcam_overlay(model, image)
        if i >= 2:
            times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=PBC if PBC.exists() else config.SAMPLE_DATA_DIR)
    parser.add_argument("--max-images", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench_out/trust_methods"))
    args = parser.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))

    robustness, t_rob = timed(run_robustness, [args.model], args.data, args.out / "robustness", args.max_images)
    gradcam, t_cam = timed(run_gradcam, args.model, args.data, args.out / "gradcam", args.max_images)
    fisher, t_fis = timed(run_fisher, args.model, args.data, args.out / "fisher", args.max_images)
    latency = overlay_latency_ms(args.model, args.data)

    row = robustness["comparison"][0]
    print(f"\nimages: {row['n_images']} ({robustness['models'][0]['data']})")
    print(
        f"robustness ({t_rob:.0f} s): clean {row['clean']:.1%}, mean over corruptions×severities "
        f"{row['mean_corruption']:.1%}, worst {row['worst_corruption']}"
    )
    for name, curve in robustness["models"][0]["corruptions"].items():
        print(f"  {name:16s} severity 0-5: " + " ".join(f"{a:.1%}" for a in curve["accuracy"]))
    for name, curve in robustness["models"][0]["attacks"].items():
        print(
            f"  {name:16s} eps {', '.join(f'{e * 255:g}' for e in curve['epsilon'])}/255: "
            + " ".join(f"{a:.1%}" for a in curve["accuracy"])
        )
    faith = gradcam["faithfulness"]["scores"]
    print(
        f"Grad-CAM ({t_cam:.0f} s, {gradcam['n_check_images']} check images): ROAD "
        + ", ".join(f"{m} {s['mean']:.3f}" for m, s in faith.items())
    )
    for method, check in gradcam["model_randomisation"]["methods"].items():
        print(
            f"  randomisation check {method}: mean Spearman {check['spearman_mean']:.3f} "
            f"({'passes' if check['passes'] else 'FAILS'}: maps must differ, threshold "
            f"{gradcam['model_randomisation']['pass_if_mean_below']})"
        )
    print(
        f"Fisher ({t_fis:.0f} s, {fisher['n_wrong']} wrong of {fisher['n_images']}): empirical Fisher trace "
        f"{fisher['empirical_fisher_trace']:.4g}; AUROC wrong vs right "
        + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in fisher["auroc_wrong_vs_right"].items())
    )
    print(f"gradcam_overlay, one image, p50 of 20: {latency:.0f} ms")
    print(f"files: {args.out}/")


if __name__ == "__main__":
    main()
