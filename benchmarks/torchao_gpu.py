"""segquant_torchao on the GPU: numerics against segquant.numerics with the real kernels, and GEMM
timings per layer kind on FLUX.1-dev shapes (M = 4608 tokens = 1024x1024 image + 512 text tokens).

Every variant is compiled (torch.compile(fullgraph=True), default inductor settings, torchao's ``set_inductor_config``
off so that all rows compile alike) and timed under ``torch.inference_mode`` in the same process, next
to bf16 and torchao's own fp8 per-row / int8 dynamic configs.

    python benchmarks/torchao_gpu.py --out DIR            # on the device (needs CUDA + torchao)
    python benchmarks/torchao_gpu.py --report DIR         # here: DIR/torchao_gpu.jsonl -> .md + .png
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import append_jsonl, figure, parser, read_jsonl
from torch import nn

# name, K, N, M, in_segments, dual_segments, out_segments, input kind
LAYERS = [
    ("qkv", 3072, 9216, 4608, [3072], [], [9216], "normal"),
    ("ff_up", 3072, 12288, 4608, [3072], [], [12288], "normal"),
    ("ff_down", 12288, 3072, 4608, [12288], [0], [3072], "gelu"),
    ("proj_out", 15360, 3072, 4608, [3072, 12288], [1], [3072], "attn|gelu"),
    ("adaLN", 3072, 18432, 1, [3072], [0], [3072] * 6, "silu"),
]
ROUNDS = 5
KIND = {"qkv": "plain", "ff_up": "plain", "ff_down": "dual-scaled", "proj_out": "input-segmented + dual-scaled",
        "adaLN": "dual-scaled, output-segmented, M=1"}


def make_input(kind: str, m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda")

    if kind == "normal":
        x = randn(m, k)
    elif kind == "gelu":
        x = torch.nn.functional.gelu(randn(m, k) * 2, approximate="tanh")
    elif kind == "silu":
        x = torch.nn.functional.silu(randn(m, k) * 2)
    else:
        x = torch.cat([randn(m, 3072) * 3, torch.nn.functional.gelu(randn(m, k - 3072) * 2, approximate="tanh")], -1)
    return x.to(torch.bfloat16)


def time_ms(fn, x, repeats: int = 15, calls: int = 20, warmup: int = 5) -> float:
    """Median over ``repeats`` of the mean time of ``calls`` back-to-back calls (CUDA events), so that
    kernel-launch gaps of one call do not count as GPU time."""
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def weight_bytes(module: nn.Module) -> int:
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        total += t.numel() * t.element_size() if not hasattr(t, "qdata") else t.qdata.numel()
    return total


def variants(layer, x):
    """(method, backend, make_module, reference QuantSpec or None, stats or None) per variant."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Int8DynamicActivationInt8WeightConfig, PerRow, quantize_)

    from segquant.numerics import QuantSpec, activation_stats
    from segquant_torchao import SegLinearConfig, SegQuantOptions

    name, k, n, m, in_segs, dual, out_segs, _ = layer
    stats = activation_stats(x.float(), in_segs)
    amax = dict(amax=stats.amax.tolist(), pos_amax=stats.pos_amax.tolist(), neg_amax=stats.neg_amax.tolist())

    def seg(precision, activation, plain=False, realisation="folded"):
        def make(base):
            options = SegQuantOptions(precision=precision, activation=activation, realisation=realisation)
            cfg = SegLinearConfig(name=name, in_features=k, out_features=n,
                                  in_segments=[k] if plain else in_segs, out_segments=[n] if plain else out_segs,
                                  dual_scale_segments=[] if plain else dual, options=options,
                                  **(amax if activation == "static" and not plain else
                                     {key: [max(v)] for key, v in amax.items()} if activation == "static" else {}))
            quantize_(base, cfg)
            return base
        return make

    def ao(config):
        def make(base):
            quantize_(base, config)
            return base
        return make

    plain_stats = activation_stats(x.float(), [k])
    out = [
        ("bf16", "torch", lambda base: base, None, None),
        ("fp8_rowwise_dynamic", "torchao", ao(Float8DynamicActivationFloat8WeightConfig(
            granularity=PerRow(), set_inductor_config=False)), None, None),
        ("int8_dynamic", "torchao", ao(Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)), None, None),
    ]
    for precision in ("fp8", "int8"):
        dyn = QuantSpec(weight_format=precision, weight_granularity="per_channel", act_format=precision,
                        act_granularity="per_token")
        static = QuantSpec(weight_format=precision, weight_granularity="per_channel", act_format=precision,
                           realisation="folded")
        plain_layer = len(in_segs) == 1 and not dual and out_segs == [n]
        out += [
            # a plain dynamic layer is torchao's own tensor (segquant_torchao.plain): no SegQuant reference
            (f"segquant_{precision}_dynamic_plain", "torchao", seg(precision, "dynamic", plain=True), None, None),
            (f"segquant_{precision}_dynamic", "torchao" if plain_layer else "segquant", seg(precision, "dynamic"),
             None if plain_layer else dyn, None),
            (f"segquant_{precision}_static_plain", "segquant", seg(precision, "static", plain=True), static, plain_stats),
            (f"segquant_{precision}_static", "segquant", seg(precision, "static"), static, stats),
        ]
        if len(in_segs) > 1:
            split = QuantSpec(weight_format=precision, weight_granularity="per_channel", act_format=precision,
                              realisation="split_k")
            out.append((f"segquant_{precision}_static_split_k", "segquant",
                        seg(precision, "static", realisation="split_k"), split, stats))
    return out


def run(out_dir: Path, git: str) -> None:
    from segquant import LinearPlan
    from segquant.numerics import reference_linear, sqnr_db

    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "torchao_gpu.jsonl"
    # every row of a layer stays compiled at once: one code object (Linear.forward) with many modules
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    device = torch.cuda.get_device_name()
    meta = dict(device=device, torch=torch.__version__, git=git, compiled=True)
    try:
        import torchao
        meta["torchao"] = torchao.__version__
    except ImportError:
        meta["torchao"] = None
    gen = torch.Generator(device="cuda").manual_seed(0)
    with results.open("w") as fh, torch.inference_mode():
        for layer in LAYERS:
            name, k, n, m, in_segs, dual, out_segs, kind = layer
            x = make_input(kind, m, k, gen)
            base = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
            nn.init.normal_(base.weight, std=k ** -0.5)
            exact = torch.nn.functional.linear(x.float(), base.weight.float(), base.bias.float())
            built = []
            for method, backend, make, spec, stats in variants(layer, x):
                record = dict(bench="gemm", layer=name, kind=KIND[name], M=m, K=k, N=n, method=method,
                              backend=backend, **meta)
                try:
                    module = make(copy.deepcopy(base))
                    start = time.perf_counter()
                    compiled = torch.compile(module, fullgraph=True)
                    y = compiled(x)
                    torch.cuda.synchronize()
                    record["compile_s"] = round(time.perf_counter() - start, 2)
                    record["weight_mb"] = round(weight_bytes(module) / 2 ** 20, 2)
                    record["sqnr_vs_fp32_db"] = round(sqnr_db(exact, y.float()), 2)
                    if spec is not None:
                        plain = method.endswith("_plain")
                        plan = LinearPlan(k, n, in_segments=[k] if plain else in_segs,
                                          out_segments=[n] if plain else out_segs,
                                          dual_scale=bool(dual) and not plain,
                                          dual_scale_segments=[] if plain else dual, name=name)
                        ref = reference_linear(x.float(), base.weight.float(), base.bias.float(), plan, spec, stats)
                        err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
                        record["max_err_vs_reference"] = err
                        record["reference_ok"] = err < 2e-2  # bf16 output rounding is ~4e-3 of the max
                    built.append((record, compiled))
                except Exception as e:  # noqa: BLE001 - a failing variant is recorded, not hidden
                    record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    built.append((record, None))
            # time all variants of this layer round-robin, so that clock drift hits every row alike
            rounds = {id(rec): [] for rec, _ in built}
            for _ in range(ROUNDS):
                for record, compiled in built:
                    if compiled is not None:
                        rounds[id(record)].append(time_ms(compiled, x))
            baseline_ms = statistics.median(rounds[id(built[0][0])])
            for record, compiled in built:
                if compiled is not None:
                    times = rounds[id(record)]
                    record.update(ms_median=statistics.median(times), ms_min=min(times), ms_max=max(times),
                                  baseline_ms=baseline_ms,
                                  speedup_vs_bf16=round(baseline_ms / statistics.median(times), 3))
                append_jsonl(fh, record)
            del built
            torch._dynamo.reset()


def report(out_dir: Path, command: str) -> None:
    rows = read_jsonl(out_dir / "torchao_gpu.jsonl")
    meta = rows[0]
    lines = [f"# segquant_torchao GEMM timings on {meta['device']}",
             "",
             f"torch {meta['torch']}, torchao {meta.get('torchao')}, git {meta['git']}, torch.compile(fullgraph=True), "
             "inference_mode; "
             "per-call time: mean of 20 back-to-back calls (CUDA events), median over 15 repeats, timed in 5 "
             "round-robin rounds over all rows of a layer; `ms` = median of the rounds, `range` = min-max of the "
             "rounds (run-to-run spread). "
             "`_plain` rows run the same SegQuant code with a one-segment plan (no SegLinear, no DualScale), "
             "so the difference to the row below is what the plan's segments and DualScale cost. "
             "`max err vs reference` = max |out - segquant.numerics| / max |reference|; ok below 2e-2 "
             "(bf16 output rounding). SQNR is against the unquantized fp32 product on the same input.",
             f"Command: `{command}`",
             "",
             "| layer (kind) | M x K x N | method | ms | range | x bf16 | weight MB | SQNR dB vs fp32 | max err vs reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layer']} | {r['M']}x{r['K']}x{r['N']} | {r['method']} | error: {r['error'][:80]} ||||||")
            continue
        err = f"{r['max_err_vs_reference']:.1e} ({'ok' if r['reference_ok'] else 'FAIL'})" \
            if "max_err_vs_reference" in r else "-"
        lines.append(f"| {r['layer']} ({r['kind']}) | {r['M']}x{r['K']}x{r['N']} | {r['method']} | "
                     f"{r['ms_median']:.3f} | {r['ms_min']:.3f}-{r['ms_max']:.3f} | {r['speedup_vs_bf16']:.2f} | "
                     f"{r['weight_mb']} | "
                     f"{r['sqnr_vs_fp32_db']} | {err} |")
    (out_dir / "torchao_gpu.md").write_text("\n".join(lines) + "\n")
    plot(rows, out_dir / "torchao_gpu.png")


def plot(rows: list[dict], path: Path) -> None:
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    with figure(path, 1, len(layers), figsize=(4 * len(layers), 4.5), squeeze=False) as (fig, axes):
        for ax, layer in zip(axes[0], layers):
            sub = {r["method"]: r for r in rows if r["layer"] == layer and "error" not in r}
            vals = [sub[mth]["speedup_vs_bf16"] if mth in sub else 0 for mth in methods]
            colors = ["grey" if m == "bf16" else "tab:blue" if m.startswith(("fp8", "int8")) else "tab:orange"
                      for m in methods]
            ax.barh(range(len(methods)), vals, color=colors)
            ax.axvline(1.0, color="black", lw=0.8)
            ax.set_yticks(range(len(methods)), methods if ax is axes[0][0] else [], fontsize=7)
            ax.set_title(f"{layer}\n{KIND[layer]}", fontsize=8)
            ax.set_xlabel("speed-up vs bf16 (higher is faster)", fontsize=7)
        fig.suptitle(f"GEMM speed-up vs bf16, {rows[0]['device']}, torch {rows[0]['torch']} "
                     "(grey bf16, blue torchao, orange SegQuant)", fontsize=9)


def main(argv=None) -> None:
    p = parser(__doc__, out=False)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="run on the GPU and write torchao_gpu.jsonl here")
    group.add_argument("--report", type=Path, help="turn DIR/torchao_gpu.jsonl into .md and .png")
    p.add_argument("--git", default=os.environ.get("GIT_SHA", "unknown"))
    p.add_argument("--command", default="python benchmarks/torchao_gpu.py --out $OUT")
    args = p.parse_args(argv)
    if args.report:
        return report(args.report, args.command)
    if not torch.cuda.is_available():
        sys.exit("torchao_gpu.py --out needs a CUDA device")
    run(args.out, args.git)


if __name__ == "__main__":
    main()
