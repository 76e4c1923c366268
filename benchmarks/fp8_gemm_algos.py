"""Is cuBLASLt's default FP8 kernel the fastest one for FLUX.1-dev's GEMMs? Per GEMM shape of one call:

- ``torch rowwise``: ``torch._scaled_mm`` as SegQuant's layers call it (``(M, 1)`` row scales, per-column weight
  scales, bias in the epilogue, bf16 out, fast accumulation): the kernel cuBLASLt's heuristic picks first;
- ``torch tensorwise``: the same with one scale per operand;
- ``torch rowwise, again``: the first, timed again after all the others (the run's drift, i.e. its noise);
- ``torch rowwise, workspace W``: the first in a child process whose cuBLAS and cuBLASLt workspaces are ``W``
  (``CUBLAS_WORKSPACE_CONFIG``, ``CUBLASLT_WORKSPACE_SIZE``; torch caps the second at the first), since a larger
  workspace admits more kernels;
- ``inductor max-autotune``: ``torch.compile(mode="max-autotune-no-cudagraphs")`` of the rowwise call, which also
  tries inductor's Triton templates for scaled GEMMs;
- ``cuBLASLt first`` / ``cuBLASLt best``: every algorithm cuBLASLt's heuristic offers (up to ``--limit``), through
  nvmath-python's ``Matmul`` (one scale per operand, no bias), each timed: the heuristic's first and the fastest,
  with the fastest one's tile, stages, cluster and split-K.

Every candidate's output is compared with a float reference first. Times are ``triton.testing.do_bench`` medians;
the per-call total weights each shape by how often one call runs it (``int8_gemm_sweep.FLUX_SHAPES``).

    python benchmarks/fp8_gemm_algos.py --out DIR          # on the device (CUDA; nvmath-python for the last rows)
    python benchmarks/fp8_gemm_algos.py --report DIR/fp8_gemm_algos.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_bench import gpu_bench_main  # noqa: E402
from int8_gemm_sweep import FLUX_SHAPES  # noqa: E402

TOL = 2e-2


def operands(m: int, k: int, n: int, device: str = "cuda") -> dict:
    """fp8 codes of a random activation and weight, their scales, a bias and the float reference output."""
    g = torch.Generator(device=device).manual_seed(m * 7 + k * 3 + n)
    x = torch.randn(m, k, generator=g, device=device)
    w = torch.randn(n, k, generator=g, device=device) * 0.05
    sa = (x.abs().amax() / 448.0).reshape(1)
    sw = w.abs().amax(1) / 448.0
    a8 = (x / sa).clamp(-448, 448).to(torch.float8_e4m3fn)
    w8 = (w / sw[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    bias = torch.randn(n, generator=g, device=device).to(torch.bfloat16)
    ref = (a8.float() * sa) @ (w8.float() * sw[:, None]).t() + bias.float()
    return dict(a8=a8, w8=w8, sa=sa, sw=sw, bias=bias, ref=ref)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max())


def torch_calls(o: dict) -> dict:
    """The torch candidates of one shape: name -> (callable, its reference)."""
    m, n = o["a8"].shape[0], o["w8"].shape[0]
    sa_rows = o["sa"].expand(m, 1).contiguous()
    sw_row = o["sw"].reshape(1, n).contiguous()
    wt = o["w8"].t()

    def rowwise(a8, wt, sa_rows, sw_row, bias):
        return torch._scaled_mm(a8, wt, scale_a=sa_rows, scale_b=sw_row, bias=bias, out_dtype=torch.bfloat16,
                                use_fast_accum=True)

    # tensorwise: the weight's scale is its largest row scale (the codes are the rowwise ones, so only the timing
    # is compared; its reference is computed with the scalar)
    s_max = o["sw"].max().reshape(())
    ref_t = (o["a8"].float() * o["sa"]) @ (o["w8"].float() * s_max).t() + o["bias"].float()
    args = (o["a8"], wt, sa_rows, sw_row, o["bias"])
    return {
        "torch rowwise": (lambda: rowwise(*args), o["ref"]),
        "torch tensorwise": (lambda: torch._scaled_mm(o["a8"], wt, scale_a=o["sa"].reshape(()), scale_b=s_max,
                                                      bias=o["bias"], out_dtype=torch.bfloat16,
                                                      use_fast_accum=True), ref_t),
        "inductor max-autotune": (lambda f=torch.compile(rowwise, mode="max-autotune-no-cudagraphs", dynamic=False):
                                  f(*args), o["ref"]),
    }


def cublaslt_algos(o: dict, limit: int, bench) -> list[dict]:
    """Every algorithm cuBLASLt's heuristic offers for ``a8 @ w8.T`` with one scale per operand, timed."""
    import nvmath
    from nvmath.linalg.advanced import Matmul

    s_max = o["sw"].max().reshape(1)
    ref = (o["a8"].float() * o["sa"]) @ (o["w8"].float() * s_max).t()
    mm = Matmul(o["a8"], o["w8"].t(), quantization_scales={"a": o["sa"], "b": s_max},
                options={"result_type": nvmath.CudaDataType.CUDA_R_16BF, "fast_accumulation": True})
    algorithms = mm.plan(preferences={"limit": limit})
    rows = []
    for i, alg in enumerate(algorithms):
        try:
            y = mm.execute(algorithm=alg)
            err = rel_error(y, ref)
            ms = bench(lambda alg=alg: mm.execute(algorithm=alg)) if err < TOL else None
            rows.append(dict(rank=i, ms=ms, err=err, tile=str(alg.tile), stages=str(alg.stages),
                             cluster=str(alg.cluster_shape), split_k=int(alg.split_k)))
        except Exception as e:  # noqa: BLE001 - an algorithm that fails is recorded, the others still run
            rows.append(dict(rank=i, ms=None, error=f"{type(e).__name__}: {e}"[:300]))
    mm.free()
    return rows


def run(out: Path, rep_ms: int, limit: int = 16, workspace_kib: int = 262144, child: bool = False,
        inductor_shapes: int = 1) -> dict:
    import triton
    import triton.testing

    def bench(fn) -> float:
        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))

    rows = []
    # the shapes holding most of a call's GEMM work first
    order = sorted(FLUX_SHAPES.items(), key=lambda kv: -kv[1] * kv[0][0] * kv[0][1] * kv[0][2])
    for i, ((m, k, n), count) in enumerate(order):
        o = operands(m, k, n)
        calls = torch_calls(o)
        if i >= inductor_shapes:  # its autotuning compiles ~100 Triton candidates: about 2 minutes a shape
            calls.pop("inductor max-autotune")
        if child:
            calls = {"torch rowwise, workspace": calls["torch rowwise"]}
        for method, (fn, ref) in calls.items():
            try:
                err = rel_error(fn(), ref)
                ms = bench(fn) if err < TOL else None
                rows.append(dict(shape=[m, k, n], count=count, method=method, ms=ms, err=err))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(shape=[m, k, n], count=count, method=method, ms=None,
                                 error=f"{type(e).__name__}: {e}"[:300]))
            print(json.dumps(rows[-1]), flush=True)
        if child:
            continue
        try:
            algos = cublaslt_algos(o, limit, bench)
        except Exception as e:  # noqa: BLE001 - nvmath missing or failing: the torch rows stand
            traceback.print_exc()
            algos = []
            rows.append(dict(shape=[m, k, n], count=count, method="cuBLASLt first", ms=None,
                             error=f"{type(e).__name__}: {e}"[:300]))
        timed = [a for a in algos if a.get("ms") is not None]
        if timed:
            first = next((a for a in algos if a["rank"] == 0 and a.get("ms") is not None), None)
            best = min(timed, key=lambda a: a["ms"])
            if first:
                rows.append(dict(shape=[m, k, n], count=count, method="cuBLASLt first", ms=first["ms"],
                                 err=first["err"], algo=first))
            rows.append(dict(shape=[m, k, n], count=count, method="cuBLASLt best", ms=best["ms"], err=best["err"],
                             algo=best, algorithms=len(algos)))
            print(json.dumps(rows[-1]), flush=True)
        torch._dynamo.reset()
        dump(out, rows, child)  # after every shape: a run cut short keeps what it measured
    if not child:  # the first method again, after every other: how much the same kernel's time drifts in one run
        for (m, k, n), count in order:
            o = operands(m, k, n)
            fn, _ = torch_calls(o)["torch rowwise"]
            rows.append(dict(shape=[m, k, n], count=count, method="torch rowwise, again", ms=bench(fn), err=0.0))
        dump(out, rows, child)
    if not child and workspace_kib:
        # torch caps cuBLASLt's workspace at cuBLAS's (unified workspace): both are raised
        env = dict(os.environ, CUBLASLT_WORKSPACE_SIZE=str(workspace_kib),
                   CUBLAS_WORKSPACE_CONFIG=f":{workspace_kib}:2")
        cmd = [sys.executable, __file__, "--out", str(out / "workspace"), "--rep-ms", str(rep_ms), "--child",
               "--inductor-shapes", "0"]
        subprocess.run(cmd, env=env, check=False)
        path = out / "workspace" / "fp8_gemm_algos.json"
        if path.exists():
            for r in json.loads(path.read_text())["rows"]:
                r["method"] = f"torch rowwise, workspace {workspace_kib // 1024} MiB"
                rows.append(r)
    return dump(out, rows, child)


def dump(out: Path, rows: list[dict], child: bool) -> dict:
    """Write fp8_gemm_algos.json (and, unless ``child``, the report) for the rows so far."""
    import triton

    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  command=" ".join(["python", *sys.argv]), git=os.environ.get("GIT_SHA", "unknown"),
                  cublaslt_workspace_kib=os.environ.get("CUBLASLT_WORKSPACE_SIZE", "default"), rows=rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_gemm_algos.json").write_text(json.dumps(result, indent=1) + "\n")
    if not child:
        write_report(result, out)
    return result


def per_call(rows: list[dict], base: str = "torch rowwise") -> dict[str, dict]:
    """Per method: ``ms``, the sum over FLUX_SHAPES of count x ms (None unless every shape has a time); and over the
    shapes the method and ``base`` both timed, ``ratio`` (base's time / the method's) and ``share`` (those shapes'
    part of base's per-call time)."""
    def times(method: str) -> dict[tuple, float]:
        return {tuple(r["shape"]): r["ms"] for r in rows if r["method"] == method and r.get("ms") is not None}

    ref = times(base)
    ref_total = sum(c * ref[s] for s, c in FLUX_SHAPES.items() if s in ref)
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        t = times(method)
        common = [s for s in FLUX_SHAPES if s in t and s in ref]
        mine = sum(FLUX_SHAPES[s] * t[s] for s in common)
        theirs = sum(FLUX_SHAPES[s] * ref[s] for s in common)
        out[method] = dict(ms=sum(c * t[s] for s, c in FLUX_SHAPES.items()) if len(t) == len(FLUX_SHAPES) else None,
                           ratio=theirs / mine if mine else None,
                           share=theirs / ref_total if ref_total else None)
    return out


def failure(row: dict) -> str:
    """Why a row has no time: its error, or its output's error against the reference past ``TOL``."""
    if "error" in row:
        return row["error"]
    return f"error {row['err']:.3g} > {TOL}" if row.get("err") is not None else "no time"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_report(result: dict, out: Path) -> None:
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    totals = per_call(rows)
    lines = [f"# FP8 GEMM kernels on one FLUX.1-dev call's shapes, {result['device']}", "",
             f"torch {result['torch']}, triton {result['triton']}, git {result['git']}; `triton.testing.do_bench` "
             f"median. Command: `{result['command']}`", "", "## Per call (each shape times how often a call runs it)",
             "", "`x torch rowwise` compares the two on the shapes both timed; `share` is those shapes' part of torch "
             "rowwise's GEMM time per call.", "",
             "| method | GEMM ms per call | x torch rowwise | share |", "|---|---|---|---|"]
    for mth in methods:
        t = totals[mth]
        lines.append(f"| {mth} | {fmt(t['ms'], '.2f')} | {fmt(t['ratio'], '.3f')} | {fmt(t['share'], '.0%')} |")
    lines += ["", "## Per shape (ms; the fastest cuBLASLt algorithm's tile / stages / cluster / split-K)", "",
              "| M x K x N | count | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for (m, k, n), count in FLUX_SHAPES.items():
        cells = []
        for mth in methods:
            r = next((r for r in rows if r["method"] == mth and tuple(r["shape"]) == (m, k, n)), None)
            if r is None or r.get("ms") is None:
                cells.append("-" if r is None else f"failed: {failure(r)[:60]}")
            elif mth == "cuBLASLt best":
                a = r["algo"]
                cells.append(f"{r['ms']:.4f} (#{a['rank']} of {r['algorithms']}: {a['tile']} {a['stages']} "
                             f"{a['cluster']} splitK {a['split_k']})")
            else:
                cells.append(f"{r['ms']:.4f}")
        lines.append(f"| {m}x{k}x{n} | {count} | " + " | ".join(cells) + " |")
    lines += [""] + result.get("notes", [])
    (out / "fp8_gemm_algos.md").write_text("\n".join(lines).rstrip("\n") + "\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=16, help="how many algorithms to ask cuBLASLt's heuristic for")
    p.add_argument("--workspace-kib", type=int, default=262144,
                   help="CUBLASLT_WORKSPACE_SIZE of the child run (0: no child run)")
    p.add_argument("--inductor-shapes", type=int, default=1,
                   help="how many of the largest shapes get the inductor max-autotune row (about 2 min each)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def main() -> None:
    gpu_bench_main(__doc__, "fp8_gemm_algos.py", 100, run, write_report, add_arguments)


if __name__ == "__main__":
    main()
