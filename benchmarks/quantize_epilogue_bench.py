"""What static FP8 activation quantization costs inside the kernel that produces the activation, at FLUX.1-dev's
shapes on the GPU: the compiled producer (GELU of the MLP input; LayerNorm + adaLN modulation feeding Q, K, V and the
MLP) writing bf16, as in the bf16 model, against the same producer writing e4m3 codes the way SegQuant's folded
layers quantize (``segquant_torchao.kernels.codes``), with the activation scale in four forms:

- ``divide (K,)``: ``x / d`` with a per-column divisor ``d`` (what a folded layer stored before: one value per column
  even where every column has the same scale);
- ``multiply (K,)``: ``x * (1 / d)``, the reciprocal stored;
- ``divide (1,)`` / ``multiply (1,)``: one scale for the whole input (a layer without input segments).

The norm producer also runs with one code tensor per consumer (Q, K, V and the MLP each quantize the same input
with their own, equal, scales: what inductor is given when each layer holds its own scale tensor) against one code
tensor shared by all. Each kernel is compiled with ``torch.compile`` and timed with ``triton.testing.do_bench``
(median); the ``GB/s`` column counts the bytes the kernel must read and write. Results: quantize_epilogue.{json,md}.

    python benchmarks/quantize_epilogue_bench.py --out DIR        # on the device (CUDA + triton)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from _common import figure, timing_bars
from _gpu_bench import gpu_bench_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENS, HIDDEN, MLP = 4608, 3072, 12288
CONSUMERS = 4  # to_q, to_k, to_v and proj_mlp of a FLUX single block read the same normed input


def scale_forms(k: int, device: str) -> dict[str, tuple[str, torch.Tensor]]:
    """The four forms of one activation scale (0.05) for an input of ``k`` columns."""
    d = torch.full((k,), 0.05, device=device)
    return {"divide (K,)": ("divide", d), "multiply (K,)": ("multiply", 1.0 / d),
            "divide (1,)": ("divide", d[:1].clone()), "multiply (1,)": ("multiply", 1.0 / d[:1])}


def quantize(x: torch.Tensor, how: str, s: torch.Tensor) -> torch.Tensor:
    from segquant_torchao.kernels import FP8_DTYPE

    v = x.float() / s if how == "divide" else x.float() * s
    return v.clamp(-448.0, 448.0).to(FP8_DTYPE)


def gelu_cases(device: str) -> dict:
    """The MLP's GELU writing bf16, or e4m3 codes in each scale form; (function, inputs, bytes moved)."""
    h = torch.randn(TOKENS, MLP, device=device, dtype=torch.bfloat16)
    gelu = torch.nn.functional.gelu
    cases = {"bf16 out": (lambda h: gelu(h, approximate="tanh"), (h,), h.numel() * 4)}
    for name, (how, s) in scale_forms(MLP, device).items():
        cases[f"fp8 out, {name}"] = (lambda h, s, how=how: quantize(gelu(h, approximate="tanh"), how, s), (h, s),
                                     h.numel() * 3)
    return cases


def norm_cases(device: str) -> dict:
    """LayerNorm + adaLN modulation writing bf16, or e4m3 codes: one per consumer or one shared."""
    x = torch.randn(TOKENS, HIDDEN, device=device, dtype=torch.bfloat16)
    shift, scale = (torch.randn(HIDDEN, device=device, dtype=torch.bfloat16) * 0.1 for _ in range(2))

    def normed(x, shift, scale):
        return torch.nn.functional.layer_norm(x, (HIDDEN,), eps=1e-6) * (1 + scale) + shift

    n = x.numel()
    cases = {"bf16 out": (normed, (x, shift, scale), n * 4)}
    for name, (how, s) in scale_forms(HIDDEN, device).items():
        per = [s.clone() for _ in range(CONSUMERS)]
        cases[f"fp8 out x{CONSUMERS} (one per consumer), {name}"] = (
            lambda x, shift, scale, *ss, how=how: [quantize(normed(x, shift, scale), how, t) for t in ss],
            (x, shift, scale, *per), n * (2 + CONSUMERS))
        cases[f"fp8 out x1 (shared), {name}"] = (
            lambda x, shift, scale, s, how=how: quantize(normed(x, shift, scale), how, s), (x, shift, scale, s), n * 3)
    return cases


def run(out: Path, rep_ms: int) -> dict:
    import triton
    import triton.testing

    rows = []
    for producer, cases in (("gelu (4608 x 12288)", gelu_cases("cuda")),
                            ("layernorm + modulation (4608 x 3072)", norm_cases("cuda"))):
        for name, (fn, inputs, moved) in cases.items():
            compiled = torch.compile(fn, dynamic=False)
            compiled(*inputs)
            ms = float(triton.testing.do_bench(lambda: compiled(*inputs), warmup=25, rep=rep_ms,
                                               return_mode="median"))
            rows.append(dict(producer=producer, case=name, ms=round(ms, 4), gb_per_s=round(moved / ms / 1e6, 0)))
            print(json.dumps(rows[-1]), flush=True)
            torch._dynamo.reset()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  command=" ".join(["python", *sys.argv]), rows=rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantize_epilogue.json").write_text(json.dumps(result, indent=1) + "\n")
    write_report(result, out)
    return result


def write_report(result: dict, out: Path) -> None:
    """quantize_epilogue.md from a result (``run``'s, or a stored quantize_epilogue.json: ``--report``)."""
    lines = [f"# Static FP8 quantization fused into its producer, {result['device']}", "",
             f"torch {result['torch']}, triton {result['triton']}; `triton.testing.do_bench` median. Command: "
             f"`{result['command']}`", "", "| producer | output | ms | GB/s moved |", "|---|---|---|---|"]
    lines += [f"| {r['producer']} | {r['case']} | {r['ms']} | {r['gb_per_s']:.0f} |" for r in result["rows"]]
    lines += [""] + result.get("notes", [])
    lines += ["", "![ms per kernel](quantize_epilogue.png)"]
    (out / "quantize_epilogue.md").write_text("\n".join(lines).rstrip("\n") + "\n")
    producers = list(dict.fromkeys(r["producer"] for r in result["rows"]))
    with figure(out / "quantize_epilogue.png", len(producers), 1, figsize=(8, 2.2 + 0.9 * len(result["rows"]) / 2),
                squeeze=False) as (_, axes):
        for ax, producer in zip(axes[:, 0], producers):
            rows = [r for r in result["rows"] if r["producer"] == producer]
            timing_bars(ax, [r["case"] for r in rows], [r["ms"] for r in rows], "bf16 out",
                        f"{producer}, {result['device']}", labelsize=7)


def main() -> None:
    gpu_bench_main(__doc__, "quantize_epilogue_bench.py", 200, run, write_report)


if __name__ == "__main__":
    main()
