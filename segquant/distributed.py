"""Calibration across processes: each rank observes its shard of the calibration data, then the observers are
merged so that every rank holds what one process would have seen over all of it.

The merge is exact (a max of maxima, a sum of counts), so the scales, SmoothQuant factors and shift centres
that follow are bit for bit those of a single-process run on the same batches, whatever the sharding. It uses
``torch.distributed`` (NCCL across GPUs, gloo on CPU) and does nothing when no process group is initialised.

Example (``torchrun --nproc-per-node 2 calibrate.py``):
    >>> dist.init_process_group("nccl")
    >>> shard = batches[dist.get_rank()::dist.get_world_size()]
    >>> backend.quantize(model, plan, options, lambda m: [m(**b) for b in shard])  # observers merged inside
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence, TypeVar

import torch
from torch import Tensor

from .errors import SegQuantError
from .numerics import ActivationStats

if TYPE_CHECKING:  # calib calls merge_observers: no import of it at run time
    from .calib import SegmentAmaxObserver

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group of more than one rank."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def shard(items: Sequence[T], rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share of ``items`` (every ``world_size``-th item from ``rank``): the calibration batches or
    evaluation samples one process handles. The whole list outside a process group."""
    if rank is None or world_size is None:
        if not is_distributed():
            return list(items)
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world_size < 1 or not 0 <= rank < world_size:
        raise SegQuantError(f"rank {rank} is not in a world of {world_size} processes")
    return list(items[rank::world_size])


def _device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def merge_observers(observers: Mapping[str, SegmentAmaxObserver]) -> None:
    """Merge every rank's observers in place (a collective: every rank calls it with the same layer names).

    Per channel the maxima of ``|x|``, ``x+`` and ``|x-|`` are all-reduced with MAX, the batch and row counts with
    SUM; a layer varies when it varied on some rank or the ranks' first rows differ (what one process would say
    of the concatenated data). A layer no rank reached stays unreached.

    Raises:
        SegQuantError: the ranks disagree on the layers or their widths (different plans per rank).
    """
    if not is_distributed():
        return
    names = sorted(observers)
    widths = torch.tensor([sum(observers[n].segments) for n in names], dtype=torch.float64)
    _check_same(widths, "the calibrated layers and their widths")
    device = _device()
    local = [_pack(observers[n]) for n in names]
    maxima = torch.cat([p[0] for p in local]).to(device) if local else torch.zeros(0, device=device)
    minima = torch.cat([p[1] for p in local]).to(device) if local else torch.zeros(0, device=device)
    counts = torch.tensor([p[2] for p in local], dtype=torch.float64, device=device).reshape(-1, 4)
    torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(minima, op=torch.distributed.ReduceOp.MIN)
    sums, highs = counts[:, :2].clone(), counts[:, 2:].clone()
    torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
    torch.distributed.all_reduce(highs, op=torch.distributed.ReduceOp.MAX)
    offset = 0
    for i, name in enumerate(names):
        k = sum(observers[name].segments)
        _unpack(observers[name], maxima[offset * 4:(offset + k) * 4].cpu(), minima[offset:offset + k].cpu(),
                sums[i].cpu(), highs[i].cpu())
        offset += k


def _pack(obs: SegmentAmaxObserver) -> tuple[Tensor, Tensor, list[float]]:
    """(amax | pos | neg | first row as max, first row as min, [batches, rows, varies, ndim]); an unreached layer
    or one without a first row contributes the neutral element (-inf / +inf)."""
    k = sum(obs.segments)
    if obs.channels is None:
        ch = [torch.full((k,), -torch.inf)] * 3
    else:
        ch = [obs.channels.amax.float().cpu(), obs.channels.pos_amax.float().cpu(), obs.channels.neg_amax.float().cpu()]
    first_hi = obs.first_row.float().cpu() if obs.first_row is not None else torch.full((k,), -torch.inf)
    first_lo = obs.first_row.float().cpu() if obs.first_row is not None else torch.full((k,), torch.inf)
    return torch.cat([*ch, first_hi]), first_lo, [float(obs.batches), float(obs.rows), float(obs.varies),
                                                  float(obs.ndim)]


def _unpack(obs: SegmentAmaxObserver, maxima: Tensor, first_lo: Tensor, sums: Tensor, highs: Tensor) -> None:
    amax, pos, neg, first_hi = maxima.reshape(4, -1)
    obs.batches, obs.rows = int(sums[0]), int(sums[1])
    obs.ndim = int(highs[1])
    if obs.batches == 0:
        return
    obs.channels = ActivationStats(amax, pos, neg)
    reached = torch.isfinite(first_hi).all()
    obs.varies = bool(highs[0]) or bool(reached and (first_hi != first_lo).any())
    if reached:
        obs.first_row = first_hi if obs.first_row is None else obs.first_row


def _check_same(values: Tensor, what: str) -> None:
    device = _device()
    n = torch.tensor([float(values.numel())], dtype=torch.float64, device=device)
    n_max, n_min = n.clone(), n.clone()
    torch.distributed.all_reduce(n_max, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(n_min, op=torch.distributed.ReduceOp.MIN)
    same = bool(n_max == n_min)
    if same:
        hi, lo = values.to(device).clone(), values.to(device).clone()
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        same = bool(torch.equal(hi, lo))
    if not same:
        raise SegQuantError(f"the ranks disagree on {what}: every rank must quantize the same model with the same "
                            "plan (analyse once, broadcast or load the same plan.json)")


def gather_rows(inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every rank's ``{layer: (rows, K)}`` CPU tensors concatenated in rank order, on every rank (a collective), so
    that choices made from them (``segquant.choose``) are the same on every rank; ``inputs`` outside a group."""
    if not is_distributed():
        return dict(inputs)
    parts = gather_objects({n: t.cpu() for n, t in inputs.items()})
    names = sorted({n for part in parts for n in part})
    return {n: torch.cat([part[n] for part in parts if n in part]) for n in names}


def gather_objects(local: T) -> list[T]:
    """Every rank's picklable ``local`` (CPU tensors inside), in rank order, on every rank (a collective);
    ``[local]`` outside a process group."""
    if not is_distributed():
        return [local]
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, local)
    return parts
