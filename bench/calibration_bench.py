"""Every target of the calibration item on images the model never saw, with the command that measures it.

    python bench/calibration_bench.py [--model M] [--out runs/calibration_bench] [--datasets ../shared/datasets]
    python bench/calibration_bench.py --compare     # LAC / APS / RAPS on the validation split (chooses the score)

1. PBC white cells of the model's held-out test split (``wbc trust calibration`` picks it from the model's metadata):
   ECE before/after temperature scaling (target after ≤ 1.5 %), OOD AUROC against ``pbc-non-wbc`` erythroblasts and
   platelets (≥ 0.95), plus the AUROC of two logit-based scores (energy, maximum softmax probability) for comparison.
2. Prediction sets on the same test split, at the model's coverage and at 0.99 and 0.995: no empty set, every class's
   coverage within 2 points of the target, mean set size, and the share of wrong top-1 answers whose set holds two
   or more classes (so the set warns).
3. Cross-lab: ``bccd-wbc`` (another microscope, stain and camera): accuracy, share of images not flagged (≥ 25 %) and
   accuracy on them (≥ 90 %).
``--compare`` measures instead, on the model's validation split only (never the test split), marginal LAC (the sets
before class-conditional ones) and class-conditional LAC, APS and RAPS: 5 folds stratified by class, each fold's sets
fitted (temperature included) on the other four, repeated over 10 random fold draws; per-class coverage and mean size.
The model must carry a calibration (``wbc calibrate MODEL --data ../shared/datasets/pbc-wbc``).
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from wbc_trust import config
from wbc_trust.calibration import fit_temperature
from wbc_trust.conformal import SCORES, MondrianConformal, SplitConformal
from wbc_trust.crop import CropPolicy
from wbc_trust.data import Record, find_dataset, list_files, load_images, model_labels, validation_split
from wbc_trust.evaluate import choose_records
from wbc_trust.io import write_json
from wbc_trust.modelfile import load_model
from wbc_trust.models import logits_and_features
from wbc_trust.ood import OOD_SCORES
from wbc_trust.trust.calibration import run_calibration


def logit_score_aurocs(model_path: Path | None, pbc: Path, non_wbc: Path) -> dict[str, float]:
    """AUROC of the energy score (-logsumexp of the logits) and of 1 - max softmax (``ood.OOD_SCORES``) on the same
    two image sets."""
    model, meta = load_model(model_path)
    white = load_images(choose_records(find_dataset(pbc), meta).records, CropPolicy.from_meta(meta)).images
    other = load_images([Record(p, None) for p in list_files(non_wbc)], CropPolicy.from_meta(meta)).images
    logits = [logits_and_features(model, images, progress=True)[0] for images in (white, other)]
    truth = np.r_[np.zeros(len(white)), np.ones(len(other))]
    scores = {name: [OOD_SCORES[name]().score(x, None) for x in logits] for name in ("energy", "max_softmax")}
    return {name: float(roc_auc_score(truth, torch.cat(pair).numpy())) for name, pair in scores.items()}


#: Coverages the bench measures the sets at, besides the model's own.
COVERAGES: tuple[float, ...] = (0.99, 0.995)


def cross_fitted_sets(
    logits: torch.Tensor,
    labels: torch.Tensor,
    method: str,
    coverage: float,
    folds: int,
    seed: int,
    floor: float = config.CONFORMAL_FLOOR,
) -> torch.Tensor:
    """Sets of every image from a calibration (temperature and conformal scores) fitted on the other folds; folds
    are stratified by class so that each holds the same share of every class. ``method``: "marginal" or a score."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    for k in labels.unique():
        members = (labels == k).nonzero().flatten()
        fold[members[torch.randperm(len(members), generator=generator)]] = torch.arange(len(members)) % folds
    sets = torch.zeros(len(labels), logits.shape[1], dtype=torch.bool)
    for f in range(folds):
        fit, held = fold != f, fold == f
        probs = torch.softmax(logits / fit_temperature(logits[fit], labels[fit]), 1)
        conformal = (
            SplitConformal.fit(probs[fit], labels[fit], coverage)
            if method == "marginal"
            else MondrianConformal.fit(probs[fit], labels[fit], coverage, method, floor)
        )
        sets[held] = conformal.sets(probs[held])
    return sets


def compare_scores(
    model_path: Path | None, pbc: Path, coverages: tuple[float, ...], folds: int = 5, repeats: int = 10
) -> list[dict]:
    """Per method and coverage, averaged over ``repeats`` fold draws: per-class coverage, mean set size, share of
    empty and of multi-class sets, on the model's validation split."""
    model, meta = load_model(model_path)
    loaded, fitted_on = validation_split(meta, pbc)
    labels = torch.from_numpy(model_labels(loaded.records, meta["classes"]))
    logits, _ = logits_and_features(model, loaded.images, progress=True)
    wrong = logits.argmax(1) != labels
    # a class with too few images for a coverage joins every set (and the table shows it); one warning per fit is noise
    logging.getLogger("wbc_trust.conformal").setLevel(logging.ERROR)
    print(f"{fitted_on}: {len(labels)} images, per class {torch.bincount(labels).tolist()}, {int(wrong.sum())} wrong")
    methods = [
        ("marginal LAC (sets before)", "marginal", math.inf),
        (f"class-conditional LAC, no {config.CONFORMAL_FLOOR:.0%} floor", "lac", math.inf),
        *((f"class-conditional {score.upper()}", score, config.CONFORMAL_FLOOR) for score in SCORES),
    ]
    rows = []
    for coverage in coverages:
        for name, method, floor in methods:
            draws = [cross_fitted_sets(logits, labels, method, coverage, folds, seed, floor) for seed in range(repeats)]
            per_class = np.mean(
                [[float(s[labels == k, k].float().mean()) for k in range(len(meta["classes"]))] for s in draws], 0
            )
            rows.append(
                {
                    "coverage": coverage,
                    "method": name,
                    "per_class": dict(zip(meta["classes"], per_class)),
                    "min_class_coverage": float(per_class.min()),
                    "mean_set_size": float(np.mean([s.sum(1).float().mean() for s in draws])),
                    "empty": float(np.mean([(s.sum(1) == 0).float().mean() for s in draws])),
                    "multi": float(np.mean([(s.sum(1) >= 2).float().mean() for s in draws])),
                    "wrong_in_multi": float(np.mean([(s[wrong].sum(1) >= 2).float().mean() for s in draws])),
                }
            )
    return rows


def set_rows(summary: dict) -> list[tuple[str, float | None, bool | None]]:
    """Bench rows for the prediction sets at one coverage: empty sets, each class within 2 points, sizes, wrong
    answers in multi-class sets."""
    target = summary["coverage_target"]
    worst = max(summary["per_class"].items(), key=lambda kv: abs(kv[1]["coverage"] - target))
    label = f"sets at {target:.1%}"
    return [
        (f"{label}: empty sets (target 0)", summary["empty"], summary["empty"] == 0),
        (f"{label}: coverage", summary["coverage"], None),
        (
            f"{label}: worst class, {worst[0]} (target ±2 points)",
            worst[1]["coverage"],
            abs(worst[1]["coverage"] - target) <= 0.02,
        ),
        (f"{label}: mean set size", summary["mean_set_size"], None),
        (f"{label}: sets of ≥ 2 classes", 1 - summary["set_size_share"]["1"] - summary["empty"], None),
        (
            f"{label}: wrong top-1 in sets of ≥ 2 ({summary['wrong_top1']} wrong)",
            summary["wrong_in_multi_class_sets"],
            None,
        ),
    ]


def print_comparison(rows: list[dict], classes: list[str]) -> None:
    """The comparison as a Markdown table (docs/trust.md's)."""
    print("| coverage | sets | " + " | ".join(classes) + " | mean size | ≥ 2 classes | empty | wrong top-1 in ≥ 2 |")
    print("|---" * (len(classes) + 6) + "|")
    for r in rows:
        print(
            f"| {r['coverage']:.1%} | {r['method']} | "
            + " | ".join(f"{r['per_class'][c]:.2%}" for c in classes)
            + f" | {r['mean_set_size']:.3f} | {r['multi']:.2%} | {r['empty']:.2%} | {r['wrong_in_multi']:.0%} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model file; default: the shipped model")
    parser.add_argument("--out", type=Path, default=Path("runs/calibration_bench"))
    parser.add_argument("--datasets", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets")
    parser.add_argument("--compare", action="store_true", help="compare LAC, APS and RAPS on the validation split")
    args = parser.parse_args()
    pbc, non_wbc, bccd = (args.datasets / name for name in ("pbc-wbc", "pbc-non-wbc", "bccd-wbc"))

    if args.compare:
        compared = compare_scores(args.model, pbc, (0.95, *COVERAGES))
        print_comparison(compared, list(config.CLASSES))
        write_json(args.out / "compare.json", {"rows": compared})
        print(
            f"JSON: {args.out}/compare.json\ncommand: python bench/calibration_bench.py --compare"
            f"{' --model ' + str(args.model) if args.model else ''}"
        )
        return
    model_coverage = load_model(args.model)[1]["calibration"]["conformal"]["coverage"]
    unseen = run_calibration(
        args.model, pbc, args.out / "pbc", ood_data=non_wbc, coverages=[c for c in COVERAGES if c != model_coverage]
    )
    if "temperature" not in unseen:
        raise SystemExit(unseen["note"])
    cross = run_calibration(args.model, bccd, args.out / "bccd")
    baselines = logit_score_aurocs(args.model, pbc, non_wbc)

    rows = [
        ("PBC unseen: ECE before temperature scaling", unseen["ece_before"], None),
        ("PBC unseen: ECE after (target ≤ 1.5 %)", unseen["ece_after"], unseen["ece_after"] <= 0.015),
        *(row for sets in (unseen["conformal"], *unseen["conformal_at"].values()) for row in set_rows(sets)),
        ("PBC unseen: white cells flagged out-of-distribution", unseen["ood"]["flagged"], None),
        ("OOD AUROC, Mahalanobis (target ≥ 0.95)", unseen["ood"]["auroc"], unseen["ood"]["auroc"] >= 0.95),
        ("OOD AUROC, energy score (comparison)", baselines["energy"], None),
        ("OOD AUROC, max softmax (comparison)", baselines["max_softmax"], None),
        ("pbc-non-wbc images flagged out-of-distribution", unseen["ood"]["ood_images_flagged"], None),
        ("BCCD: accuracy", cross["accuracy"], None),
        ("BCCD: flagged out-of-distribution", cross["flags"]["out_of_distribution"], None),
        ("BCCD: flagged uncertain", cross["flags"]["uncertain"], None),
        ("BCCD: unflagged (target ≥ 25 %)", cross["flags"]["unflagged"], cross["flags"]["unflagged"] >= 0.25),
        (
            "BCCD: accuracy of unflagged (target ≥ 90 %)",
            cross["flags"]["accuracy_unflagged"],
            (cross["flags"]["accuracy_unflagged"] or 0) >= 0.90,
        ),
    ]
    print(
        f"\nmodel: {args.model or 'shipped default'}, temperature {unseen['temperature']:.3f}; "
        f"{unseen['evaluated']}; BCCD: {cross['n_images']} images"
    )
    for name, value, passed in rows:
        shown = "—" if value is None else f"{value:.4f}" if "AUROC" in name or "size" in name else f"{value:.2%}"
        print(f"  {name:55s} {shown:>9s}  {'' if passed is None else 'PASS' if passed else 'FAIL'}")
    for sets in (unseen["conformal"], *unseen["conformal_at"].values()):
        print(
            f"  per-class coverage of the {sets['method']} sets at {sets['coverage_target']:.1%}: "
            + ", ".join(
                f"{name} {c['coverage']:.2%} ({c['n']}, size {c['mean_set_size']:.3f})"
                for name, c in sets["per_class"].items()
            )
        )
    summary = {"pbc_unseen": unseen, "bccd": cross, "logit_score_auroc": baselines}
    write_json(args.out / "bench.json", summary)
    print(
        f"figures and JSON: {args.out}/pbc, {args.out}/bccd, {args.out}/bench.json\n"
        f"command: python bench/calibration_bench.py{' --model ' + str(args.model) if args.model else ''}"
    )


if __name__ == "__main__":
    main()
