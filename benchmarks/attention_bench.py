"""Attention at FLUX.1-dev's shape (24 heads, 4608 tokens, head dim 128, batch 1) on the GPU: torch's bf16 SDPA
(cuDNN / flash, as the compiled denoiser runs it) against segquant_torchao.int8_attention (INT8 Q K^T with
per-64-token-block scales, fp16 P V; the quantization of Q and K timed with it and apart) and, with
``--fa3-library`` (or an installed flash_attn_3), FlashAttention-3's bf16 and e4m3 kernels
(segquant_torchao.fa3_attention: Q, K, V per head, K centred; the kernel alone, and compiled with its
quantization). Each is checked against float32 attention (SQNR) before it is timed (``triton.testing.do_bench``,
median); the e4m3 kernel also against segquant.attention's FP8 reference. Results: attention_bench.{json,md}.

    python benchmarks/attention_bench.py --out DIR [--fa3-library _C.so]   # on the device (CUDA + triton)
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


def fa3_methods(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """FlashAttention-3's bf16 and e4m3 kernels on ``(B, H, S, D)`` inputs (as ``(B, S, H, D)`` views): the e4m3
    kernel alone on codes made once, and compiled with its per-call quantization."""
    from segquant_torchao.fa3_attention import _fa3_codes, fa3_fp8_attention, fp8_codes

    bshd = [t.transpose(1, 2) for t in (q, k, v)]
    scale = q.shape[-1] ** -0.5
    (q8, qs), (k8, ks), (v8, vs) = fp8_codes(bshd[0]), fp8_codes(bshd[1], centre=True), fp8_codes(bshd[2])
    with_quantization = torch.compile(fa3_fp8_attention)
    return {
        "fa3 bf16": lambda: torch.ops.flash_attn_3.fwd(*bshd, softmax_scale=scale)[0].transpose(1, 2),
        "fa3 e4m3 (kernel alone)": lambda: _fa3_codes(q8, k8, v8, qs, ks, vs, scale).transpose(1, 2),
        "fa3 e4m3 (kernel + quantization, compiled)": lambda: with_quantization(*bshd).transpose(1, 2),
    }


def run(out: Path, rep_ms: int, fa3_library: Path | None = None) -> dict:
    import triton
    import triton.testing

    from segquant.attention import FP8AttentionSpec, fp8_attention
    from segquant_torchao.fa3_attention import fa3_loaded, load_fa3
    from segquant_torchao.int8_attention import int8_attention, quantize_per_block, tuned_config

    try:
        load_fa3(fa3_library)
    except Exception as e:  # noqa: BLE001 - without FlashAttention-3 its rows are left out, and the report says so
        if fa3_library is not None:
            raise
        print(f"FlashAttention-3 rows left out: {e}", flush=True)
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
        if fa3_loaded():
            methods.update(fa3_methods(q, k, v))
        fp8_reference = fp8_attention(q, k, v, FP8AttentionSpec(), layout="bhsd")
        for method, fn in methods.items():
            y = fn()
            row = dict(shape=name, b=b, h=h, s=s, d=d, method=method)
            if isinstance(y, torch.Tensor):
                row["sqnr_vs_fp32_db"] = round(sqnr_db(exact, y), 2)
            if method.startswith("fa3 e4m3"):
                row["sqnr_vs_fp8_reference_db"] = round(sqnr_db(fp8_reference, y), 2)
            row["ms"] = round(float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")), 4)
            row["tflops"] = round(attention_tflops(b, h, s, d, row["ms"]), 1) if isinstance(y, torch.Tensor) else None
            if method.startswith("int8 qk (kernel"):
                row["config"] = tuned_config()  # the autotuner's tiles, warps and stages for this shape
            rows.append(row)
            print(json.dumps(row), flush=True)
        rows.append(dict(shape=name, b=b, h=h, s=s, d=d, method="fp8 reference (segquant.attention, float32 math)",
                         sqnr_vs_fp32_db=round(sqnr_db(exact, fp8_reference), 2), ms=None, tflops=None))
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  command=" ".join(["python", *sys.argv]), rows=rows, fa3=fa3_loaded())
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
             f"`{result['command']}`", "",
             "| shape | method | ms | TFLOP/s | SQNR vs fp32 dB | SQNR vs FP8 reference dB | autotuned config |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['method']} | {r['ms'] or '-'} | {r['tflops'] or '-'} | "
              f"{r.get('sqnr_vs_fp32_db', '-')} | {r.get('sqnr_vs_fp8_reference_db', '-')} | "
              f"{config_text(r.get('config'))} |" for r in result["rows"]]
    if not result.get("fa3", True):
        lines += ["", "FlashAttention-3 was not installed (no `--fa3-library`): its rows are left out."]
    lines += [""] + result.get("notes", [])
    lines += ["", "![ms per call](attention_bench.png)"]
    (out / "attention_bench.md").write_text("\n".join(lines).rstrip("\n") + "\n")
    with figure(out / "attention_bench.png", figsize=(7, 2.6)) as (_, ax):
        rows = [r for r in result["rows"] if r["ms"] is not None]
        timing_bars(ax, [r["method"] for r in rows], [r["ms"] for r in rows], "bf16 sdpa",
                    f"attention, {rows[0]['shape']} (24 heads, 4608 tokens, d 128), {result['device']}")


def add_arguments(parser) -> None:
    parser.add_argument("--fa3-library", type=Path, default=None,
                        help="FlashAttention-3's built _C.so (benchmarks/fa3_build.py); default: flash_attn_3 if "
                             "installed")


def main() -> None:
    gpu_bench_main(__doc__, "attention_bench.py", 100, run, write_report, add_arguments)


if __name__ == "__main__":
    main()
