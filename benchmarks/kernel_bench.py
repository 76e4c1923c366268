"""GEMM timings per FLUX layer kind (M = 4608 tokens = 1024x1024 image + 512 text tokens): bf16, fp8 on
cuBLAS (``torch._scaled_mm``) and on our Triton GEMM, DualScale naive (M doubled) and fused (Triton),
int8 on ``torch._int_mm`` and on our Triton GEMM; plus per-token DualScale fp8 quantization in torch. Every GEMM is
checked against segquant.numerics (max |y - ref| / max |ref|, ok below 2e-2 = bf16 output rounding) before
it is timed. Codes are made once; the GEMM alone is timed (``triton.testing.do_bench``, median).

    python benchmarks/kernel_bench.py --out DIR [--quick]   # on the device: CUDA + triton, no diffusers
    python benchmarks/kernel_bench.py --report DIR          # DIR/kernel_bench.jsonl -> .md (+ .png)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch


M = 4608
# name, K, N, DualScale K range or None, input kind
LAYERS = [
    ("qkv", 3072, 9216, None, "normal"),
    ("ff_up", 3072, 12288, None, "normal"),
    ("ff_down", 12288, 3072, (0, 12288), "gelu"),
    ("proj_out", 15360, 3072, (3072, 15360), "attn|gelu"),
]
QUICK = ("ff_down", "proj_out")
TOL = 2e-2


def make_input(kind: str, m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    gelu = torch.nn.functional.gelu
    if kind == "normal":
        x = randn(m, k)
    elif kind == "gelu":
        x = gelu(randn(m, k) * 2, approximate="tanh")
    else:
        x = torch.cat([randn(m, 3072) * 3, gelu(randn(m, k - 3072) * 2, approximate="tanh")], -1)
    return x.to(torch.bfloat16)


def bench_ms(fn, rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def code_dtype(precision: str) -> torch.dtype:
    return torch.float8_e4m3fn if precision == "fp8" else torch.int8


def operands(x: torch.Tensor, w: torch.Tensor, precision: str, dual: tuple[int, int] | None) -> dict:
    """Codes, scales and the numerics reference of one layer for one precision."""
    from segquant import numerics as nx

    xf = x.float()
    ws = nx.scale_from_amax(w.abs().amax(1, keepdim=True), precision)
    w_hat = nx.fake_quant(w, ws, precision)
    wq = nx.quantize(w, ws, precision).to(code_dtype(precision))
    s = nx.scale_from_amax(nx.amax_per_token(xf), precision)
    q = nx.quantize(xf, s, precision)
    out = dict(wq=wq, ws=ws.reshape(1, -1), q=q.to(code_dtype(precision)), s=s, ref=(q * s) @ w_hat.t())
    if dual is not None:
        lo, hi = dual
        qd, sp, sn = nx.dual_scale_quantize(xf[:, lo:hi], precision, per_token=True)
        outside = torch.cat([xf[:, :lo], xf[:, hi:]], -1)
        q_out = nx.quantize(outside, sp, precision)  # outside the range the codes read with s+
        codes = torch.cat([q_out[:, :lo], qd, q_out[:, lo:]], -1)
        x_hat = torch.cat([(q_out * sp)[:, :lo], nx.dual_scale_dequantize(qd, sp, sn), (q_out * sp)[:, lo:]], -1)
        neg = torch.zeros_like(codes, dtype=torch.bool)
        neg[:, lo:hi] = codes[:, lo:hi] < 0
        out.update(qd=codes.to(code_dtype(precision)), sp=sp, sn=sn, ref_dual=x_hat @ w_hat.t(),
                   q_pos=torch.where(neg, 0.0, codes).to(code_dtype(precision)),
                   q_neg=torch.where(neg, codes, 0.0).to(code_dtype(precision)))
    return out


def methods(x: torch.Tensor, w: torch.Tensor, dual: tuple[int, int] | None) -> list:
    """(method, precision, fn, reference or None) per variant."""
    from segquant_torchao import kernels as tk
    from segquant_torchao import triton_gemm as tg

    bf16 = torch.bfloat16
    wb = w.to(bf16)
    out = [("bf16", "bf16", lambda: torch.nn.functional.linear(x, wb), None)]
    for precision in ("fp8", "int8"):
        o = operands(x, w, precision, dual)
        m = x.shape[0]
        cublas = "fp8_cublas_scaled_mm" if precision == "fp8" else "int8_torch_int_mm"
        out.append((cublas, precision, lambda o=o, m=m: tk.scaled_mm(o["q"], o["wq"], o["s"].expand(m, 1), o["ws"],
                                                                       bf16, fast_accum=True), o["ref"]))
        if precision == "int8":
            compiled = torch.compile(lambda q, wq, s, ws: tk.scaled_mm(q, wq, s, ws, bf16), fullgraph=True)
            out.append(("int8_torch_int_mm_compiled", precision,
                        lambda o=o, f=compiled: f(o["q"], o["wq"], o["s"], o["ws"]), o["ref"]))
        out.append((f"{precision}_triton", precision,
                    lambda o=o: tg.scaled_gemm(o["q"], o["wq"], o["s"], o["ws"], bf16), o["ref"]))
        if dual is not None:
            out.append((f"{precision}_dual_naive_2M", precision,
                        lambda o=o: tk.dual_scale_mm(o["q_pos"], o["q_neg"], o["wq"], o["sp"], o["sn"], o["ws"],
                                                     bf16, fast_accum=True), o["ref_dual"]))
            out.append((f"{precision}_dual_fused_triton", precision,
                        lambda o=o: tg.dual_scale_gemm(o["qd"], o["wq"], o["sp"], o["sn"], o["ws"], bf16,
                                                       dual_range=dual), o["ref_dual"]))
        if precision == "fp8" and dual is not None:
            out += quant_methods(x, dual)
    return out


def quant_methods(x: torch.Tensor, dual: tuple[int, int]) -> list:
    """Per-token DualScale fp8 quantization of the DualScale range in torch, eager and compiled."""
    from segquant import numerics as nx
    from segquant_torchao.kernels import codes

    part = x[:, dual[0]:dual[1]]

    def torch_quant(v):
        vf = v.float()
        sp = nx.scale_from_amax(vf.clamp(min=0).amax(-1, keepdim=True), "fp8")
        sn = nx.scale_from_amax((-vf).clamp(min=0).amax(-1, keepdim=True), "fp8", negative=True)
        return codes(torch.where(vf >= 0, vf / sp, vf / sn), 1.0, "fp8"), sp, sn

    compiled = torch.compile(torch_quant, fullgraph=True)
    return [("quant_fp8_dual_torch_eager", "fp8", lambda: torch_quant(part), "quant"),
            ("quant_fp8_dual_torch_compiled", "fp8", lambda: compiled(part), "quant")]


def check_quant(x: torch.Tensor, dual: tuple[int, int], got) -> dict:
    from segquant import numerics as nx

    q_ref, sp, sn = nx.dual_scale_quantize(x[:, dual[0]:dual[1]].float(), "fp8", per_token=True)
    q, s_pos, s_neg = got
    mismatch = (q.float() != q_ref).float().mean().item()
    scale_err = max(((s_pos.reshape(-1) - sp.reshape(-1)).abs() / sp.reshape(-1)).max().item(),
                    ((s_neg.reshape(-1) - sn.reshape(-1)).abs() / sn.reshape(-1)).max().item())
    x_err = rel_err(nx.dual_scale_dequantize(q.float(), s_pos.reshape(-1, 1), s_neg.reshape(-1, 1)),
                    nx.dual_scale_dequantize(q_ref, sp, sn))
    # division rounding may move a code by one step at a tie; the dequantized tensor must still agree
    return dict(code_mismatch_fraction=mismatch, scale_rel_err=scale_err, max_err_vs_reference=x_err,
                reference_ok=mismatch < 1e-3 and scale_err < 1e-6 and x_err < TOL)


def run(out_dir: Path, quick: bool, git: str) -> None:
    import triton

    from segquant_torchao import triton_gemm as tg

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "kernel_bench.jsonl"
    meta = dict(bench="gemm_kernel", device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, git=git, quick=quick)
    torch._dynamo.config.cache_size_limit = 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    rep = 50 if quick else 200
    with path.open("a") as fh, torch.inference_mode():
        for name, k, n, dual, kind in LAYERS:
            if quick and name not in QUICK:
                continue
            x = make_input(kind, M, k, gen)
            w = torch.randn(n, k, generator=gen, device="cuda") * k ** -0.5
            try:
                variants = methods(x, w, dual)
            except Exception as e:  # noqa: BLE001 - recorded, the next layer still runs
                rec = dict(meta, layer=name, error=f"setup: {type(e).__name__}: {str(e)[:300]}")
                print(json.dumps(rec), flush=True)
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                continue
            plain_ms = {}
            for method, precision, fn, ref in variants:
                rec = dict(meta, layer=name, M=M, K=k, N=n, method=method, precision=precision,
                           dual_range=list(dual) if dual and "dual" in method else None)
                try:
                    start = time.perf_counter()
                    y = fn()
                    torch.cuda.synchronize()
                    rec["first_call_s"] = round(time.perf_counter() - start, 2)  # autotuning / compile
                    if isinstance(ref, str):
                        rec.update(check_quant(x, dual, y))
                    elif ref is not None:
                        rec["max_err_vs_reference"] = rel_err(y, ref)
                        rec["reference_ok"] = rec["max_err_vs_reference"] < TOL
                    ms = bench_ms(fn, rep)
                    rec["ms_median"] = ms
                    if not method.startswith("quant"):
                        rec["tflops"] = round(2 * M * k * n / ms / 1e9, 1)
                    if method in ("bf16", "fp8_cublas_scaled_mm"):
                        plain_ms[method] = ms
                    if "bf16" in plain_ms and not method.startswith("quant"):
                        rec["speedup_vs_bf16"] = round(plain_ms["bf16"] / ms, 3)
                    if "fp8_cublas_scaled_mm" in plain_ms:  # quant rows: their cost as a share of the GEMM
                        rec["x_plain_fp8"] = round(ms / plain_ms["fp8_cublas_scaled_mm"], 3)
                    if "triton" in method and not method.startswith("quant"):
                        tuner = tg.dual_tuned if "dual" in method else tg.plain_tuned
                        rec["triton_config"] = str(getattr(tuner, "best_config", None))
                except Exception as e:  # noqa: BLE001 - a failing variant is recorded, not hidden
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc()
                print(json.dumps(rec), flush=True)
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
            del variants
            torch.cuda.empty_cache()


def report(out_dir: Path, command: str) -> None:
    rows = [json.loads(line) for line in (out_dir / "kernel_bench.jsonl").read_text().splitlines() if line.strip()]
    meta = next((r for r in rows if "device" in r), {})
    lines = [f"# GEMM kernels on FLUX shapes, {meta.get('device')}", "",
             f"torch {meta.get('torch')}, triton {meta.get('triton')}, git {meta.get('git')}. GEMM only (codes made "
             "beforehand), `triton.testing.do_bench` median, bf16 output, per-token activation scales, per-channel "
             "weight scales. `x fp8` = time / cuBLAS fp8 row-wise GEMM of the same shape (DualScale target <= 1.3; "
             "for the quantization rows, their cost as a share of that GEMM). "
             f"`err` = max |y - segquant.numerics| / max |ref| (ok < {TOL}); quant rows: fraction of codes unequal "
             "to numerics.dual_scale_quantize.", f"Command: `{command}`", "",
             "| layer | M x K x N | method | ms | TFLOP/s | x bf16 | x fp8 | err | first call s | config |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('layer')} | | {r.get('method', '')} | error: {r['error'][:100]} |||||||")
            continue
        err = "-"
        if "code_mismatch_fraction" in r:
            err = f"{r['code_mismatch_fraction']:.1e} codes ({'ok' if r['reference_ok'] else 'FAIL'})"
        elif "max_err_vs_reference" in r:
            err = f"{r['max_err_vs_reference']:.1e} ({'ok' if r['reference_ok'] else 'FAIL'})"
        lines.append(f"| {r['layer']} | {r['M']}x{r['K']}x{r['N']} | {r['method']} | {r['ms_median']:.3f} | "
                     f"{r.get('tflops', '-')} | {r.get('speedup_vs_bf16', '-')} | {r.get('x_plain_fp8', '-')} | {err} | "
                     f"{r.get('first_call_s', '-')} | {r.get('triton_config', '') or ''} |")
    (out_dir / "kernel_bench.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
    except ImportError:
        print("matplotlib missing: no kernel_bench.png")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gemm = [r for r in rows if "ms_median" in r and not r["method"].startswith("quant")]
    layers = list(dict.fromkeys(r["layer"] for r in gemm))
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 4), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        sub = [r for r in gemm if r["layer"] == layer]
        ax.barh(range(len(sub)), [r.get("speedup_vs_bf16", 0) for r in sub],
                color=["grey" if r["method"] == "bf16" else "tab:orange" if "triton" in r["method"] else "tab:blue"
                       for r in sub])
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_yticks(range(len(sub)))
        ax.set_yticklabels([r["method"] for r in sub], fontsize=7)
        ax.set_title(f"{layer} {sub[0]['M']}x{sub[0]['K']}x{sub[0]['N']}", fontsize=8)
        ax.set_xlabel("speed-up vs bf16", fontsize=7)
    fig.suptitle(f"GEMM speed-up vs bf16 on {meta.get('device')} (orange: our Triton kernels)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "kernel_bench.png", dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="run on the GPU, append to DIR/kernel_bench.jsonl")
    group.add_argument("--report", type=Path, help="DIR/kernel_bench.jsonl -> .md and .png")
    parser.add_argument("--quick", action="store_true", help="ff_down and proj_out only, shorter timing")
    parser.add_argument("--git", default=os.environ.get("GIT_SHA", "unknown"))
    parser.add_argument("--command", default="python benchmarks/kernel_bench.py --out $OUT")
    args = parser.parse_args()
    if args.out:
        if not torch.cuda.is_available():
            sys.exit("kernel_bench.py --out needs a CUDA device")
        run(args.out, args.quick, args.git)
        report(args.out, args.command)
    else:
        report(args.report, args.command)
