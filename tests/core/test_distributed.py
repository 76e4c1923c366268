"""Calibration sharded over 2 gloo processes on CPU gives bit for bit the scales of one process."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from segquant import LinearPlan, SegmentAmaxObserver, SegQuantError
from segquant.calib import check_calibration
from segquant.distributed import merge_observers, shard
from _spawn import from_bytes, to_bytes

LAYERS = {
    "a": LinearPlan(24, 8, in_segments=(8, 16), dual_scale=True, dual_scale_segments=(1,), activation="gelu",
                    shift="per_tensor", shift_segments=(1,), name="a"),
    "b": LinearPlan(16, 4, name="b"),
    "never": LinearPlan(4, 4, name="never"),  # no batch reaches it on any rank
}


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(7):  # an odd count: the shards differ in size
        x = torch.nn.functional.gelu(torch.randn(5 + i, 24, generator=g) * (1 + i))
        out.append({"a": x, "b": torch.randn(3, 16, generator=g) * (i - 3)})
    return out


def _observe(batches):
    observers = {n: SegmentAmaxObserver(p) for n, p in LAYERS.items()}
    for batch in batches:
        for name, x in batch.items():
            observers[name].update(x)
    return observers


def _summary(observers):
    out = {}
    for name, obs in observers.items():
        if obs.batches == 0:
            out[name] = (0, 0)
            continue
        stats = obs.stats(torch.linspace(0.5, 2.0, sum(obs.segments)))
        out[name] = (obs.batches, obs.rows, obs.varies, stats.amax, stats.pos_amax, stats.neg_amax, stats.center,
                     obs.channel_stats().amax)
    return out


def _worker(rank, world, init_file, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        observers = _observe(shard(_batches()))
        kept = check_calibration(observers, keep_degenerate=True)  # merges across the ranks first
        queue.put(to_bytes((rank, kept, _summary(observers))))
        bad = {n: SegmentAmaxObserver(p) for n, p in LAYERS.items() if n != "b" or rank == 0}
        try:
            merge_observers(bad)
            queue.put(to_bytes((rank, "no error", None)))
        except SegQuantError as e:
            queue.put(to_bytes((rank, str(e), None)))
        dist.barrier()  # neither rank tears the group down while the other still talks
    finally:
        dist.destroy_process_group()


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert len(a[name]) == len(b[name])
        for x, y in zip(a[name], b[name]):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), name  # bit for bit
            else:
                assert x == y, name


def test_two_gloo_ranks_calibrate_bit_identical_to_one_process(tmp_path):
    single = _observe(_batches())
    kept_single = check_calibration(single, keep_degenerate=True)
    expected = _summary(single)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [from_bytes(queue.get(timeout=120)) for _ in range(4)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    merged = [r for r in results if r[2] is not None]
    errors = [r[1] for r in results if r[2] is None]
    assert len(merged) == 2 and kept_single == ["never"]
    for _, kept, summary in merged:
        assert kept == kept_single
        _same(summary, expected)
    assert all("the ranks disagree on the calibrated layers" in e for e in errors)


def test_shard_and_outside_a_process_group():
    items = list(range(7))
    assert shard(items, 0, 2) == [0, 2, 4, 6] and shard(items, 1, 2) == [1, 3, 5]
    assert shard(items) == items  # no process group: everything
    with pytest.raises(SegQuantError, match="rank 2 is not in a world of 2 processes"):
        shard(items, 2, 2)
    observers = _observe(_batches())
    before = _summary(observers)
    merge_observers(observers)  # no process group: nothing changes
    _same(_summary(observers), before)
