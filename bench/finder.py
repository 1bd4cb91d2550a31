"""The cell finder on annotated fields: recall and precision at IoU ≥ 0.5 per source lab, time per field.

    python bench/finder.py          # evaluate the shipped finder: txl-fields val per lab, bccd-fields; ~3 min
    python bench/finder.py --fit    # refit src/wbc_trust/assets/finder.npz on txl-fields train first; ~10 min on 2 busy cores

Fitting uses only the train split of txl-fields, each image once as it is and once cropped so that the crop's edge
cuts a white cell (Raabin and BCD annotate such half cells, Raabin's train split has few of them). Measured on the
val split (recall/precision): without the edge crops (score threshold 0.4) PBC 0.989/0.989, BCCD 0.956/0.915,
BCD 0.936/0.880, Raabin 0.944/0.981; with them (threshold 0.5, shipped) PBC 0.989/0.989, BCCD 0.978/0.936,
BCD 0.936/0.957, Raabin 0.935/0.962. A first fit that also used 2×2 mosaics of one lab's images (small cells in a big
frame; working size 480 px) scored lower (BCCD 0.956/0.896, BCD 0.915/0.878) and was replaced. The lab of an image is read from its
size (PBC 360×363 or 366×369, Raabin 575×575, BCD 416×416, BCCD 640×480). bccd-fields are BCCD's fields; TXL-PBC
re-annotates some of the same photos, so bccd-fields is reported whole and without the photos that are also in the
txl-fields train split (found by comparing 16×16 thumbnails). Time per image: wall-clock median and the process's
CPU time (``time.process_time``; on a shared machine the wall clock counts other people's work too). Writes bench_out/finder/finder.json and finder.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from wbc_trust import config
from wbc_trust.finder import CellFinder, fit, match, proposal_table, read_voc, read_yolo

DATA = ROOT.parent / "shared" / "datasets"
TXL = DATA / "txl-fields"
BCCD = DATA / "bccd-fields"
LABS = {(360, 363): "PBC", (366, 369): "PBC", (575, 575): "Raabin", (416, 416): "BCD", (640, 480): "BCCD"}
OUT = ROOT / "bench_out" / "finder"


def txl_split(split: str) -> list[tuple[Path, str, np.ndarray]]:
    """(image, lab, white-cell boxes) of one txl-fields split; label lines that are not boxes are skipped."""
    items = []
    for path in sorted((TXL / "images" / split).iterdir()):
        with Image.open(path) as image:
            size = image.size
        boxes, _ = read_yolo(TXL / "labels" / split / f"{path.stem}.txt", *size)
        items.append((path, LABS.get(size, "other"), boxes.get(0, np.zeros((0, 4)))))
    return items


def bccd_fields() -> list[tuple[Path, np.ndarray]]:
    return [(p, read_voc(BCCD / "Annotations" / f"{p.stem}.xml")) for p in sorted((BCCD / "JPEGImages").glob("*.jpg"))]


def thumbnail(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L").resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float32)


def edge_crop(array: np.ndarray, boxes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A crop whose edge cuts one white cell through 30–70 % of its width or height; boxes clipped, boxes left with
    less than a quarter of their area dropped (as annotators do)."""
    h, w = array.shape[:2]
    x0, y0, x1, y1 = boxes[rng.integers(len(boxes))]
    cut = rng.uniform(0.3, 0.7)
    side = rng.integers(4)
    left, top, right, bottom = 0, 0, w, h
    if side == 0:
        left = int(x0 + cut * (x1 - x0))
    elif side == 1:
        right = int(x1 - cut * (x1 - x0))
    elif side == 2:
        top = int(y0 + cut * (y1 - y0))
    else:
        bottom = int(y1 - cut * (y1 - y0))
    if right - left < w // 3 or bottom - top < h // 3:
        return array, boxes
    clipped = np.clip(boxes - [left, top, left, top], 0, [right - left, bottom - top] * 2)

    def area(b: np.ndarray) -> np.ndarray:
        return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])

    keep = area(clipped) >= 0.25 * area(boxes)
    return array[top:bottom, left:right], clipped[keep]


def fit_finder(seed: int = 0) -> dict:
    """Proposals of txl-fields train (+ one edge crop per image) → the verifier; returns counts and time."""
    rng = np.random.default_rng(seed)
    items = txl_split("train")
    rows = []
    start = time.perf_counter()
    for path, _, boxes in tqdm(items, desc="proposals (train)", unit="image"):
        array = np.asarray(Image.open(path).convert("RGB"))
        rows.append(proposal_table(array, boxes))
        if len(boxes):
            rows.append(proposal_table(*edge_crop(array, boxes, rng)))
    features, positive, offsets = (np.concatenate(parts) for parts in zip(*rows))
    fit(features, positive, offsets, config.FINDER_MODEL_PATH, seed)
    return {
        "proposals": len(features),
        "positive": int(positive.sum()),
        "fit_seconds": time.perf_counter() - start,
        "weights_bytes": config.FINDER_MODEL_PATH.stat().st_size,
    }


def whole(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """The boxes of cells the image shows whole: not within 2 px of its edge (``wbc count`` flags the others and
    leaves them out of the differential, so missing them costs no count)."""
    return boxes[
        (boxes[:, 0] > 2) & (boxes[:, 1] > 2) & (boxes[:, 2] < width - 2) & (boxes[:, 3] < height - 2)
    ].reshape(-1, 4)


def score(finder: CellFinder, items, desc: str) -> dict[str, dict]:
    """Recall (of all annotated cells, and of those the image shows whole), precision and ms per image for each group
    of (path, group, boxes) items."""
    totals: dict[str, list] = {}
    for path, group, truth in tqdm(items, desc=desc, unit="image"):
        array = np.asarray(Image.open(path).convert("RGB"))
        start, cpu = time.perf_counter(), time.process_time()
        result = finder.find(array)
        ms, cpu_ms = (time.perf_counter() - start) * 1000, (time.process_time() - cpu) * 1000
        boxes = np.array([c.box for c in result.cells]).reshape(-1, 4)
        scores = np.array([c.score for c in result.cells])
        hits = match(boxes, scores, truth)
        whole_truth = whole(truth, array.shape[1], array.shape[0])
        t = totals.setdefault(group, [0, 0, 0, [], 0, [], 0, 0])
        t[6] += match(boxes, scores, whole_truth)
        t[7] += len(whole_truth)
        t[0] += hits
        t[1] += len(boxes)
        t[2] += len(truth)
        t[3].append(ms)
        t[4] += 1
        t[5].append(cpu_ms)
    return {
        g: {
            "images": t[4],
            "true_cells": t[2],
            "found": t[1],
            "matched": t[0],
            "recall": t[0] / max(t[2], 1),
            "precision": t[0] / max(t[1], 1),
            "whole_cells": t[7],
            "recall_whole_cells": t[6] / max(t[7], 1),
            "ms_median": float(np.median(t[3])),
            "ms_p95": float(np.percentile(t[3], 95)),
            "cpu_ms_median": float(np.median(t[5])),
        }
        for g, t in sorted(totals.items())
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="refit the shipped finder on txl-fields train first")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    report: dict = {}
    if args.fit:
        report["fit"] = fit_finder()
        print(f"fitted {config.FINDER_MODEL_PATH} ({report['fit']})")
    finder = CellFinder()
    report["txl-fields val"] = score(finder, txl_split("val"), "txl-fields val")
    train_thumbs = np.stack([thumbnail(p) for p, _, _ in txl_split("train") if Image.open(p).size == (640, 480)])
    fields = []
    for path, truth in bccd_fields():
        seen = np.abs(train_thumbs - thumbnail(path)).mean(axis=(1, 2)).min() < 2.0
        fields.append((path, "in txl-fields train" if seen else "not in txl-fields train", truth))
    per_part = score(finder, fields, "bccd-fields")
    total = {k: sum(p[k] for p in per_part.values()) for k in ("images", "true_cells", "found", "matched")}
    total.update(
        recall=total["matched"] / max(total["true_cells"], 1), precision=total["matched"] / max(total["found"], 1)
    )
    report["bccd-fields"] = {"all": total, **per_part}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "finder.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(OUT / "finder.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "set",
                "group",
                "images",
                "true_cells",
                "found",
                "matched",
                "recall",
                "precision",
                "recall_whole_cells",
                "ms_median",
                "cpu_ms_median",
            ]
        )
        for name in ("txl-fields val", "bccd-fields"):
            for group, r in report[name].items():
                writer.writerow(
                    [
                        name,
                        group,
                        r["images"],
                        r["true_cells"],
                        r["found"],
                        r["matched"],
                        f"{r['recall']:.4f}",
                        f"{r['precision']:.4f}",
                        f"{r['recall_whole_cells']:.4f}" if "recall_whole_cells" in r else "",
                        f"{r.get('ms_median', float('nan')):.1f}",
                        f"{r.get('cpu_ms_median', float('nan')):.1f}",
                    ]
                )
    print(
        f"{'set':16} {'group':26} {'images':>6} {'cells':>6} {'recall':>7} {'precision':>9} {'ms/field':>8} "
        f"{'cpu ms':>7}"
    )
    for name in ("txl-fields val", "bccd-fields"):
        for group, r in report[name].items():
            print(
                f"{name:16} {group:26} {r['images']:6d} {r['true_cells']:6d} {r['recall']:7.3f} {r['precision']:9.3f} "
                f"{r.get('ms_median', float('nan')):8.1f} {r.get('cpu_ms_median', float('nan')):7.1f}"
            )
    print(f"written: {OUT / 'finder.json'}, {OUT / 'finder.csv'}")


if __name__ == "__main__":
    main()
