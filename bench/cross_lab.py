"""Another lab's cells: the shipped default, `wbc adapt --unlabelled`, and `wbc adapt` with 1, 5, 10 and 20
labelled cells per class (3 seeds each, tested on the rest of the lab's cells), per lab: accuracy, macro-F1,
confusion matrix, ECE, coverage of the prediction sets, unflagged share and unflagged accuracy; plus the two
warnings ("not a white cell" on PBC's own non-white cells, "white cell from an unfamiliar lab" on BCCD).

    python bench/cross_lab.py [--bccd ../shared/datasets/bccd-wbc] [--pbc ../shared/datasets/pbc-wbc]
                              [--non-wbc ../shared/datasets/pbc-non-wbc] [--model M] [--out bench_out/cross_lab]
                              [--install-lab-statistic] [--end-to-end]

The curves run the code of `wbc adapt --fine-tune-steps 0` (``adapt.fit_on_features``, ``adapt.reestimate_batchnorm``)
on features computed once per backbone (the head is all that changes between seeds); fine-tuning changes the backbone
for every seed and is measured end to end instead (docs/another-lab.md). One end-to-end `wbc adapt` run (fine-tuning included) on
10 cells per class is timed. ``--end-to-end`` adds the curve of `wbc adapt` as a lab runs it, fine-tuning included,
with the lab's unlabelled images (``bench/adapt_few.py`` on random selections of 5, 10 and 20 BCCD cells per class, the
same seeds; about 2 minutes a run on 2 cores). ``--unlabelled`` uses every BCCD image, labels unread (the lab's
unlabelled images). PBC = the model's own held-out test split. ``--install-lab-statistic`` first stores the lab
statistic (``lab.py``) in the model file, fitted on its calibration images. Writes results.json and cross_lab.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapt_few import adapt_and_score  # noqa: E402  (bench/adapt_few.py)

from wbc_trust import config  # noqa: E402
from wbc_trust.adapt import HeadData, adapt, fit_on_features, reestimate_batchnorm, replay_cells  # noqa: E402
from wbc_trust.calibration import Calibration, calibration_error  # noqa: E402
from wbc_trust.crop import CropPolicy  # noqa: E402
from wbc_trust.data import Record, find_dataset, list_files, load_images, model_labels  # noqa: E402
from wbc_trust.errors import WbcError  # noqa: E402
from wbc_trust.evaluate import compute_metrics  # noqa: E402
from wbc_trust.lab import add_lab_statistic  # noqa: E402
from wbc_trust.modelfile import load_extra, load_model  # noqa: E402
from wbc_trust.models import logits_and_features, prepare_for_cpu  # noqa: E402

CELLS = (1, 5, 10, 20)
SEEDS = (0, 1, 2)
END_TO_END = "wbc adapt --data FEW --unlabelled BCCD (end to end, fine-tuned)"
UNLABELLED_END_TO_END = "wbc adapt --unlabelled BCCD (end to end) · BCCD"
HEAD_ONLY = "head only: wbc adapt --fine-tune-steps 0 --data FEW"
ADABN = "batch-norm statistics of BCCD (AdaBN, the head-only curves' base) · BCCD"


def trust_metrics(
    calibration: Calibration,
    logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    images: torch.Tensor,
    classes: list[str],
) -> dict:
    """Everything the table reports for one model on one set of labelled cells."""
    trusted = calibration.apply(logits, features, None, images)
    pred = trusted.probs.argmax(1)
    metrics = compute_metrics(labels.numpy(), pred.numpy(), classes)
    unflagged = torch.tensor([f == "" for f in trusted.flags])
    right = pred == labels
    return {
        "n": len(labels),
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "confusion_matrix": metrics["confusion_matrix"],
        "ece": calibration_error(trusted.probs, labels),
        "coverage": float(trusted.sets[torch.arange(len(labels)), labels].float().mean()),
        "mean_set_size": float(trusted.sets.sum(1).float().mean()),
        "unflagged_share": float(unflagged.float().mean()),
        "unflagged_accuracy": float(right[unflagged].float().mean()) if unflagged.any() else None,
        "flags": {f or "(none)": trusted.flags.count(f) for f in sorted(set(trusted.flags))},
    }


def few_cells(labels: torch.Tensor, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` cells of each class (at most all but one, so every class keeps a test cell), the rest to test on."""
    rng = np.random.default_rng(seed)
    chosen = []
    for k in labels.unique().tolist():
        idx = np.flatnonzero(labels.numpy() == k)
        chosen += list(rng.permutation(idx)[: min(n, len(idx) - 1)])
    chosen = np.sort(np.array(chosen, dtype=int))
    return chosen, np.setdiff1d(np.arange(len(labels)), chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bccd", type=Path, default=Path("../shared/datasets/bccd-wbc"))
    parser.add_argument("--pbc", type=Path, default=Path("../shared/datasets/pbc-wbc"))
    parser.add_argument("--non-wbc", type=Path, default=Path("../shared/datasets/pbc-non-wbc"))
    parser.add_argument("--model", type=Path, default=config.DEFAULT_MODEL_PATH)
    parser.add_argument("--out", type=Path, default=Path("bench_out/cross_lab"))
    parser.add_argument("--install-lab-statistic", action="store_true")
    parser.add_argument(
        "--features",
        type=Path,
        default=None,
        help="keep the computed features in this file and reuse them when it exists (re-runs)",
    )
    parser.add_argument("--max-images", type=int, default=None, help="at most this many images per set (dry runs)")
    parser.add_argument(
        "--end-to-end", action="store_true", help="add the curve of `wbc adapt` with fine-tuning (18 min or more)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.install_lab_statistic:
        lab = add_lab_statistic(args.model, args.pbc)
        print(f"lab statistic stored in {args.model}: threshold {lab['threshold']:.1f}, {lab['n_images']} images")

    model, meta = load_model(args.model)
    model = prepare_for_cpu(model)
    classes, size = meta["classes"], CropPolicy.from_meta(meta)
    base = Calibration.from_model(meta, load_extra(args.model))
    bccd_records = [r for rs in find_dataset(args.bccd, require_all_classes=False).splits.values() for r in rs]
    bccd = load_images(bccd_records, size)
    index = find_dataset(args.pbc)
    test_files = set(meta["data"]["test_files"])
    pbc = load_images([r for r in index.splits["all"] if str(r.path.relative_to(index.root)) in test_files], size)
    non_wbc = load_images([Record(p, None) for p in list_files(args.non_wbc)], size)
    if args.max_images:
        bccd, pbc, non_wbc = (
            li.subset(range(0, len(li.records), max(1, len(li.records) // args.max_images)))
            for li in (bccd, pbc, non_wbc)
        )
    y_bccd = torch.from_numpy(model_labels(bccd.records, classes))
    y_pbc = torch.from_numpy(model_labels(pbc.records, classes))
    print(f"BCCD {len(bccd.records)}, PBC held-out {len(pbc.records)}, PBC non-white {len(non_wbc.records)} images")

    t = time.perf_counter()
    ada = copy.deepcopy(model)
    reestimate_batchnorm(ada, bccd.images)
    replay, replay_source = replay_cells(meta, size)
    y_replay = torch.from_numpy(model_labels(replay.records, classes))
    if args.features is not None and args.features.exists():
        feats, replay_feats = torch.load(args.features, weights_only=True)
    else:
        feats = {
            "bccd": logits_and_features(model, bccd.images, progress=True),
            "pbc": logits_and_features(model, pbc.images, progress=True),
            "non_wbc": logits_and_features(model, non_wbc.images, progress=True),
            "bccd_adabn": logits_and_features(ada, bccd.images, progress=True),
        }
        replay_feats = {
            "base": logits_and_features(model, replay.images)[1].float(),
            "adabn": logits_and_features(ada, replay.images)[1].float(),
        }
        if args.features is not None:
            torch.save((feats, replay_feats), args.features)
    print(
        f"features: {time.perf_counter() - t:.0f} s; replay: {len(replay.records)} images of {replay_source}",
        flush=True,
    )

    results: dict = {
        "command": f"python {shlex.join(sys.argv)}",
        "model": str(args.model),
        "replay": replay_source,
        "zero_labels": {},
        "adapt": {},
    }
    # --- zero labels: the shipped default, and batch-norm statistics of the lab ----------------------------------
    zero = results["zero_labels"]
    zero["default · PBC held-out"] = trust_metrics(base, *feats["pbc"], y_pbc, pbc.images, classes)
    zero["default · BCCD"] = trust_metrics(base, *feats["bccd"], y_bccd, bccd.images, classes)
    # batch-norm statistics of the lab (AdaBN), the head-only curves' base; `wbc adapt --unlabelled` alone maps the
    # lab's colours instead and reads its prevalence (its end-to-end row: --end-to-end)
    zero[ADABN] = trust_metrics(base, *feats["bccd_adabn"], y_bccd, bccd.images, classes)
    # --- the two warnings -----------------------------------------------------------------------------------------
    ood_white = base.ood.score(*feats["pbc"]).numpy()
    ood_non = base.ood.score(*feats["non_wbc"]).numpy()
    non_flags = base.apply(*feats["non_wbc"], None, non_wbc.images).flags
    results["warnings"] = {
        "ood_auroc_pbc_white_vs_non_white": float(
            roc_auc_score(np.r_[np.zeros(len(ood_white)), np.ones(len(ood_non))], np.r_[ood_white, ood_non])
        ),
        "pbc_non_white_flags": {f or "(none)": non_flags.count(f) for f in sorted(set(non_flags))},
        "pbc_non_white_n": len(non_flags),
    }
    if base.lab is not None:
        lab_scores = {
            k: base.lab.score(v.images).numpy() for k, v in (("pbc", pbc), ("non_wbc", non_wbc), ("bccd", bccd))
        }
        results["warnings"]["lab_auroc_bccd_vs_pbc_white"] = float(
            roc_auc_score(
                np.r_[np.zeros(len(lab_scores["pbc"])), np.ones(len(lab_scores["bccd"]))],
                np.r_[lab_scores["pbc"], lab_scores["bccd"]],
            )
        )
        results["warnings"]["lab_auroc_bccd_vs_pbc_non_white"] = float(
            roc_auc_score(
                np.r_[np.zeros(len(lab_scores["non_wbc"])), np.ones(len(lab_scores["bccd"]))],
                np.r_[lab_scores["non_wbc"], lab_scores["bccd"]],
            )
        )
    # --- a few labelled cells --------------------------------------------------------------------------------------
    for variant, key, replay_key in (
        (HEAD_ONLY, "bccd", "base"),
        (f"{HEAD_ONLY} --unlabelled BCCD", "bccd_adabn", "adabn"),
    ):
        results["adapt"][variant] = {}
        logits, features = feats[key]
        for n in CELLS:
            runs = []
            for seed in SEEDS:
                train, test = few_cells(y_bccd, n, seed)
                data = HeadData(features[train].float(), y_bccd[train], replay_feats[replay_key], y_replay)
                try:
                    fitted = fit_on_features(model.head(), data, bccd.images[train], len(classes), seed=seed)
                except Exception as exc:  # noqa: BLE001 - too few cells: what `wbc adapt` says is the result
                    runs.append({"seed": seed, "refused": str(exc)})
                    continue
                with torch.no_grad():
                    test_logits = fitted.head(features[test].float())
                row = trust_metrics(
                    fitted.calibration, test_logits, features[test], y_bccd[test], bccd.images[test], classes
                )
                if key == "bccd":  # the same backbone reads PBC: does the adapted head still?
                    with torch.no_grad():
                        row["pbc_accuracy"] = float(
                            (fitted.head(feats["pbc"][1].float()).argmax(1) == y_pbc).float().mean()
                        )
                runs.append({"seed": seed, "cells": int(len(train)), **row})
            results["adapt"][variant][n] = runs
            ok = [r for r in runs if "accuracy" in r]
            if ok:
                print(
                    f"{variant}, {n}/class: accuracy {np.mean([r['accuracy'] for r in ok]):.1%}, coverage "
                    f"{np.mean([r['coverage'] for r in ok]):.1%}, unflagged {np.mean([r['unflagged_share'] for r in ok]):.1%}",
                    flush=True,
                )
            else:
                print(f"{variant}, {n}/class: refused ({runs[0]['refused']})")
    if args.end_to_end:
        zero[UNLABELLED_END_TO_END] = as_row(adapt_and_score(0, unlabelled=args.bccd, model=args.model))
        results["adapt"][END_TO_END] = end_to_end_curve(args.model, args.bccd)
    # --- one end-to-end `wbc adapt` on 10 cells per class, timed ---------------------------------------------------
    train, _ = few_cells(y_bccd, 10, 0)
    with tempfile.TemporaryDirectory() as tmp:
        for i in train:
            path = bccd.records[i].path
            (Path(tmp) / "cells" / path.parent.name).mkdir(parents=True, exist_ok=True)
            (Path(tmp) / "cells" / path.parent.name / path.name).symlink_to(path.resolve())
        started = time.perf_counter()
        done = adapt(Path(tmp) / "run", data=Path(tmp) / "cells", model_path=args.model)
        results["end_to_end"] = {
            "cells": done["cells_per_class"],
            "seconds": time.perf_counter() - started,
            "cross_fitted_accuracy": done["cross_fitted_accuracy"],
        }
    print(f"end to end: {results['end_to_end']}")
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, args.out / "cross_lab.png")
    print(f"command: {results['command']} → {args.out}/results.json, cross_lab.png")


def as_row(scored: dict) -> dict:
    """``adapt_few.score``'s dictionary under this table's names."""
    renamed = dict(scored)
    renamed["coverage"] = renamed.pop("set_coverage")
    return renamed


def end_to_end_curve(model: Path, bccd: Path) -> dict[int, list[dict]]:
    """`wbc adapt` with fine-tuning on random selections of the lab's cells (``adapt_few.adapt_and_score``: every
    BCCD image as the lab's unlabelled images), scored on the rest by the adapted model as `wbc predict` reads them."""
    curve: dict[int, list[dict]] = {}
    for n in CELLS:
        runs = []
        for seed in SEEDS:
            try:
                row = adapt_and_score(n, seed, unlabelled=bccd, model=model)
            except WbcError as exc:  # too few cells: what `wbc adapt` says is the result
                runs.append({"seed": seed, "refused": str(exc)})
                continue
            runs.append({"seed": seed, **as_row(row)})
        curve[n] = runs
        ok = [r for r in runs if "accuracy" in r]
        summary = f"accuracy {np.mean([r['accuracy'] for r in ok]):.1%}" if ok else f"refused ({runs[0]['refused']})"
        print(f"{END_TO_END}, {n}/class: {summary}", flush=True)
    return curve


def plot(results: dict, path: Path) -> None:
    """Accuracy and trust against labelled cells per class, with the zero-label models as lines."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 7))
    colours = {
        HEAD_ONLY: "tab:blue",
        f"{HEAD_ONLY} --unlabelled BCCD": "tab:green",
        END_TO_END: "tab:orange",
    }
    for variant, per_n in results["adapt"].items():
        per_n = {int(n): runs for n, runs in per_n.items()}  # JSON keys are strings
        ns = [n for n in CELLS if any("accuracy" in r for r in per_n[n])]
        for ax, key, style in (
            (axes[0], "accuracy", "-o"),
            (axes[1], "coverage", ":^"),
            (axes[1], "unflagged_accuracy", "-o"),
            (axes[1], "unflagged_share", "--s"),
        ):
            values = [[r[key] for r in per_n[n] if r.get(key) is not None] for n in ns]
            ax.errorbar(
                ns,
                [np.mean(v) for v in values],
                yerr=[np.std(v) for v in values],
                fmt=style,
                color=colours[variant],
                capsize=3,
                label=f"{variant}" if ax is axes[0] else f"{key.replace('_', ' ')}, {variant}",
            )
    for name, colour in (
        ("default · BCCD", "tab:red"),
        (ADABN, "tab:purple"),
        (UNLABELLED_END_TO_END, "tab:brown"),
    ):
        if name in results["zero_labels"]:
            axes[0].axhline(results["zero_labels"][name]["accuracy"], color=colour, ls=":", label=f"{name} (no labels)")
    axes[0].axhline(0.93, color="grey", ls="-.", lw=1, label="target at 10 cells/class: 93 %")
    axes[0].set(
        title="BCCD accuracy on the cells not labelled (mean ± sd, 3 seeds)",
        xlabel="labelled BCCD cells per class",
        ylabel="accuracy",
        ylim=(0, 1),
        xticks=CELLS,
    )
    axes[1].set(
        title="BCCD trust: 95 % set coverage, unflagged answers",
        xlabel="labelled BCCD cells per class",
        ylim=(0, 1),
        xticks=CELLS,
    )
    for ax in axes:  # legends under the plots: inside, they hid the curves
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
