"""Attention at FLUX.1-dev's shape (24 heads, 4608 tokens, head dim 128, batch 1) on the GPU: torch's bf16 SDPA
(cuDNN / flash, as the compiled denoiser runs it) against segquant_torchao.int8_attention (INT8 Q K^T with
per-64-token-block scales, fp16 P V; the quantization of Q and K timed with it and apart), each checked against
float32 attention (SQNR) before it is timed (``triton.testing.do_bench``, median). Results: attention_bench.{json,md}.

    python benchmarks/attention_bench.py --out DIR          # on the device (CUDA + triton)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from _common import figure, timing_bars
from _gpu_bench import gpu_bench_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"flux.1-dev 1024x1024": (1, 24, 4608, 128)}


def attention_tflops(b: int, h: int, s: int, d: int, ms: float) -> float:
    """Dense attention FLOPs (Q K^T and P V: 4 b h s^2 d) per second, in TFLOP/s."""
    return 4 * b * h * s * s * d / (ms * 1e-3) / 1e12


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    return 10 * math.log10(ref.float().pow(2).mean().item() / (got.float() - ref.float()).pow(2).mean().item())


def run(out: Path, rep_ms: int) -> dict:
    import triton
    import triton.testing

    from segquant_torchao.int8_attention import int8_attention, quantize_per_block, tuned_config

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (b, h, s, d) in SHAPES.items():
        q, k, v = (torch.randn(b, h, s, d, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        exact = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
        centred = k.float() - k.float().mean(2, keepdim=True)
        methods = {
            "bf16 sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
            "int8 qk (kernel + quantization)": lambda: int8_attention(q, k, v),
            "int8 qk: quantization of q and k only": lambda: (quantize_per_block(q), quantize_per_block(centred)),
        }
        for method, fn in methods.items():
            y = fn()
            row = dict(shape=name, b=b, h=h, s=s, d=d, method=method)
            if isinstance(y, torch.Tensor):
                row["sqnr_vs_fp32_db"] = round(sqnr_db(exact, y), 2)
            row["ms"] = round(float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")), 4)
            row["tflops"] = round(attention_tflops(b, h, s, d, row["ms"]), 1) if isinstance(y, torch.Tensor) else None
            if method.startswith("int8 qk (kernel"):
                row["config"] = tuned_config()  # the autotuner's tiles, warps and stages for this shape
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  command=" ".join(["python", *sys.argv]), rows=rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    write_report(result, out)
    return result


def config_text(config: dict | None) -> str:
    """``BLOCK_M=128 BLOCK_N=64 w8 s3`` for a recorded autotune choice; ``-`` where none was recorded."""
    if not config:
        return "-"
    tiles = " ".join(f"{k}={v}" for k, v in config.items() if k not in ("num_warps", "num_stages"))
    return f"{tiles} w{config.get('num_warps')} s{config.get('num_stages')}"


def write_report(result: dict, out: Path) -> None:
    """attention_bench.md from a result (``run``'s, or a stored attention_bench.json: ``--report``)."""
    lines = [f"# Attention at FLUX.1-dev's shape, {result['device']}", "",
             f"torch {result['torch']}, triton {result['triton']}; `triton.testing.do_bench` median. Command: "
             f"`{result['command']}`", "", "| shape | method | ms | TFLOP/s | SQNR vs fp32 dB | autotuned config |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['method']} | {r['ms']} | {r['tflops'] or '-'} | {r.get('sqnr_vs_fp32_db', '-')} | "
              f"{config_text(r.get('config'))} |" for r in result["rows"]]
    lines += [""] + result.get("notes", [])
    lines += ["", "![ms per call](attention_bench.png)"]
    (out / "attention_bench.md").write_text("\n".join(lines).rstrip("\n") + "\n")
    with figure(out / "attention_bench.png", figsize=(7, 2.6)) as (_, ax):
        rows = result["rows"]
        timing_bars(ax, [r["method"] for r in rows], [r["ms"] for r in rows], "bf16 sdpa",
                    f"attention, {rows[0]['shape']} (24 heads, 4608 tokens, d 128), {result['device']}")


def main() -> None:
    gpu_bench_main(__doc__, "attention_bench.py", 100, run, write_report)


if __name__ == "__main__":
    main()
