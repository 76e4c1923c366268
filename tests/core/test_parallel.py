"""``--num-gpus``: the relaunch, and sampling sharded over 2 gloo processes equal to one process."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("diffusers")

from segquant import SegQuantError  # noqa: E402
from segquant.app import parallel  # noqa: E402
from _spawn import from_bytes, to_bytes  # noqa: E402


def _sample(labels):
    from segquant.app.embedded import load_denoiser, sample

    return sample(load_denoiser("mnist-flux", "cpu"), labels, seed=3, steps=2, batch_size=2, progress=False)


def _worker(rank, world, init_file, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        queue.put(to_bytes((rank, _sample(torch.arange(6)), parallel.is_main())))
        dist.barrier()  # neither rank tears the group down while the other still talks
    finally:
        dist.destroy_process_group()


def test_sampling_sharded_over_two_ranks_equals_one_process(tmp_path):
    torch.set_num_threads(1)
    single = _sample(torch.arange(6))  # 3 batches of 2: rank 0 samples two, rank 1 one
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted([from_bytes(queue.get(timeout=180)) for _ in range(2)], key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [r[2] for r in results] == [True, False]  # rank 0 alone writes
    for _, images, _ in results:
        assert torch.equal(images, single)


def test_relaunch_drops_the_flag_and_checks_the_count(monkeypatch):
    calls = []
    monkeypatch.setattr(parallel.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert parallel.relaunch(2, ["run", "--num-gpus", "2", "--device", "cpu"]) == 0
    assert parallel.relaunch(3, ["quantize", "--num-gpus=3", "-q"]) == 0
    assert calls[0][-4:] == ["segquant.app", "run", "--device", "cpu"] and "--nproc-per-node=2" in calls[0]
    assert calls[1][-3:] == ["segquant.app", "quantize", "-q"] and "--nproc-per-node=3" in calls[1]
    assert parallel.relaunch(2, ["--num-gpus", "2", "--seeds", "1"], target=["bench.py"]) == 0  # a script
    assert calls[2][-3:] == ["bench.py", "--seeds", "1"] and "-m" not in calls[2][calls[2].index("bench.py"):]
    with pytest.raises(SegQuantError, match="--num-gpus must be at least 1"):
        parallel.check_num_processes(0, "cpu")
    if torch.cuda.device_count() < 64:
        with pytest.raises(SegQuantError, match="--num-gpus 64: this machine has"):
            parallel.check_num_processes(64, "cuda")
    assert not parallel.launched() and parallel.is_main()
