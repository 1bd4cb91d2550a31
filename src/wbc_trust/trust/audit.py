"""Data-quality audit of a labelled image folder: what to fix before training on it.

Finds files that are not usable images (with the reason), byte-identical duplicates (SHA-256 groups), duplicates filed
under different labels (one of the two labels is wrong), near-duplicates (perceptual hash, the ``imagehash``
package: re-saved or re-compressed copies of one cell that SHA-256 cannot see) and the class balance.

Duplicates matter twice: they inflate test accuracy when copies land on both sides of a split, and a copy under two
labels teaches the model a contradiction. ``wbc train`` already keeps copies on one side of a split; the audit makes
them visible so a person can decide which label is right.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
from tqdm import tqdm

from wbc_trust import config, plots
from wbc_trust.data import UnreadableImage, find_dataset, read_image
from wbc_trust.io import write_json


@dataclass(frozen=True)
class FileCheck:
    """What the audit learnt about one file."""

    path: str  # relative to the audited folder
    label: str
    sha256: str
    phash: int | None  # 64-bit perceptual hash; None when the file is not a readable image
    problem: str | None  # why the file is unusable, or None


def _check_file(path: Path, root: Path, label: str) -> FileCheck:
    """Hash the bytes, decode the whole image (``read_image`` checks it fully) and hash what it shows."""
    relative = str(path.relative_to(root))
    try:
        data = path.read_bytes()
    except OSError as exc:
        return FileCheck(relative, label, "", None, f"cannot read file: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        image = read_image(data)
    except UnreadableImage as exc:
        return FileCheck(relative, label, digest, None, str(exc))
    return FileCheck(
        relative, label, digest, int(str(imagehash.phash(image, hash_size=config.AUDIT_PHASH_SIZE)), 16), None
    )


def _exact_duplicates(checks: list[FileCheck]) -> list[dict]:
    """Groups of byte-identical files (two or more), largest first, with the labels they are filed under."""
    groups: dict[str, list[FileCheck]] = defaultdict(list)
    for check in checks:
        if check.sha256:
            groups[check.sha256].append(check)
    found = [
        {
            "sha256": digest,
            "labels": sorted({c.label for c in members}),
            "files": [{"path": c.path, "label": c.label} for c in members],
        }
        for digest, members in groups.items()
        if len(members) > 1
    ]
    return sorted(found, key=lambda g: (-len(g["files"]), g["files"][0]["path"]))


def _near_duplicates(checks: list[FileCheck], max_distance: int) -> list[dict]:
    """Pairs of readable, not byte-identical images whose perceptual hashes differ in at most ``max_distance`` bits.

    All pairs are compared (vectorised XOR + popcount over uint64 hashes, one row at a time): 8,756 images are
    38 million pairs, about a second of numpy. imagehash compares one pair at a time in Python, which would take
    minutes, so the loop over pairs is written here.
    """
    readable = [c for c in checks if c.phash is not None]
    hashes = np.array([c.phash for c in readable], dtype=np.uint64)
    pairs = []
    for i in range(len(readable) - 1):
        distances = np.bitwise_count(hashes[i + 1 :] ^ hashes[i])
        for j in np.nonzero(distances <= max_distance)[0] + i + 1:
            a, b = readable[i], readable[j]
            if a.sha256 != b.sha256:
                pairs.append(
                    {
                        "files": [{"path": a.path, "label": a.label}, {"path": b.path, "label": b.label}],
                        "distance": int(distances[j - i - 1]),
                        "same_label": a.label == b.label,
                    }
                )
    return sorted(pairs, key=lambda p: (p["distance"], p["files"][0]["path"]))


def run_audit(data: Path, out: Path) -> dict:
    """Audit every image-named file in the class folders of ``data``; write ``OUT/audit.json`` and
    ``OUT/class_balance.png``; return the same summary as audit.json."""
    index = find_dataset(data, require_all_classes=False)
    records = [r for split in index.splits.values() for r in split]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        checks = list(
            tqdm(
                pool.map(lambda r: _check_file(r.path, index.root, config.CLASSES[r.label]), records),
                total=len(records),
                desc="auditing files",
                unit="file",
            )
        )
    usable = [c for c in checks if c.problem is None]
    counts = Counter(c.label for c in usable)
    class_counts = {c: counts.get(c, 0) for c in config.CLASSES}
    present = [n for n in class_counts.values() if n]
    duplicates = _exact_duplicates(checks)
    result = {
        "root": str(index.root),
        "layout": index.layout,
        "n_files": len(checks),
        "n_readable": len(usable),
        "unreadable": [{"path": c.path, "label": c.label, "reason": c.problem} for c in checks if c.problem],
        "exact_duplicates": duplicates,
        "n_redundant_copies": sum(len(g["files"]) - 1 for g in duplicates),
        "conflicting_labels": [g for g in duplicates if len(g["labels"]) > 1],
        "near_duplicates": _near_duplicates(checks, config.AUDIT_PHASH_MAX_DISTANCE),
        "near_duplicate_max_distance": config.AUDIT_PHASH_MAX_DISTANCE,
        "class_counts": class_counts,
        "imbalance_ratio": max(present) / min(present) if present else None,
        "ignored_folders": index.ignored_classes,
    }
    out = Path(out)
    write_json(out / "audit.json", result)
    plots.class_balance_figure(class_counts, out / "class_balance.png", title=f"{index.root.name}: images per class")
    return result


def format_summary(result: dict, max_listed: int = 10) -> str:
    """The audit as a person reads it: counts first, then the files to look at."""
    lines = [
        f"{result['n_files']} files in {result['root']}, {result['n_readable']} readable images",
        "class balance: "
        + ", ".join(f"{c} {n}" for c, n in result["class_counts"].items())
        + (f" (largest/smallest {result['imbalance_ratio']:.1f}x)" if result["imbalance_ratio"] else ""),
        f"unreadable files: {len(result['unreadable'])}",
        *[f"  {u['path']}: {u['reason']}" for u in result["unreadable"][:max_listed]],
        f"exact duplicates: {len(result['exact_duplicates'])} groups ({result['n_redundant_copies']} redundant copies)",
        f"duplicates under different labels: {len(result['conflicting_labels'])}",
        *[
            "  " + " == ".join(f"{f['path']} ({f['label']})" for f in g["files"])
            for g in result["conflicting_labels"][:max_listed]
        ],
        f"near-duplicates (perceptual hash within {result['near_duplicate_max_distance']} bits): "
        f"{len(result['near_duplicates'])} pairs, "
        f"{sum(not p['same_label'] for p in result['near_duplicates'])} with different labels",
        *[
            "  " + " ~ ".join(f"{f['path']} ({f['label']})" for f in p["files"]) + f"  distance {p['distance']}"
            for p in result["near_duplicates"][:max_listed]
        ],
    ]
    if result["ignored_folders"]:
        lines.append(
            "folders left out (not white-cell classes): "
            + ", ".join(f"{k} ({v} files)" for k, v in result["ignored_folders"].items())
        )
    return "\n".join(lines)
