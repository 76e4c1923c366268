"""Calibration through the ModelOpt backend sharded over 2 gloo processes: every scale, SmoothQuant factor and
DualScale range of the quantized model equals one process's, bit for bit (the same batches, split over ranks)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("modelopt")
pytest.importorskip("diffusers")

STATE = ("amax", "_segquant_", "pre_quant_scale")


def _quantized_state():
    import segquant
    from segquant.app.embedded import load_denoiser, sample
    from segquant.recipe import load_recipe

    torch.set_num_threads(1)
    fp = load_denoiser("mnist-flux", "cpu")
    recipe = load_recipe("mnist-flux/int8_w8a8")
    plan = recipe.apply(segquant.analyze(fp.model, **fp.example_inputs(2))).with_shift("per_tensor")

    def loop(_model):  # batches of 2: each rank samples one of the two, as one process samples both
        sample(fp, torch.arange(4), seed=5, steps=2, batch_size=2, progress=False)

    model = segquant.get_backend("modelopt").quantize(fp.model, plan, recipe.quantize_options(False), loop)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if any(s in k for s in STATE)}


def _worker(rank, world, init_file, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = _quantized_state()
        if rank == 0:  # numpy arrays travel by value (a tensor's shared memory dies with this process)
            queue.put({k: v.float().numpy() for k, v in state.items()})
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_quantize_bit_identical_to_one_process(tmp_path):
    single = _quantized_state()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    sharded = {k: torch.from_numpy(v) for k, v in queue.get(timeout=300).items()}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert single.keys() == sharded.keys() and len(single) > 100
    assert any("_segquant_center" in k for k in single)  # the shift's centres are merged too
    differing = [k for k in single if not torch.equal(single[k].float(), sharded[k])]
    assert differing == []
