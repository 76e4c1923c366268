"""``--num-gpus N``: a job run by N processes (one per GPU; on CPU, gloo processes), started by
``torch.distributed.run``. Calibration batches and evaluation batches are sharded over the ranks, calibration
statistics are merged exactly (``segquant.distributed``), images are gathered, and rank 0 alone writes outputs
and prints results.

``segquant run --num-gpus 2 ...`` relaunches itself as ``python -m torch.distributed.run --standalone
--nproc-per-node 2 -m segquant.app run ...``; launching it that way (or with ``accelerate launch``, which sets the
same environment) works too.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Iterator, Sequence

import torch

from segquant.distributed import gather_objects, is_distributed
from segquant.errors import SegQuantError

FLAG = "--num-gpus"


def check_num_processes(num: int, device: str) -> None:
    """Raise ``SegQuantError`` unless ``num`` processes can run on ``device``."""
    if num < 1:
        raise SegQuantError(f"{FLAG} must be at least 1, got {num}")
    if num > 1 and device.startswith("cuda") and torch.cuda.device_count() < num:
        raise SegQuantError(f"{FLAG} {num}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def launched() -> bool:
    """True in a process started by ``torch.distributed.run`` / ``accelerate launch`` with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(num: int, argv: Sequence[str], target: Sequence[str] = ("-m", "segquant.app")) -> int:
    """Run this ``segquant`` command (or the script ``target``, e.g. ``[path]``) again in ``num`` processes
    (``torch.distributed.run``, standalone rendezvous) and return its exit code (the first failing rank's)."""
    args = list(argv)
    for i, arg in enumerate(args):  # the children must not relaunch: drop the flag and its value
        if arg == FLAG:
            del args[i:i + 2]
            break
        if arg.startswith(FLAG + "="):
            del args[i]
            break
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num}",
               *target, *args]
    return subprocess.call(command)


@contextlib.contextmanager
def process_group(device: str) -> Iterator[str]:
    """Inside a launched job: join its process group (NCCL on CUDA, gloo on CPU) and yield this rank's device
    (``cuda:<local rank>``); outside one: yield ``device`` unchanged."""
    if not launched() or is_distributed():
        yield device
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield device
    finally:
        torch.distributed.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 (and outside a process group): the process that writes and prints."""
    return not is_distributed() or torch.distributed.get_rank() == 0


def gather_ordered(local: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's ``{index: tensor}`` (CPU tensors) merged and sorted by index, on every rank; the local values
    outside a process group."""
    merged = {i: t for part in gather_objects({i: t.cpu() for i, t in local.items()}) for i, t in part.items()}
    return [merged[i] for i in sorted(merged)]
