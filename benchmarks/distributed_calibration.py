"""Calibration wall time on 1 and 2 GPUs, and proof that the scales are bit for bit the same.

A FLUX.1-dev-size transformer (random bf16 weights, as in speed.py; ``--blocks`` shrinks it) is calibrated on
``--batches`` synthetic denoiser calls (4096 image + 512 text tokens each, batch 1, its own seed per call) with
SegQuant's calibration machinery, the one both backends run (``SegmentAmaxObserver`` on every planned Linear,
then ``segquant.calib.check_calibration``, which merges the ranks' observers). Each rank takes every
world-size-th call (``segquant.distributed.shard``). Rank 0 stores per-layer static scales (per-segment amax,
positive/negative amax, shift centres) to compare the runs.

    python benchmarks/distributed_calibration.py --gpus 1 2 --out DIR     # driver: one torchrun per GPU count
    python benchmarks/distributed_calibration.py --cpu-smoke --gpus 1 2 --out /tmp/dc   # gloo, tiny model
    python benchmarks/distributed_calibration.py --report DIR              # DIR/*.json -> distributed_calibration.md
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import environment, environment_line, flux_call_inputs, parser, write_results

import segquant
from segquant.calib import SegmentAmaxObserver, check_calibration
from segquant.distributed import shard
from segquant.recording import record_linears

ROOT = Path(__file__).resolve().parents[1]
IMAGE_TOKENS, TEXT_TOKENS = 4096, 512


def build(device: str, blocks: int | None, tiny: bool):
    from diffusers import FluxTransformer2DModel

    cfg = json.loads((ROOT / f"segquant/configs/{'tiny-flux' if tiny else 'flux.1-dev'}.json").read_text())
    cfg.pop("_class_name", None)
    if blocks is not None:
        cfg.update(num_layers=blocks, num_single_layers=2 * blocks)
    with torch.device("meta"):
        meta = FluxTransformer2DModel(**cfg)
    dtype = torch.float32 if tiny else torch.bfloat16
    model = FluxTransformer2DModel(**cfg).to(dtype) if tiny else meta.to(dtype).to_empty(device=device)
    model = model.to(device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).to(p.dtype) * 0.02)
    return model, meta, dtype


def call_inputs(model, index: int, device: str, dtype, tokens: tuple[int, int]) -> dict:
    """The denoiser call ``index`` (its own seed: the same on every rank and in every world size)."""
    return flux_call_inputs(model, torch.Generator(device=device).manual_seed(1000 + index), dtype, *tokens)


def worker(args) -> None:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = "cpu" if args.cpu_smoke else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if world > 1:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("gloo" if args.cpu_smoke else "nccl")
    model, meta, dtype = build(device, args.blocks, args.cpu_smoke)
    plan = segquant.load_recipe("flux.1-dev/int8_w8a8").apply(segquant.analyze(meta, **segquant.example_inputs(meta))).with_shift("per_tensor")
    tokens = (16, 8) if args.cpu_smoke else (IMAGE_TOKENS, TEXT_TOKENS)
    observers = {n: SegmentAmaxObserver(plan[n]) for n in plan.quantized_layers()}
    mine = shard(list(range(args.batches)))
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)  # noqa: E731
    with torch.inference_mode():  # warm-up, not observed: kernels chosen and memory allocated before timing
        model(**call_inputs(model, args.batches, device, dtype, tokens))
    if world > 1:
        torch.distributed.barrier()
    sync()
    start = time.perf_counter()
    with torch.inference_mode(), record_linears(model, observers, keep=False,
                                                on_input=lambda n, x: observers[n].update(x)):
        for i in mine:
            model(**call_inputs(model, i, device, dtype, tokens))
    sync()
    observed = time.perf_counter() - start
    check_calibration(observers)  # merges across the ranks
    total = time.perf_counter() - start
    if rank == 0:
        stats = {n: obs.stats() for n, obs in observers.items()}
        torch.save({n: (s.amax, s.pos_amax, s.neg_amax, s.center) for n, s in stats.items()},
                   Path(args.out) / f"scales_{world}.pt")
        record = {"world_size": world, "batches": args.batches, "batches_rank0": len(mine), "layers": len(observers),
                  "observe_s": observed, "calibration_s": total, "tokens": tokens, "blocks": args.blocks,
                  "environment": environment(device)}
        (Path(args.out) / f"calibration_{world}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k != "environment"}), flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()


def drive(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in args.gpus:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   __file__, "--worker", "--out", str(out), "--batches", str(args.batches)]
        command += (["--blocks", str(args.blocks)] if args.blocks is not None else []) + \
            (["--cpu-smoke"] if args.cpu_smoke else [])
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    report(out)


def report(out: Path) -> None:
    runs = sorted((json.loads(p.read_text()) for p in out.glob("calibration_*.json")), key=lambda r: r["world_size"])
    if not runs:
        raise SystemExit(f"no calibration_*.json in {out}")
    base = torch.load(out / f"scales_{runs[0]['world_size']}.pt", map_location="cpu")
    lines = ["# Calibration across GPUs", "", environment_line(runs[-1]["environment"]), "",
             f"{'tiny FLUX (CPU smoke)' if runs[0]['tokens'][0] < IMAGE_TOKENS else 'FLUX.1-dev-size transformer'} "
             f"({runs[0]['blocks'] or 'all'} double blocks), {runs[0]['layers']} calibrated "
             f"Linears (recipe flux.1-dev/int8_w8a8 with shift), {runs[0]['batches']} denoiser calls of "
             f"{runs[0]['tokens'][0]}+{runs[0]['tokens'][1]} tokens; calls sharded over the ranks, observers merged by "
             "`check_calibration`.", "", "| GPUs | calls on rank 0 | observe (s) | with merge (s) | speedup | scales "
             "equal to 1 GPU |", "|---|---|---|---|---|---|"]
    for r in runs:
        other = torch.load(out / f"scales_{r['world_size']}.pt", map_location="cpu")
        equal = base.keys() == other.keys() and all(
            all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                for x, y in zip(base[n], other[n])) for n in base)
        r["scales_bit_identical"] = equal
        lines.append(f"| {r['world_size']} | {r['batches_rank0']} | {r['observe_s']:.2f} | {r['calibration_s']:.2f} | "
                     f"{runs[0]['calibration_s'] / r['calibration_s']:.2f}x | {'yes, bit for bit' if equal else 'NO'} |")
    write_results(out, "distributed_calibration", {"runs": runs}, "\n".join(lines))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, default=32)
    p.add_argument("--blocks", type=int, default=None, help="double blocks (single = 2x); default: the full config")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny FLUX on CPU with gloo (checks the logic)")
    p.add_argument("--worker", action="store_true", help=argparse_hidden())
    p.add_argument("--report", type=Path, help="only write the report of DIR")
    args = p.parse_args()
    if args.report:
        return report(args.report)
    return worker(args) if args.worker else drive(args)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
