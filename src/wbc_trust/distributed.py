"""Training on several processes (``torchrun --nproc-per-node N wbc train …``) or one, with one object to ask.

torchrun starts N copies of ``wbc train`` and tells each its place through the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``); ``setup`` reads it and joins the process group: gloo on CPU, NCCL on GPUs (one
process per GPU). Without torchrun (``WORLD_SIZE`` unset or 1) nothing is initialised and every method below is a
no-op, so the one-process path stays exactly what it was.

Plain ``torch.distributed`` instead of Lightning Fabric: the loop needs four collectives (a barrier, a broadcast of
rank 0's decisions, a sum of epoch statistics, DDP's own gradient averaging), which is less code than adapting the loop
to Fabric's launcher and checkpoint conventions, and adds no dependency.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wbc_trust.errors import WbcError

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """``--device``: ``auto`` is CUDA when PyTorch sees a GPU, else the CPU; ``cuda`` without a GPU is an error."""
    if device not in DEVICES:
        raise WbcError(f"unknown --device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise WbcError(
            "--device cuda: PyTorch sees no CUDA GPU here (a CPU-only build, or no driver); "
            "use --device cpu or --device auto"
        )
    return device


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` training processes and its device."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 decodes, evaluates, decides, logs and writes every file; the others only train."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. decodes every image and writes the cache); the others wait, then run it
        too and find its results (the cache) ready."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def broadcast(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank (its decision: improved, stop, the split's digest)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, *values: float) -> list[float]:
        """The sums of ``values`` over all ranks (the epoch's images seen, correct answers and loss)."""
        if not self.distributed:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str) -> Context:
    """Join torchrun's process group if there is one (``device`` already resolved: "cpu" or "cuda").

    Ranks other than 0 log only errors, so a run prints one set of lines whatever the number of processes.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context(torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise WbcError(
                f"process {rank} wants GPU {local_rank} but this machine has {torch.cuda.device_count()}: "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        context = Context(torch.device("cuda", local_rank), rank, world_size)
    else:
        dist.init_process_group("gloo")
        context = Context(torch.device("cpu"), rank, world_size)
    if not context.is_main:
        logging.getLogger("wbc_trust").setLevel(logging.ERROR)
    return context


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or the only process (what the CLI asks before printing a result)."""
    return int(os.environ.get("RANK", "0")) == 0
