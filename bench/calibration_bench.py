"""Every target of the calibration item on images the model never saw, with the command that measures it.

    python bench/calibration_bench.py [--model M] [--out runs/calibration_bench] [--datasets ../shared/datasets]

1. PBC white cells of the model's held-out test split (``wbc trust calibration`` picks it from the model's metadata):
   ECE before/after temperature scaling (target after ≤ 1.5 %), coverage of the 95 % prediction sets (94–97 %) and
   their mean size (≤ 1.1), OOD AUROC against ``pbc-non-wbc`` erythroblasts and platelets (≥ 0.95), plus the AUROC of
   two logit-based scores (energy, maximum softmax probability) for comparison with the Mahalanobis score.
2. Cross-lab: ``bccd-wbc`` (another microscope, stain and camera): accuracy, share of images not flagged (≥ 25 %) and
   accuracy on them (≥ 90 %).
The model must carry a calibration (``wbc calibrate MODEL --data ../shared/datasets/pbc-wbc``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from wbc_trust.data import Record, find_dataset, list_files, load_images
from wbc_trust.io import write_json
from wbc_trust.evaluate import choose_records
from wbc_trust.modelfile import load_model
from wbc_trust.models import logits_and_features
from wbc_trust.ood import OOD_SCORES
from wbc_trust.trust.calibration import run_calibration


def logit_score_aurocs(model_path: Path | None, pbc: Path, non_wbc: Path) -> dict[str, float]:
    """AUROC of the energy score (-logsumexp of the logits) and of 1 - max softmax (``ood.OOD_SCORES``) on the same
    two image sets."""
    model, meta = load_model(model_path)
    white = load_images(choose_records(find_dataset(pbc), meta).records, meta["img_size"]).images
    other = load_images([Record(p, None) for p in list_files(non_wbc)], meta["img_size"]).images
    logits = [logits_and_features(model, images, progress=True)[0] for images in (white, other)]
    truth = np.r_[np.zeros(len(white)), np.ones(len(other))]
    scores = {name: [OOD_SCORES[name]().score(x, None) for x in logits] for name in ("energy", "max_softmax")}
    return {name: float(roc_auc_score(truth, torch.cat(pair).numpy())) for name, pair in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model file; default: the shipped model")
    parser.add_argument("--out", type=Path, default=Path("runs/calibration_bench"))
    parser.add_argument("--datasets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets")
    args = parser.parse_args()
    pbc, non_wbc, bccd = (args.datasets / name for name in ("pbc-wbc", "pbc-non-wbc", "bccd-wbc"))

    unseen = run_calibration(args.model, pbc, args.out / "pbc", ood_data=non_wbc)
    if "temperature" not in unseen:
        raise SystemExit(unseen["note"])
    cross = run_calibration(args.model, bccd, args.out / "bccd")
    baselines = logit_score_aurocs(args.model, pbc, non_wbc)

    rows = [
        ("PBC unseen: ECE before temperature scaling", unseen["ece_before"], None),
        ("PBC unseen: ECE after (target ≤ 1.5 %)", unseen["ece_after"], unseen["ece_after"] <= 0.015),
        ("PBC unseen: coverage of 95 % sets (target 94–97 %)", unseen["conformal"]["coverage"],
         0.94 <= unseen["conformal"]["coverage"] <= 0.97),
        ("PBC unseen: mean set size (target ≤ 1.1)", unseen["conformal"]["mean_set_size"],
         unseen["conformal"]["mean_set_size"] <= 1.1),
        ("PBC unseen: white cells flagged out-of-distribution", unseen["ood"]["flagged"], None),
        ("OOD AUROC, Mahalanobis (target ≥ 0.95)", unseen["ood"]["auroc"], unseen["ood"]["auroc"] >= 0.95),
        ("OOD AUROC, energy score (comparison)", baselines["energy"], None),
        ("OOD AUROC, max softmax (comparison)", baselines["max_softmax"], None),
        ("pbc-non-wbc images flagged out-of-distribution", unseen["ood"]["ood_images_flagged"], None),
        ("BCCD: accuracy", cross["accuracy"], None),
        ("BCCD: flagged out-of-distribution", cross["flags"]["out_of_distribution"], None),
        ("BCCD: flagged uncertain", cross["flags"]["uncertain"], None),
        ("BCCD: unflagged (target ≥ 25 %)", cross["flags"]["unflagged"], cross["flags"]["unflagged"] >= 0.25),
        ("BCCD: accuracy of unflagged (target ≥ 90 %)", cross["flags"]["accuracy_unflagged"],
         (cross["flags"]["accuracy_unflagged"] or 0) >= 0.90),
    ]
    print(f"\nmodel: {args.model or 'shipped default'}, temperature {unseen['temperature']:.3f}; "
          f"{unseen['evaluated']}; BCCD: {cross['n_images']} images")
    for name, value, passed in rows:
        shown = "—" if value is None else f"{value:.4f}" if "AUROC" in name or "size" in name else f"{value:.2%}"
        print(f"  {name:55s} {shown:>9s}  {'' if passed is None else 'PASS' if passed else 'FAIL'}")
    summary = {"pbc_unseen": unseen, "bccd": cross, "logit_score_auroc": baselines}
    write_json(args.out / "bench.json", summary)
    print(f"figures and JSON: {args.out}/pbc, {args.out}/bccd, {args.out}/bench.json\n"
          f"command: python bench/calibration_bench.py{' --model ' + str(args.model) if args.model else ''}")


if __name__ == "__main__":
    main()
