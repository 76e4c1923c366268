"""The Triton INT8 GEMM against cuBLAS FP8 and bf16 on every GEMM shape of one FLUX.1-dev call (1024x1024:
4096 image + 512 text tokens in the double blocks, 4608 in the single blocks), per kernel variant and tile
config: the data for choosing the INT8 kernel and its autotune configs (target: INT8 1.3x bf16 end to end).

Variants: ``pointer`` (segquant_torchao.triton_gemm's kernel, as shipped: autotuned, and each config of
``POINTER_CONFIGS`` explicitly), ``tma`` (the same epilogue; operands loaded through host TMA descriptors) and
``tma_persistent`` (one program per SM walking the tiles), each also with Triton's warp specialization
(``_ws``: ``tl.range(..., warp_specialize=True)``). ``pointer_autotuned`` goes through the public entry point and
its custom op, so on small shapes its time includes the host's launch overhead (CUDA graphs remove that).
Every candidate is checked against the float
reference (max |y - ref| / max |ref| below 2e-2, bf16 output rounding) before it is timed
(``triton.testing.do_bench``, median). The per-call total weights each shape by how often one call runs it.

    python benchmarks/int8_gemm_sweep.py --out DIR            # on the device (CUDA + triton)
    python benchmarks/int8_gemm_sweep.py --report DIR         # DIR/int8_gemm_sweep.json -> .md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (M, K, N) -> how many GEMMs of that shape one FLUX.1-dev call runs (19 double blocks: image M=4096 and text
# M=512 streams, q/k/v/out + MLP up/down each; 38 single blocks, M=4608: q/k/v, proj_mlp, proj_out)
FLUX_SHAPES: dict[tuple[int, int, int], int] = {
    (4096, 3072, 3072): 4 * 19, (4096, 3072, 12288): 19, (4096, 12288, 3072): 19,
    (512, 3072, 3072): 4 * 19, (512, 3072, 12288): 19, (512, 12288, 3072): 19,
    (4608, 3072, 3072): 3 * 38, (4608, 3072, 12288): 38, (4608, 15360, 3072): 38,
}
# BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages
POINTER_CONFIGS = [(128, 256, 128, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 128, 128, 8, 8, 4),
                   (256, 128, 64, 8, 8, 3), (64, 128, 128, 8, 4, 4), (128, 256, 128, 8, 8, 4),
                   (256, 128, 128, 8, 8, 3), (128, 128, 256, 8, 8, 3), (128, 128, 128, 8, 4, 4),
                   (128, 128, 128, 16, 8, 5), (64, 256, 128, 8, 4, 4), (128, 64, 128, 8, 4, 5)]
TMA_CONFIGS = [(128, 256, 128, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 128, 128, 8, 8, 4),
               (256, 128, 128, 8, 8, 3), (128, 128, 128, 8, 4, 5), (64, 256, 128, 8, 4, 4),
               (128, 256, 128, 8, 8, 4), (256, 128, 128, 8, 8, 4), (128, 128, 256, 8, 8, 3)]
TOL = 2e-2
METHODS = ("bf16", "fp8_cublas", "pointer_autotuned", "pointer", "tma", "tma_persistent", "tma_ws",
           "tma_persistent_ws")
"""The report's columns: torch's GEMMs, the shipped kernel (autotuned: host overhead included), each variant's best
config per shape."""


def per_call_ms(times: dict[tuple[int, int, int], float | None]) -> float | None:
    """Sum over FLUX_SHAPES of count x time; None when a shape has no time."""
    if any(times.get(shape) is None for shape in FLUX_SHAPES):
        return None
    return sum(n * times[shape] for shape, n in FLUX_SHAPES.items())


def best_per_shape(rows: list[dict], prefix: str) -> dict[tuple[int, int, int], dict]:
    """Per shape, the fastest ok row whose method starts with ``prefix``."""
    out: dict[tuple[int, int, int], dict] = {}
    for r in rows:
        if not r["method"].startswith(prefix) or r.get("ms") is None or not r.get("ok"):
            continue
        shape = tuple(r["shape"])
        if shape not in out or r["ms"] < out[shape]["ms"]:
            out[shape] = r
    return out


def config_name(cfg: tuple) -> str:
    m, n, k, g, w, s = cfg
    return f"{m}x{n}x{k} g{g} w{w} s{s}"


# ---- GPU side -------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl

    # the shipped kernels' tile order and epilogue: the variants below differ from them in their loads only
    from segquant_torchao.triton_gemm import grouped_tile, store_scaled

    HAS_TRITON = True
except ImportError:  # the CPU without triton or torchao: the pure functions above still work (tests)
    HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def _tma_tile(a_desc, w_desc, out_ptr, sp_ptr, ws_ptr, pid_m, pid_n, M, N, K, stride_om, stride_sp,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
        """One output tile: int32 sums of TMA-loaded tiles, then the shipped epilogue (no bias)."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in tl.range(0, tl.cdiv(K, BLOCK_K), warp_specialize=WARP_SPECIALIZE):
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        y = acc.to(tl.float32) * tl.load(sp_ptr + offs_m * stride_sp, mask=offs_m < M, other=0.0)[:, None]
        store_scaled(y, offs_m, pid_n * BLOCK_N + tl.arange(0, BLOCK_N), M, N, ws_ptr, out_ptr, out_ptr, stride_om,
                     False)

    @triton.jit
    def tma_kernel(a_desc, w_desc, out_ptr, sp_ptr, ws_ptr, M, N, K, stride_om, stride_sp,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   WARP_SPECIALIZE: tl.constexpr = False):
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _tma_tile(a_desc, w_desc, out_ptr, sp_ptr, ws_ptr, pid_m, pid_n, M, N, K, stride_om, stride_sp,
                  BLOCK_M, BLOCK_N, BLOCK_K, WARP_SPECIALIZE)

    @triton.jit
    def tma_persistent_kernel(a_desc, w_desc, out_ptr, sp_ptr, ws_ptr, M, N, K, stride_om, stride_sp,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr = False):
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles, NUM_SMS, flatten=True):
            pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            _tma_tile(a_desc, w_desc, out_ptr, sp_ptr, ws_ptr, pid_m, pid_n, M, N, K, stride_om, stride_sp,
                      BLOCK_M, BLOCK_N, BLOCK_K, WARP_SPECIALIZE)


def run(out_dir: Path, git: str, rep_ms: int) -> None:
    import triton
    import triton.testing
    from triton.tools.tensor_descriptor import TensorDescriptor

    from segquant_torchao.triton_gemm import plain_tuned, scaled_gemm

    out_dir.mkdir(parents=True, exist_ok=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows: list[dict] = []
    gen = torch.Generator(device="cuda").manual_seed(0)

    def bench(fn) -> float:
        return float(triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))

    for (m, k, n) in FLUX_SHAPES:
        a = torch.randint(-127, 128, (m, k), generator=gen, device="cuda", dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8)
        s_a = torch.rand(m, generator=gen, device="cuda") * 1e-3 + 1e-4
        s_w = torch.rand(n, generator=gen, device="cuda") * 1e-3 + 1e-4
        ref = (a.float() @ w.float().t()) * s_a[:, None] * s_w[None, :]
        xb = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        wb = torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        f8a, f8w = xb.to(torch.float8_e4m3fn), wb.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")

        def record(method: str, fn, check=None, config: str = "") -> None:
            row = dict(shape=[m, k, n], method=method, config=config)
            try:
                start = time.perf_counter()
                y = fn()
                torch.cuda.synchronize()
                row["first_call_s"] = round(time.perf_counter() - start, 2)
                if check is not None:
                    row["err"] = float(((y.float() - check).abs().max() / check.abs().max()).item())
                    row["ok"] = row["err"] < TOL
                else:
                    row["ok"] = True
                row["ms"] = round(bench(fn), 4) if row["ok"] else None
                row["tflops"] = round(2 * m * k * n / row["ms"] / 1e9, 1) if row["ms"] else None
            except Exception as e:  # noqa: BLE001 - a variant that does not compile or run is a result
                row.update(ok=False, ms=None, error=f"{type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc()
            rows.append(row)
            print(json.dumps(row), flush=True)

        record("bf16", lambda: xb @ wb.t())
        record("fp8_cublas", lambda: torch._scaled_mm(f8a, f8w.t(), scale_a=one, scale_b=one,
                                                      out_dtype=torch.bfloat16))
        record("pointer_autotuned", lambda: scaled_gemm(a, w, s_a, s_w, torch.bfloat16), ref)
        best = [str(c) for key, c in getattr(plain_tuned, "cache", {}).items() if tuple(key[:3]) == (m, n, k)]
        rows[-1]["config"] = best[0] if best else ""
        for cfg in POINTER_CONFIGS:
            bm, bn, bk, g, nw, ns = cfg
            config = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=nw, num_stages=ns)
            record("pointer", lambda config=config: scaled_gemm(a, w, s_a, s_w, torch.bfloat16, config=config), ref,
                   config_name(cfg))
        for persistent, ws in ((False, False), (True, False), (False, True), (True, True)):
            for cfg in TMA_CONFIGS:
                bm, bn, bk, g, nw, ns = cfg
                a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
                w_desc = TensorDescriptor.from_tensor(w, [bn, bk])
                out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)

                def launch(a_desc=a_desc, w_desc=w_desc, out=out, bm=bm, bn=bn, bk=bk, g=g, nw=nw, ns=ns,
                           tiles=tiles, persistent=persistent, ws=ws):
                    if persistent:
                        tma_persistent_kernel[(min(sms, tiles),)](
                            a_desc, w_desc, out, s_a, s_w, m, n, k, out.stride(0), 1, BLOCK_M=bm, BLOCK_N=bn,
                            BLOCK_K=bk, GROUP_M=g, NUM_SMS=sms, WARP_SPECIALIZE=ws, num_warps=nw, num_stages=ns)
                    else:
                        tma_kernel[(tiles,)](a_desc, w_desc, out, s_a, s_w, m, n, k, out.stride(0), 1, BLOCK_M=bm,
                                             BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, WARP_SPECIALIZE=ws, num_warps=nw,
                                             num_stages=ns)
                    return out

                record(("tma_persistent" if persistent else "tma") + ("_ws" if ws else ""), launch, ref,
                       config_name(cfg))
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, git=git,
                  command=" ".join(["python", *sys.argv]), rep_ms=rep_ms, rows=rows)
    (out_dir / "int8_gemm_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    report(out_dir)


def report(out_dir: Path) -> None:
    result = json.loads((out_dir / "int8_gemm_sweep.json").read_text())
    rows = result["rows"]
    lines = [f"# INT8 GEMM variants on the GEMM shapes of one FLUX.1-dev call, {result['device']}", "",
             f"torch {result['torch']}, triton {result['triton']}, git {result['git']}. `triton.testing.do_bench` "
             f"median ({result['rep_ms']} ms of repeats), bf16 output, per-row x per-column scales; every INT8 "
             "candidate checked against the float reference first (max rel. error < 2e-2). Command: "
             f"`{result['command']}`", "",
             "## Per call (each shape weighted by how often one call runs it)", "",
             "| method | GEMM ms per call | x bf16 | x fp8 cuBLAS |", "|---|---|---|---|"]
    totals = {}
    for prefix in METHODS:
        best = best_per_shape([r for r in rows if r["method"] == prefix], prefix)
        totals[prefix] = per_call_ms({s: best[s]["ms"] if s in best else None for s in FLUX_SHAPES})
    for name, total in totals.items():
        label = name if name in ("bf16", "fp8_cublas", "pointer_autotuned") else f"{name}, best config per shape"
        ratio = (lambda base: f"{base / total:.3f}" if total and base else "-")
        lines.append(f"| {label} | {total:.2f} | {ratio(totals['bf16'])} | {ratio(totals['fp8_cublas'])} |"
                     if total else f"| {label} | missing | - | - |")
    lines += ["", "## Per shape: the fastest config of each INT8 variant", "",
              "| M x K x N | count | " + " | ".join(METHODS) + " |", "|---" * (2 + len(METHODS)) + "|"]
    for shape, count in FLUX_SHAPES.items():
        cells = []
        for prefix in METHODS:
            best = best_per_shape([r for r in rows if r["method"] == prefix], prefix).get(shape)
            cells.append(f"{best['ms']:.4f}" + (f" ({best['config'][:40]})" if best["config"] else "") if best else "-")
        lines.append(f"| {'x'.join(map(str, shape))} | {count} | " + " | ".join(cells) + " |")
    lines += ["", *result.get("notes", [])]
    errors = sorted({(r["method"], r.get("error", "")[:160]) for r in rows if r.get("error")})
    if errors:
        lines += ["", "Failures (method: first error):", ""] + [f"- {m}: `{e}`" for m, e in errors]
    (out_dir / "int8_gemm_sweep.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path)
    parser.add_argument("--git", default="unknown")
    parser.add_argument("--rep-ms", type=int, default=60)
    args = parser.parse_args()
    if args.report:
        report(args.report)
    elif args.out is None:
        parser.error("--out DIR (on a CUDA device) or --report DIR")
    elif not torch.cuda.is_available():
        sys.exit("int8_gemm_sweep.py needs a CUDA device")
    else:
        run(args.out, args.git, args.rep_ms)


if __name__ == "__main__":
    main()
