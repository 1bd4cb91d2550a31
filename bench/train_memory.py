"""Peak memory (RSS) of ``wbc train`` at 224 px on all of pbc-wbc (issue target: ≤ 4 GiB).

    python bench/train_memory.py [--data ../shared/datasets/pbc-wbc] [--arch resnet50] [--img-size 224]
                                 [--batches 8]

Runs the real ``train.train`` in a fresh child process, twice: with an empty decode cache (every image decoded) and
then with the cache that run wrote (what every later run does). The only change to ``wbc train`` is that each epoch is
cut to ``--batches`` batches (``train.train_loader`` is wrapped), so the peak covers decoding all 8,756 images, the
split, the model and its AdamW state, the training steps, evaluating the whole validation split, the checkpoint and
the held-out test report. The peak is the child's ``ru_maxrss``, printed after each phase so the cause of a peak can
be read off (it stops growing after the second training step: AdamW's state exists from the first ``step()``).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from itertools import islice
from pathlib import Path

from torch.utils.data import DataLoader

from wbc_trust import train
from wbc_trust.train import TrainConfig

GIB = 2**30


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def report(phase: str) -> None:
    print(f"peak RSS {peak_rss() / GIB:5.2f} GiB after {phase}", flush=True)


class BoundedLoader:
    """The real training loader, cut to ``n`` batches per epoch; reports the peak after each batch."""

    def __init__(self, loader: DataLoader, n: int) -> None:
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return min(self.n, len(self.loader))

    def __getattr__(self, name: str):
        return getattr(self.loader, name)  # e.g. the shuffling generator that train() checkpoints

    def __iter__(self):
        report("decoding all images, the split and building the model")
        for step, batch in enumerate(islice(self.loader, len(self)), start=1):
            yield batch  # train() runs its training step before asking for the next batch
            report(f"training step {step}")


def reported(function, phase: str):
    """``function``, printing the peak memory after each call."""

    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        report(phase)
        return result

    return wrapper


def child(args: argparse.Namespace) -> None:
    """Run ``wbc train`` for one short epoch-slice and print the peak memory per phase."""
    real_loader = train.train_loader
    train.train_loader = lambda *a: BoundedLoader(real_loader(*a), args.batches)
    train._evaluate_split = reported(train._evaluate_split, "evaluating the validation split")
    train.calibrate_loaded = reported(train.calibrate_loaded, "calibration on the validation split")
    train._test_report = reported(train._test_report, "the held-out test report")
    report("imports")
    train.train(TrainConfig(data=args.data, out=args.out, arch=args.arch, img_size=args.img_size, epochs=1))
    report("the end of the run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/pbc-wbc"))
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=8, help="training batches in the one epoch (default 8)")
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)  # set by the parent for the child
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    peaks = {}
    with tempfile.TemporaryDirectory(prefix="wbc-mem-") as tmp:
        env = {**os.environ, "WBC_CACHE_DIR": str(Path(tmp) / "cache")}  # starts empty: the first run decodes
        for run in ("empty decode cache", "warm decode cache"):
            print(
                f"\n=== {run}: wbc train --arch {args.arch} --img-size {args.img_size} --epochs 1, "
                f"{args.batches} batches, all images ===",
                flush=True,
            )
            command = [
                sys.executable,
                __file__,
                "--child",
                "--data",
                str(args.data),
                "--arch",
                args.arch,
                "--img-size",
                str(args.img_size),
                "--batches",
                str(args.batches),
                "--out",
                str(Path(tmp) / "run"),
            ]
            _, status, usage = os.wait4(subprocess.Popen(command, env=env).pid, 0)  # this child's own rusage
            if os.waitstatus_to_exitcode(status) != 0:
                sys.exit(f"the training run failed ({run})")
            peaks[run] = usage.ru_maxrss * 1024
    print()
    for run, peak in peaks.items():
        print(f"peak RSS, {run}: {peak / GIB:.2f} GiB")
    print(
        f"peak RSS training {args.arch} at {args.img_size} px on all images: {max(peaks.values()) / GIB:.2f} GiB "
        "(target ≤ 4 GiB)"
    )


if __name__ == "__main__":
    main()
