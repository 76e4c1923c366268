"""End-to-end speed of one FLUX.1-dev-size denoiser call at 1024x1024 (4096 image + 512 text tokens, batch 1):
a FluxTransformer2DModel of the full FLUX.1-dev config with random bf16 weights, every variant under
``torch.compile`` and ``torch.inference_mode``, ONE VARIANT PER PROCESS (a driver launches them with a
timeout each and appends one JSON line per variant to DIR/speed.jsonl as soon as it has it).

Variants: bf16; torchao fp8 per-row dynamic; torchao int8 dynamic; SegQuant fp8/int8 static/dynamic (segments +
DualScale; fused Triton DualScale GEMM, Triton int8 GEMM, cuBLAS fp8), SegQuant fp8 cost-aware (``segquant.cost``
at ``--threshold``). A SegQuant name takes ``_nodual`` (the plan without DualScale) and/or ``_naive`` (torch's
GEMMs, DualScale with M doubled), e.g. ``segquant_fp8_static_nodual``; a static one also ``_shift`` (the activation
shift instead of DualScale on the same inputs: ``plan.with_shift("per_tensor", keep_dual_scale=False)``; one plain
GEMM per layer, its twin without the shift is ``_nodual``). ``segquant_{fp8,int8}_static_plain`` (no segments, no
DualScale: the real kernels of ModelOpt's presets, which deploy through TensorRT) and ``..._plain_asshipped`` (also
every *proj_out* in bf16, as those presets ship). The variants of one run share one plan (cached in DIR)
and are grouped by run in the report.
Layers that run with M = batch (adaLN modulation, time/guidance embedders) stay bf16 in every quantized
variant (``--quantize-small`` quantizes them too; ``--quantize-adaln`` the adaLN modulations only, as SegQuant's
recipes do, the embedders staying bf16 as the recipes keep them): they are memory-bound and torchao int8 rejects M = 1.

    python benchmarks/speed.py --out DIR --blocks 1 --quick        # iterate: 1 double + 2 single blocks
    python benchmarks/speed.py --out DIR --variants bf16,torchao_fp8_rowwise --timeout 280
    python benchmarks/speed.py --report DIR                         # DIR/speed.jsonl -> speed.md + speed.png
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from _common import flux_call_inputs

ROOT = Path(__file__).resolve().parents[1]

BASE_VARIANTS = ("bf16", "torchao_fp8_rowwise", "torchao_int8_dynamic", "segquant_fp8_static", "segquant_fp8_dynamic",
                 "segquant_int8_static", "segquant_int8_dynamic", "segquant_fp8_costaware")
# SegQuant variants take "_nodual" (plan without DualScale) and/or "_naive" (torch GEMMs, M-doubled DualScale);
# static ones "_shift" (the activation shift instead of DualScale; its no-shift twin is "_nodual")
VARIANTS = BASE_VARIANTS + tuple(
    f"{base}{suffix}" for base in BASE_VARIANTS if base.startswith("segquant")
    for suffix in (("_naive",) if base.endswith("costaware") else ("_nodual", "_naive", "_nodual_naive")
                   + (("_shift", "_shift_naive") if base.endswith("_static") else ())))
SHIFT = "per_tensor"  # the "_shift" variants' shift (SPEC section 3: one centre per input segment)
# "_plain" (static per-tensor activations, no segments, no DualScale): the real kernels of what ModelOpt's INT8/FP8
# presets compute (they deploy through TensorRT, not timed here); "_plain_asshipped" also keeps every *proj_out*
# in bf16, as those presets do ("*proj_out.*" disabled). benchmarks/quality_speed.py times the presets as these.
VARIANTS += tuple(f"segquant_{p}_static_plain{s}" for p in ("fp8", "int8") for s in ("", "_asshipped"))
# any variant + "_fusedqkv": diffusers' fuse_qkv_projections before quantizing (``--fuse-qkv``: every variant of the run)
FUSED = "_fusedqkv"
VARIANTS += tuple(f"{v}{FUSED}" for v in VARIANTS)
# any variant + "_fp8attn": attention through FlashAttention-3's e4m3 kernel (segquant_torchao.fa3_attention;
# needs flash_attn_3 installed or --fa3-library: benchmarks/fa3_build.py builds it)
FP8_ATTENTION = "_fp8attn"
VARIANTS += tuple(f"{v}{FP8_ATTENTION}" for v in VARIANTS)
AS_SHIPPED_SKIP = ["*proj_out"]
UNFUSED_QKV = ["*attn.to_q", "*attn.to_k", "*attn.to_v", "*attn.add_q_proj", "*attn.add_k_proj", "*attn.add_v_proj"]
ADALN = ["*norm1.linear", "*norm1_context.linear", "*.norm.linear", "norm_out.linear"]  # the recipes quantize these
SMALL_M = ADALN + ["time_text_embed.*"]
IMAGE_TOKENS, TEXT_TOKENS = 4096, 512
REPORT_TOP = 8  # kernels per variant in speed.md's top lists (the records keep --profile-top of them)
DEVICE = "cuda"  # the CPU smoke test (--cpu-smoke) swaps in "cpu" and a tiny config


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build_model(blocks: int | None, config: Path = ROOT / "segquant/configs/flux.1-dev.json"):
    """FLUX.1-dev-size transformer, random weights made on the GPU (std 0.02, biases 0, norm weights 1)."""
    from diffusers import FluxTransformer2DModel

    cfg = json.loads(config.read_text())
    cfg.pop("_class_name", None)
    if blocks is not None:
        cfg.update(num_layers=blocks, num_single_layers=2 * blocks)
    with torch.device("meta"):
        meta = FluxTransformer2DModel(**cfg)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg).to(torch.bfloat16)
    model = model.to_empty(device=DEVICE).eval()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name and p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=DEVICE) * 0.02)
    return model, meta


def make_inputs(model) -> dict:
    return flux_call_inputs(model, torch.Generator(device=DEVICE).manual_seed(1), torch.bfloat16, IMAGE_TOKENS,
                            TEXT_TOKENS, timestep=0.5)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor, tensor subclasses (torchao) counted by their inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(model) -> int:
    return sum(tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers()))


def small_patterns(args) -> list[str]:
    """The M = batch layers this run keeps in bf16: all (default), the embedders (``--quantize-adaln``) or none
    (``--quantize-small``)."""
    if args.quantize_small:
        return []
    return [g for g in SMALL_M if g not in ADALN] if args.quantize_adaln else SMALL_M


def small_layer(fqn: str, args) -> bool:
    return any(fnmatch.fnmatchcase(fqn, g) for g in small_patterns(args))


def split_attention(variant: str) -> tuple[str, bool]:
    """``segquant_fp8_static_fp8attn`` -> ``("segquant_fp8_static", True)``: the linears' variant, and whether the
    attention runs FlashAttention-3's e4m3 kernel."""
    return variant.removesuffix(FP8_ATTENTION), variant.endswith(FP8_ATTENTION)


def linear_variant(variant: str) -> str:
    """``variant`` without the suffixes that leave the Linear layers' quantization alone (``_fusedqkv``,
    ``_fp8attn``)."""
    return split_attention(variant)[0].removesuffix(FUSED)


def fused_qkv(variant: str, args) -> bool:
    """Whether ``variant`` runs diffusers' fused Q/K/V projections (its ``_fusedqkv`` suffix, or ``--fuse-qkv``)."""
    return args.fuse_qkv or split_attention(variant)[0].endswith(FUSED)


def parse_variant(variant: str) -> tuple[str, bool, str, bool]:
    """``segquant_fp8_static_nodual_naive`` -> ``("segquant_fp8_static", False, "naive", False)``;
    ``segquant_int8_static_shift`` -> ``("segquant_int8_static", False, "fused", True)`` (the shift replaces
    DualScale). A ``_fusedqkv`` suffix (``fused_qkv``) takes no part."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    variant = linear_variant(variant)
    kernel = "naive" if variant.endswith("_naive") else "fused"
    base = variant.removesuffix("_naive")
    if "_plain" in base:  # no segments, no DualScale, no shift
        return base[:base.index("_plain")], False, kernel, False
    shift = base.endswith("_shift")
    base = base.removesuffix("_shift")
    dual = not base.endswith("_nodual") and not shift
    return base.removesuffix("_nodual"), dual, kernel, shift


def variant_plan(plan, variant: str):
    """The analysed plan as ``variant`` quantizes it: without DualScale (``_nodual``), or with the activation
    shift in its place on the same inputs (``_shift``)."""
    _, dual, _, shift = parse_variant(variant)
    variant = linear_variant(variant)
    if "_plain" in variant:
        return plan.ablate(seg_linear=False, dual_scale=False)
    if shift:
        return plan.with_shift(SHIFT, keep_dual_scale=False)
    return plan if dual else plan.ablate(dual_scale=False)


def quantize(model, meta, variant: str, inputs: dict, args) -> dict:
    """Quantize ``model`` in place for ``variant``; returns notes for the record."""
    notes: dict = {}
    fuse = fused_qkv(variant, args)
    if linear_variant(variant) == "bf16":
        return notes
    if variant.startswith("torchao"):
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                          Int8DynamicActivationInt8WeightConfig, PerRow, quantize_)

        cfg = (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
               if "fp8" in variant else Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
        quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and
                  not small_layer(fqn, args))
        return notes
    import segquant
    from segquant_torchao import SegQuantConfig, calibration_from
    from segquant_torchao import quantize as sq_quantize

    config = args.config.stem if args.config else "flux.1-dev"
    fused = FUSED if fuse else ""
    cache = args.out / f"plan_{config}_{args.blocks or 'full'}{fused}.json"  # the variants of one run share it
    if cache.exists():
        plan = segquant.SegQuantPlan.load(cache)
    else:
        start = time.perf_counter()
        plan = segquant.analyze(meta, **segquant.example_inputs(meta))
        notes["analyze_s"] = round(time.perf_counter() - start, 1)
        plan.save(cache)
    base, _, kernel, _ = parse_variant(variant)
    precision = "int8" if "int8" in base else "fp8"
    plan = variant_plan(plan, variant)
    skip = [g for g in small_patterns(args) if plan.matching(g)]
    if fuse:  # the unfused projections diffusers keeps never run: nothing to calibrate, kept as they are
        skip += [g for g in UNFUSED_QKV if plan.matching(g)]
    if linear_variant(variant).endswith("_asshipped"):
        skip += [g for g in AS_SHIPPED_SKIP if plan.matching(g)]
        notes["proj_out_bf16"] = sum(len(plan.matching(g)) for g in AS_SHIPPED_SKIP)
    # static input segments folded into the weight: one GEMM per layer (the exact split_k runs one per segment)
    common = dict(precision=precision, kernel=kernel, skip=skip, realisation="folded")
    if base == "segquant_fp8_costaware":
        plan, notes["sweep"] = cost_aware(model, plan, inputs, args, kernel)
    if base.endswith("_dynamic"):
        sq_quantize(model, SegQuantConfig(plan, **common))
    else:
        sq_quantize(model, SegQuantConfig(plan, activation="static", step="prepare", **common))
        with torch.inference_mode():
            model(**inputs)
        sq_quantize(model, SegQuantConfig(plan, activation="static", step="convert",
                                          calibration=calibration_from(model), **common))
    notes["plan"] = plan.summary()
    notes["small_layers_bf16"] = sum(1 for n in plan.layers if small_layer(n, args))
    notes["dual_scale_layers"] = sum(1 for n in plan.dual_scaled() if n not in skip and not small_layer(n, args))
    if plan.shifted():
        notes["shift_layers"] = sum(1 for n in plan.shifted() if n not in skip and not small_layer(n, args))
    return notes


def cost_aware(model, plan, inputs, args, kernel: str):
    """``segquant.cost.select`` on this model's own calibration inputs; returns the plan and the sweep."""
    from segquant.cost import CostModel, capture_linear_inputs, layer_gains, select, sweep
    from segquant.numerics import QuantSpec

    import dataclasses

    # the sweep and the choice cover the layers this variant quantizes (M = batch layers stay bf16)
    quantized = {n: p for n, p in plan.layers.items() if not small_layer(n, args)}
    sub = dataclasses.replace(plan, layers=quantized)
    rows: dict[str, int] = {}
    captured = capture_linear_inputs(model, [inputs], names=[n for n, p in quantized.items() if not p.is_plain],
                                     max_rows=args.gain_rows, rows=rows)
    rows.update({n: IMAGE_TOKENS + TEXT_TOKENS for n in quantized if n not in rows})  # plain layers: full M
    gains = layer_gains(model, sub, captured, QuantSpec("fp8", "per_channel", "fp8", "per_tensor", "folded"), rows)
    cost = CostModel(kernel=kernel, realisation="folded", fused_dual_factor=args.fused_factor,
                     tokens=IMAGE_TOKENS + TEXT_TOKENS)
    points = sweep(sub, gains, cost, [0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, float("inf")])
    chosen_sub = select(sub, gains, cost, args.threshold)
    chosen = dataclasses.replace(plan, layers={**plan.layers, **chosen_sub.layers})
    return chosen, [dict(threshold=p.threshold, extra_time=round(p.extra_time, 4), gain_db=round(p.gain_db, 2),
                         dual_layers=p.dual_layers, segmented_layers=p.segmented_layers) for p in points]


class Prepared:
    """One variant ready to time: its record so far, the callable a timed call runs and the call's inputs."""

    def __init__(self, record: dict, fn, inputs: dict, out: torch.Tensor, model):
        self.record, self.fn, self.inputs, self.out, self.model = record, fn, inputs, out, model
        self.times: list[float] = []
        self.gpu_times: list[float] = []


def prepare_variant(variant: str, args) -> Prepared:
    """Build, quantize and compile ``variant``; its first call (compile, autotuning), two warm-up calls and, with
    ``--cuda-graph``, the recording of one call into a CUDA graph whose replays are then what gets timed."""
    torch._inductor.config.freezing = args.freezing
    # inductor's search over the block sizes of every Triton kernel it generates (the elementwise and reduction
    # kernels too), as diffusers' and torchao's published FLUX benchmarks set it; every variant of a run gets it
    # (cold, with check_all_directions too, bf16's first call took 180 s on the H200 instead of 15: not set)
    torch._inductor.config.coordinate_descent_tuning = args.coordinate_descent
    torch._dynamo.config.cache_size_limit = 1024
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    record: dict = dict(bench="flux_e2e", variant=variant, blocks=args.blocks or "full (19+38)",
                        tokens=IMAGE_TOKENS + TEXT_TOKENS,
                        device=torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, torch=torch.__version__,
                        git=args.git, run=args.run_id, compile=args.compile, compile_mode=args.compile_mode,
                        freezing=args.freezing, coordinate_descent=args.coordinate_descent, cuda_graph=args.cuda_graph,
                        cold_compile=os.environ.get("SPEED_COLD_COMPILE") == "1",
                        quantize_small=args.quantize_small, quantize_adaln=args.quantize_adaln,
                        command=os.environ.get("SPEED_COMMAND", ""))
    start = time.perf_counter()
    model, meta = build_model(args.blocks, *([args.config] if args.config else []))
    record["fused_qkv"] = fused_qkv(variant, args)
    if record["fused_qkv"]:  # diffusers' fused projections: to_qkv / to_added_qkv, output-segmented in the plan
        model.fuse_qkv_projections()
        meta.fuse_qkv_projections()
    inputs = make_inputs(model)
    record["build_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    linears, fp8_attention = split_attention(variant)
    record.update(quantize(model, meta, linears, inputs, args))
    if fp8_attention:
        from segquant.attention import fp8_attention_scope
        from segquant_torchao.fa3_attention import fa3_fp8_attention, load_fa3

        load_fa3(args.fa3_library)
        fp8_attention_scope(model, attend=fa3_fp8_attention).enable()  # its hooks keep it for the model's life
        record["attention"] = "FlashAttention-3 e4m3 (Q, K, V per head, dynamic; K centred)"
    _sync()
    record["quantize_s"] = round(time.perf_counter() - start, 1)
    record["weight_gb"] = round(weight_bytes(model) / 2 ** 30, 3)
    print(json.dumps({k: v for k, v in record.items() if k != "sweep"}), flush=True)
    if args.compile == "full":
        fn = torch.compile(model, mode=args.compile_mode)
    elif args.compile == "regional":
        model.compile_repeated_blocks(mode=args.compile_mode)
        fn = model
    else:
        fn = model
    if "reduce-overhead" in args.compile_mode:
        fn = _cudagraph_steps(fn)
    from torch._dynamo.utils import counters

    with torch.inference_mode():
        start = time.perf_counter()
        out = fn(**inputs)[0].clone()  # CUDA-graph replays reuse their output memory
        _sync()
        record["compile_s"] = round(time.perf_counter() - start, 1)  # first call: compile + autotune + run
        record["dynamo_graphs"] = int(counters["stats"]["unique_graphs"])  # recompiles show here
        if "reduce-overhead" in args.compile_mode:
            record["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])
        print(f"{variant}: first call {record['compile_s']} s", flush=True)
        for _ in range(2):
            fn(**inputs)
        _sync()
        if args.cuda_graph and variant in args.cuda_graph_skip.split(","):
            record["timed_as"] = "calls (--cuda-graph-skip)"
        elif args.cuda_graph:
            start = time.perf_counter()
            try:
                fn, record["cuda_graph_proof"] = record_cuda_graph(fn, inputs, out)
                record["timed_as"] = "graph replays"
            except Exception as e:  # noqa: BLE001 - e.g. a host sync in the call: timed as ordinary calls instead
                if DEVICE != "cuda":
                    raise
                torch.cuda.synchronize()
                record.update(timed_as="calls (capture failed)", cuda_graph_error=f"{type(e).__name__}: {str(e)[:200]}")
                fn(**inputs)
                _sync()
            record["graph_capture_s"] = round(time.perf_counter() - start, 1)
    return Prepared(record, fn, inputs, out, model)


def record_cuda_graph(fn, inputs: dict, reference: torch.Tensor):
    """Record one call of ``fn`` into a ``torch.cuda.CUDAGraph``; returns a callable that replays it and the proof
    that it was recorded: one replay profiled (graph launches, kernel launches from the host, kernels run on the
    GPU) and the replay's output against ``reference``, the output of an ordinary call."""
    if DEVICE != "cuda":
        raise RuntimeError("--cuda-graph needs a CUDA device")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks before a capture
        fn(**inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(**inputs)[0]

    def replay(**_):
        graph.replay()
        return (static_out,)

    replay(**inputs)
    _sync()
    proof = launch_counts(replay, inputs)
    proof["max_abs_diff_vs_call"] = float((static_out.float() - reference.float()).abs().max())
    return replay, proof


def profiled_call(fn, inputs: dict):
    """One synchronised call of ``fn`` under torch.profiler (CPU, and CUDA on the GPU): the profile and the call's
    wall time in ms."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    _sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn(**inputs)
        _sync()
        wall = (time.perf_counter() - start) * 1e3
    return prof, wall


def launch_counts(fn, inputs: dict) -> dict:
    """What the host launched in one call of ``fn`` (torch.profiler): CUDA-graph launches, single-kernel launches
    (runtime and driver API: inductor, Triton, cuBLAS) and the number of kernels the GPU ran."""
    prof, _ = profiled_call(fn, inputs)
    counts = dict(graph_launches=0, kernel_launches=0, gpu_kernels=0)
    for event in prof.key_averages():
        name = event.key
        if str(getattr(event, "device_type", "")).endswith("CUDA"):
            counts["gpu_kernels"] += event.count
        elif name in ("cudaGraphLaunch", "cuGraphLaunch"):
            counts["graph_launches"] += event.count
        elif name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"):
            counts["kernel_launches"] += event.count
    return counts


def time_rounds(prepared: list[Prepared], iters: int, seed: int = 0) -> None:
    """``iters`` rounds; each round calls every prepared variant once (one variant: plain repeats), in an order
    shuffled per round. Interleaving puts every variant under the same machine state (clocks, other tenants) round
    by round; the shuffle keeps one variant from always following the same one (a GPU that has just run bf16's
    GEMMs draws more power and may clock the next call lower)."""
    order = random.Random(seed)
    with torch.inference_mode():
        for _ in range(iters):
            for p in order.sample(prepared, len(prepared)):
                begin, end = ((torch.cuda.Event(enable_timing=True) for _ in range(2)) if DEVICE == "cuda"
                              else (None, None))
                start = time.perf_counter()
                if begin is not None:
                    begin.record()
                p.fn(**p.inputs)
                if end is not None:
                    end.record()
                _sync()  # one call is ~100 ms: host timing around a synchronised call is exact enough
                p.times.append((time.perf_counter() - start) * 1e3)
                if begin is not None:
                    p.gpu_times.append(begin.elapsed_time(end))


def finish_record(p: Prepared, args, peak_gb: float | None) -> dict:
    record, times, gpu_times = p.record, p.times, p.gpu_times
    from torch._dynamo.utils import counters

    record["dynamo_graphs_after_timing"] = int(counters["stats"]["unique_graphs"])
    if gpu_times:
        record.update(gpu_ms_median=round(statistics.median(gpu_times), 2),
                      gpu_ms_all=[round(t, 2) for t in gpu_times])
    with torch.inference_mode():
        out = p.fn(**p.inputs)[0].clone()  # the output of a timed call (a replay under --cuda-graph)
        if args.profile:
            record["profile"] = profile_call(p.fn, p.inputs, args.profile_top)
    record.update(ms_median=round(statistics.median(times), 2), ms_min=round(min(times), 2),
                  ms_max=round(max(times), 2), iters=len(times), ms_all=[round(t, 2) for t in times],
                  peak_gb=peak_gb)
    ref_name = f"bf16_out_{args.blocks or 'full'}.pt"
    ref_path = (args.ref_dir or args.out) / ref_name
    if record["variant"] == "bf16":
        torch.save(out.float().cpu(), args.out / ref_name)
    elif ref_path.exists():
        from segquant.numerics import sqnr_db

        record["sqnr_vs_bf16_db"] = round(sqnr_db(torch.load(ref_path), out.float().cpu()), 2)
    record["finite"] = bool(torch.isfinite(out).all())
    return record


def paired_ratio(times: list[float], base: list[float], seed: int = 0) -> dict:
    """Median of the per-round ratio ``times / base`` (rounds of one interleaved run) with a 95% bootstrap
    interval over rounds."""
    ratios = torch.tensor(times, dtype=torch.float64) / torch.tensor(base, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(ratios), (2000, len(ratios)), generator=gen)
    boot = ratios[idx].median(dim=1).values
    return dict(median=round(float(ratios.median()), 4), lo=round(float(boot.quantile(0.025)), 4),
                hi=round(float(boot.quantile(0.975)), 4), rounds=len(ratios))


def run_variants(variants: list[str], args) -> list[dict]:
    """Prepare each variant in this process, time them in interleaved rounds and return their records; a variant
    after the first carries ``paired_vs_first`` (per-round time ratio to the first variant)."""
    prepared, failed = [], {}
    for v in variants:
        try:
            prepared.append(prepare_variant(v, args))
        except Exception as e:  # noqa: BLE001 - one variant's failure is its record; the others still run
            if len(variants) == 1:
                raise
            traceback.print_exc()
            failed[v] = error_record(v, args, e)
            gc.collect()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    if not prepared:
        return list(failed.values())
    variants = [p.record["variant"] for p in prepared]
    gc.collect()
    collections = sum(g["collections"] for g in gc.get_stats())
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    time_rounds(prepared, args.iters)
    collected = sum(g["collections"] for g in gc.get_stats()) - collections
    peak = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3) if DEVICE == "cuda" else 0.0
    records = []
    for p in prepared:
        # gc runs during the timed calls; a bimodal ms_all with a steady gpu_ms_all is host-side
        p.record["gc_collections_timed"] = collected
        record = finish_record(p, args, peak if len(prepared) == 1 else None)
        if len(prepared) > 1:
            record["interleaved_with"] = [v for v in variants if v != record["variant"]]
            record["round_order"] = "shuffled per round"
            record["peak_gb_all_variants"] = peak
            if p is not prepared[0]:
                record["paired_vs_first"] = dict(vs=variants[0], ms=paired_ratio(p.times, prepared[0].times),
                                                 **({"gpu_ms": paired_ratio(p.gpu_times, prepared[0].gpu_times)}
                                                    if p.gpu_times else {}))
        records.append(record)
    return records + list(failed.values())


def failed_record(variant: str, args, error: str) -> dict:
    """The record of a variant that has no timing: its error, and the run's settings (the report groups by them)."""
    return dict(bench="flux_e2e", variant=variant, blocks=args.blocks or "full (19+38)", error=error, run=args.run_id,
                git=args.git, compile=args.compile, compile_mode=args.compile_mode, cuda_graph=args.cuda_graph,
                coordinate_descent=args.coordinate_descent)


def error_record(variant: str, args, error: Exception) -> dict:
    return failed_record(variant, args, f"{type(error).__name__}: {str(error)[:400]}")


def _cudagraph_steps(fn):
    """Mark each call as a new step of the CUDA graphs that ``reduce-overhead`` records, so that a replay may
    overwrite the previous call's outputs."""

    def call(**kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return fn(**kwargs)

    return call


KERNEL_KINDS = (  # first match wins; names of cuBLAS (nvjet, sm90_xmma), CUTLASS, flash/cuDNN and inductor kernels
    ("fused elementwise (inductor)", ("triton_poi", "triton_red", "triton_per")),  # named after the ops they fuse
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "_mm_", "mm_kernel", "int_mm", "matmul", "triton_tem")),
)


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel, from its name: attention, gemm, fused elementwise (inductor) or other."""
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile_call(fn, inputs: dict, top: int = 8) -> dict:
    """GPU time of one call by kernel kind (ms), the top kernels with their launch counts, and the profiled call's
    wall time. ``kernel_count`` counts every GPU activity the profiler reports (kernels, and the few memsets and
    copies)."""
    prof, wall = profiled_call(fn, inputs)
    kinds: dict[str, float] = {}
    kernels: dict[str, float] = {}
    counts: dict[str, int] = {}
    for event in prof.key_averages():
        if str(getattr(event, "device_type", "")).endswith("CUDA"):
            ms = event.self_device_time_total / 1e3
            kind = kernel_kind(event.key)
            kinds[kind] = kinds.get(kind, 0.0) + ms
            kernels[event.key] = kernels.get(event.key, 0.0) + ms
            counts[event.key] = counts.get(event.key, 0) + event.count
    busy = sum(kinds.values())
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])
    return dict(classifier=2, wall_ms=round(wall, 2), kernel_ms=round(busy, 2), kernel_count=sum(counts.values()),
                kinds={k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                top=[(name[:200], round(ms, 3), counts[name]) for name, ms in ranked[:top]])


def child(args) -> int:
    """Run ``--variant`` (one variant, or several comma-separated ones timed in interleaved rounds) in this
    process; append their records to speed.jsonl."""
    path = args.out / "speed.jsonl"
    variants = args.variant.split(",")
    try:
        records = run_variants(variants, args)
    except Exception as e:  # noqa: BLE001 - the error is the result of these variants
        traceback.print_exc()
        records = [error_record(v, args, e) for v in variants]
    with path.open("a") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    for record in records:
        print(json.dumps(record), flush=True)
    return 0 if all("error" not in r for r in records) else 1


def driver(args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        sys.exit(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    args.run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S")
    passthrough = ["--out", str(args.out), "--run-id", args.run_id, "--iters", str(args.iters),
                   "--compile", args.compile,
                   "--compile-mode", args.compile_mode, "--git", args.git, "--threshold", str(args.threshold),
                   *(["--freezing"] if args.freezing else []),
                   *(["--coordinate-descent"] if args.coordinate_descent else []),
                   "--fused-factor", str(args.fused_factor), "--gain-rows", str(args.gain_rows)]
    passthrough += ["--blocks", str(args.blocks)] if args.blocks else []
    passthrough += ["--config", str(args.config)] if args.config else []
    passthrough += ["--ref-dir", str(args.ref_dir)] if args.ref_dir else []
    passthrough += ["--fa3-library", str(args.fa3_library)] if args.fa3_library else []
    passthrough += ["--quantize-small"] if args.quantize_small else []
    passthrough += ["--quantize-adaln"] if args.quantize_adaln else []
    passthrough += ["--fuse-qkv"] if args.fuse_qkv else []
    passthrough += ["--profile", "--profile-top", str(args.profile_top)] if args.profile else []
    passthrough += ["--cpu-smoke"] if args.cpu_smoke else []
    passthrough += ["--cuda-graph", "--cuda-graph-skip", args.cuda_graph_skip] if args.cuda_graph else []
    begin = time.perf_counter()
    # --interleave: one process holds every variant and times them round by round
    for variant in ([",".join(variants)] if args.interleave else variants):
        left = args.budget - (time.perf_counter() - begin)
        if left < 60:
            print(f"budget spent: {variant} and later variants not run", flush=True)
            break
        timeout = min(args.timeout, left - 10)
        log = args.out / f"speed_{variant.replace(',', '+')}.log"
        print(f"== {variant} (timeout {timeout:.0f} s, log {log.name})", flush=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", SPEED_COMMAND=shlex.join(["python", *sys.argv]))
        if args.cold_compile:  # empty inductor and Triton caches: the first call compiles and autotunes everything
            cache = Path(tempfile.mkdtemp(prefix=f"speed_cold_{variant[:40].replace(',', '+')}_"))
            env.update(TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"),
                       SPEED_COLD_COMPILE="1")
        jsonl = args.out / "speed.jsonl"
        before = jsonl.read_text().count("\n") if jsonl.exists() else 0
        with log.open("w") as fh:
            proc = subprocess.Popen([sys.executable, __file__, "--variant", variant, *passthrough], stdout=fh,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                wrote = jsonl.exists() and jsonl.read_text().count("\n") > before
                print(f"{variant}: killed after {timeout:.0f} s" + (", after writing its record" if wrote else ""),
                      flush=True)
                if wrote:
                    continue
                with jsonl.open("a") as out:
                    for name in variant.split(","):
                        out.write(json.dumps(failed_record(name, args, f"timeout after {timeout:.0f} s")) + "\n")
        print(log.read_text()[-1500:], flush=True)


def run_label(record: dict) -> str:
    """The run a record belongs to: its ``--run-id``, or its git hash for records written before run ids."""
    return record.get("run") or f"git {record.get('git', '?')}"


def across_runs(groups: dict) -> list[str]:
    """One line per variant: its speed-up over bf16 and over torchao fp8 in each run that measured both."""
    ratios: dict[str, list[tuple[str, float, float | None]]] = {}
    for sub in groups.values():
        ok = {r["variant"]: r["ms_median"] for r in sub if "ms_median" in r}
        if "bf16" not in ok:
            continue
        for variant, ms in ok.items():
            if variant != "bf16":
                ao = ok.get("torchao_fp8_rowwise")
                ratios.setdefault(variant, []).append((run_label(sub[0]), ok["bf16"] / ms, ao / ms if ao else None))
    if not ratios:
        return []
    lines = ["## Across runs", "", "Speed-up of each variant over the bf16 row (and the torchao fp8 row) of the same "
             "run, for every run below that has one.", "",
             "| variant | x bf16 per run | vs torchao fp8 per run | runs |",
             "|---|---|---|---|"]
    for variant, values in ratios.items():
        lines.append(f"| {variant} | {', '.join(f'{b:.3f}' for _, b, _ in values)} | "
                     f"{', '.join(f'{a:.3f}' for _, _, a in values if a is not None) or '-'} | "
                     f"{', '.join(run for run, _, _ in values)} |")
    return lines + [""]


def report(out_dir: Path, command: str) -> None:
    rows = [json.loads(line) for line in (out_dir / "speed.jsonl").read_text().splitlines() if line.strip()]
    groups: dict = {}
    for r in rows:
        mode = r.get("compile_mode", "default")
        key = (f"{r.get('blocks')}, compile {r.get('compile', '?')}" + (f" mode {mode}" if mode != "default" else "")
               + (", CUDA graph replays" if r.get("cuda_graph") else "")
               + (", interleaved" if r.get("interleaved_with") else "")
               + (", cold compile" if r.get("cold_compile") else "")
               + (", coordinate-descent tuning" if r.get("coordinate_descent") else "")
               + (", all M = batch layers quantized" if r.get("quantize_small") else
                  ", adaLN quantized" if r.get("quantize_adaln") else "") + f", run {run_label(r)}")
        groups.setdefault(key, []).append(r)
    lines = ["# FLUX.1-dev-size denoiser, one call at 1024x1024 (4608 tokens), batch 1", "",
             "Random bf16 weights, full FLUX.1-dev config unless `blocks` says otherwise; torch.compile + "
             "inference_mode; one variant per process; median of the timed calls (host clock around each "
             "synchronised call; 10 unless `--quick`: 3) after 3 warm-up calls; `interleaved` runs hold all their "
             "variants in one process and call each once per round, `CUDA graph replays` time the replay of one "
             "call recorded into a CUDA graph. `compile s` = first call (compile, "
             "autotuning, run; from the machine's inductor and Triton caches unless the run is `cold compile`, and in "
             "an interleaved run only the first variant of a kind compiles from scratch). Layers with M = batch (adaLN, embedders) stay bf16 in every quantized variant "
             "unless `quantize_small` (or, for the adaLN modulations only, `adaLN quantized`, as SegQuant's "
             "recipes quantize them). SQNR is of the output "
             "against the bf16 output of the same weights and inputs.", f"Report: `{command}`", ""]
    lines += across_runs(groups)
    for blocks, sub in groups.items():
        ok = {r["variant"]: r for r in sub if "ms_median" in r}
        base = ok.get("bf16", {}).get("ms_median")
        ao = ok.get("torchao_fp8_rowwise", {}).get("ms_median")
        devices = sorted({r["device"] for r in sub if "device" in r})
        commands = sorted({r["command"] for r in sub if r.get("command")})
        torches = sorted({f"torch {r['torch']}" for r in sub if "torch" in r})
        lines += [f"## blocks: {blocks}, {' / '.join(devices + torches) or '?'}"
                  + (" (MIXED DEVICES: compare rows of one device only)" if len(devices) > 1 else ""), "",
                  *[f"Command: `{c}`" for c in commands], *([""] if commands else []),
                  "| variant | ms | range | x bf16 | vs torchao fp8 | weight GB | peak GB | compile s | SQNR dB "
                  "| notes |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sub:
            if "ms_median" not in r:
                lines.append(f"| {r['variant']} | error: {r.get('error', '?')[:120]} |||||||||")
                continue
            ms = r["ms_median"]
            x_bf16 = f"{base / ms:.3f}" if base else "-"
            x_ao = f"{ao / ms:.3f}" if ao else "-"
            notes = "; ".join(f"{k}={r[k]}" for k in ("plan", "dual_scale_layers", "shift_layers", "proj_out_bf16",
                                                      "quantize_s",
                                                      "dynamo_graphs") if k in r)
            if r.get("cuda_graph") and r.get("timed_as", "").startswith("calls"):
                notes += f"; timed as {r['timed_as']}, NOT graph replays"
                notes += f": {r['cuda_graph_error'][:120]}" if r.get("cuda_graph_error") else ""
            if r.get("cuda_graph_proof"):
                proof = r["cuda_graph_proof"]
                notes += (f"; graph replay: {proof['graph_launches']} graph launch, {proof['kernel_launches']} "
                          f"kernel launches, {proof['gpu_kernels']} GPU kernels, max diff vs a call "
                          f"{proof['max_abs_diff_vs_call']:.2g}")
            peak = r.get("peak_gb") if r.get("peak_gb") is not None else f"{r.get('peak_gb_all_variants', '-')} (all)"
            lines.append(f"| {r['variant']} | {ms:.1f} | {r['ms_min']:.1f}-{r['ms_max']:.1f} | {x_bf16} | {x_ao} | "
                         f"{r['weight_gb']} | {peak} | {r['compile_s']} | {r.get('sqnr_vs_bf16_db', '-')} | "
                         f"{notes} |")
        paired = [r for r in sub if "paired_vs_first" in r]
        if paired and not any("round_order" in r for r in paired):
            lines += ["", "This run called its variants in one fixed order each round (before the shuffle): the "
                      "variant right after bf16 ran slower every round, a position effect, not its kernels."]
        if paired:
            lines += ["", f"Paired per round (interleaved): time ratio to `{paired[0]['paired_vs_first']['vs']}` of "
                      "the same round, median and 95% bootstrap interval over rounds (host clock; GPU events):", "",
                      "| variant | ratio (host) | ratio (GPU events) | rounds |", "|---|---|---|---|"]
            for r in paired:
                host, gpu = r["paired_vs_first"]["ms"], r["paired_vs_first"].get("gpu_ms")
                gpu_txt = f"{gpu['median']:.4f} [{gpu['lo']:.4f}, {gpu['hi']:.4f}]" if gpu else "-"
                lines.append(f"| {r['variant']} | {host['median']:.4f} [{host['lo']:.4f}, {host['hi']:.4f}] | "
                             f"{gpu_txt} | {host['rounds']} |")
            twins = [(r, ok[r["variant"].replace("_shift", "_nodual")]) for r in sub
                     if "_shift" in r["variant"] and r["variant"].replace("_shift", "_nodual") in ok
                     and "ms_all" in r and r.get("interleaved_with")]
            peer = ok.get("torchao_fp8_rowwise")
            if peer is not None and peer.get("interleaved_with"):  # how far ahead of torchao fp8, round by round
                twins += [(peer, r) for r in sub if r["variant"].startswith("segquant_fp8") and "ms_all" in r
                          and r.get("interleaved_with")]
            for r, twin in twins:  # the shift's cost, or torchao's time over SegQuant's: per-round ratios
                ratio = paired_ratio(r["ms_all"], twin["ms_all"])
                lines.append(f"| {r['variant']} / {twin['variant']} | {ratio['median']:.4f} [{ratio['lo']:.4f}, "
                             f"{ratio['hi']:.4f}] | - | {ratio['rounds']} |")
        for r in sub:
            if "sweep" in r:
                lines += ["", f"Cost-aware sweep ({r['variant']}; est. extra GEMM time as a fraction of the plain "
                          "GEMM time, summed per-layer SQNR gain):", "",
                          "| threshold dB/% | extra time | gain dB | DualScale layers | segmented layers |",
                          "|---|---|---|---|---|"]
                lines += [f"| {p['threshold']} | {p['extra_time']} | {p['gain_db']} | {p['dual_layers']} | "
                          f"{p['segmented_layers']} |" for p in r["sweep"]]
        profiled = [r for r in sub if "profile" in r]
        if profiled:
            kinds = sorted({k for r in profiled for k in r["profile"]["kinds"]})
            lines += ["", "Where one call's GPU time goes (torch.profiler, one call after the timed ones; ms of kernel "
                      "time by kind; `median - kernels` ≈ GPU idle in an unprofiled call; `profiled wall` includes "
                      "the profiler's own overhead):", "",
                      "| variant | median | kernels | median - kernels | " + " | ".join(kinds) + " | profiled wall |",
                      "|---" * (5 + len(kinds)) + "|"]
            for r in profiled:
                prof = r["profile"]
                lines.append(f"| {r['variant']} | {r['ms_median']} | {prof['kernel_ms']} | "
                             f"{r['ms_median'] - prof['kernel_ms']:.2f} | "
                             + " | ".join(str(prof["kinds"].get(k, 0.0)) for k in kinds) + f" | {prof['wall_ms']} |")
            if any(r["profile"].get("classifier", 1) < 2 for r in profiled):
                lines += ["", "These rows were classified before inductor kernels were matched first: `attention` "
                          "also holds inductor's fused RMSNorm kernels named after the SDPA they feed "
                          "(`triton_red_fused__fused_rms_norm__scaled_dot_product_cudnn_attention...`, 3.0-4.7 ms "
                          "per call in the top lists below), which belong to `fused elementwise`."]
            lines += ["", "Top kernels per variant (ms in one call, and x launches where the record counts them):",
                      ""]
            lines += [f"- {r['variant']}: " + "; ".join(f"`{t[0][:90]}` {t[1]}" + (f" x{t[2]}" if len(t) > 2 else "")
                                                       for t in r["profile"]["top"][:REPORT_TOP])
                      for r in profiled]
        lines.append("")
    (out_dir / "speed.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
    except ImportError:
        print("matplotlib missing: no speed.png")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = {key: [r for r in sub if "ms_median" in r] for key, sub in groups.items()}
    plotted = {key: ok for key, ok in plotted.items() if len(ok) > 1 and any(r["variant"] == "bf16" for r in ok)}
    if not plotted:
        return
    cols = min(2, len(plotted))
    rows = -(-len(plotted) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(plotted):]:
        ax.axis("off")
    for ax, (key, ok) in zip(axes.flat, plotted.items()):
        base = next(r["ms_median"] for r in ok if r["variant"] == "bf16")
        speedups = [base / r["ms_median"] for r in ok]
        ax.barh(range(len(ok)), speedups,
                color=["grey" if r["variant"] == "bf16" else "tab:blue" if r["variant"].startswith("torchao")
                       else "tab:orange" for r in ok])
        for y, (x, r) in enumerate(zip(speedups, ok)):
            ax.text(x + 0.01, y, f"{x:.2f}x ({r['ms_median']:.0f} ms)", va="center", fontsize=7)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xlim(0, max(speedups) * 1.3)
        ax.set_yticks(range(len(ok)))
        ax.set_yticklabels([r["variant"] for r in ok], fontsize=7)
        ax.set_xlabel("speed-up vs compiled bf16 of the same run (higher is faster)", fontsize=8)
        ax.set_title(key.replace("full (19+38), ", "full FLUX.1-dev size, "), fontsize=8)
    devices = sorted({r.get("device", "?") for ok in plotted.values() for r in ok})
    fig.suptitle(f"One FLUX denoiser call, 4608 tokens ({' / '.join(devices)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "speed.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="output folder (speed.jsonl, logs)")
    parser.add_argument("--report", type=Path, help="DIR/speed.jsonl -> speed.md + speed.png")
    parser.add_argument("--variant", help="run this variant (or these comma-separated ones, interleaved) in this "
                        "process")
    parser.add_argument("--variants", default="", help="driver: comma-separated variants (default all)")
    parser.add_argument("--blocks", type=int, default=None, help="N double + 2N single blocks (default: full)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 timed calls")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, profile one call: GPU time by kernel kind (gemm, attention, ...)")
    parser.add_argument("--profile-top", type=int, default=8, help="--profile: how many kernels the record lists")
    parser.add_argument("--timeout", type=float, default=420,
                        help="driver: seconds per variant (per run of all variants with --interleave)")
    parser.add_argument("--interleave", action="store_true",
                        help="one process holds every variant; each timed round calls each variant once, so that "
                             "all see the same machine state; records get per-round ratios to the first variant")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="record one call into a CUDA graph after warm-up and time its replays (no host "
                             "launches: the GPU's own time); records the proof (launch counts of a replay)")
    parser.add_argument("--cold-compile", action="store_true",
                        help="driver: each variant's process starts with empty inductor and Triton caches, so that "
                             "`compile s` is a cold compile (otherwise a later variant reuses earlier kernels)")
    parser.add_argument("--cuda-graph-skip", default="",
                        help="with --cuda-graph: comma-separated variants timed as ordinary calls (their record "
                             "says cuda_graph false); a variant whose capture fails is timed so too, with the error")
    parser.add_argument("--budget", type=float, default=570, help="driver: seconds for all variants")
    parser.add_argument("--compile", choices=("full", "regional", "none"), default="full",
                        help="torch.compile the whole model, or each repeated block (diffusers' "
                             "compile_repeated_blocks), or not at all")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--freezing", action="store_true",
                        help="inductor freezing: parameters become constants of the compiled graph (inference only; "
                             "with --compile regional each block then compiles anew: on the H200 no variant finished "
                             "its first call within 75 s)")
    parser.add_argument("--coordinate-descent", action="store_true",
                        help="inductor's coordinate-descent tuning of its Triton kernels' block sizes, for every "
                             "variant (as diffusers' and torchao's FLUX benchmarks run); longer compiles")
    parser.add_argument("--quantize-small", action="store_true", help="quantize the M = batch layers too")
    parser.add_argument("--quantize-adaln", action="store_true",
                        help="quantize the adaLN modulation layers (M = batch) too, as SegQuant's recipes do; the "
                             "time/guidance embedders stay bf16, as the recipes keep them")
    parser.add_argument("--fuse-qkv", action="store_true", help="diffusers' fuse_qkv_projections first (every "
                        "variant): one to_qkv GEMM per attention, output-segmented (q, k, v scales) in SegQuant")
    parser.add_argument("--threshold", type=float, default=0.1, help="cost-aware: dB per %% of GEMM time")
    parser.add_argument("--fused-factor", type=float, default=1.0,
                        help="cost-aware: extra time of the fused DualScale share (kernel_bench: fused/plain - 1 "
                             "on ff_down)")
    parser.add_argument("--gain-rows", type=int, default=512, help="cost-aware: calibration rows per layer")
    parser.add_argument("--git", default=os.environ.get("GIT_SHA", "unknown"))
    parser.add_argument("--run-id", default="", help="groups the report's rows (default: the driver's start time)")
    parser.add_argument("--command", default="python benchmarks/speed.py --out $OUT")
    parser.add_argument("--config", type=Path, default=None, help="another FluxTransformer2DModel config JSON")
    parser.add_argument("--ref-dir", type=Path, default=None,
                        help="folder with bf16_out_<blocks>.pt from an earlier bf16 run (default: --out)")
    parser.add_argument("--fa3-library", type=Path, default=None,
                        help="FlashAttention-3's built _C.so for the _fp8attn variants (default: import flash_attn_3)")
    parser.add_argument("--cpu-smoke", action="store_true", help="run --variant on the CPU (tests the script)")
    args = parser.parse_args()
    if args.quick:
        args.iters = min(args.iters, 3)
    if args.report:
        report(args.report, args.command)
        return
    if args.out is None:
        parser.error("--out DIR is needed (or --report DIR)")
    if args.cpu_smoke:
        global DEVICE, IMAGE_TOKENS, TEXT_TOKENS
        DEVICE, IMAGE_TOKENS, TEXT_TOKENS = "cpu", 16, 8
    elif not torch.cuda.is_available():
        sys.exit("speed.py needs a CUDA device")
    if args.variant:
        bad = [v for v in args.variant.split(",") if v not in VARIANTS]
        if bad:
            sys.exit(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
        args.out.mkdir(parents=True, exist_ok=True)
        code = child(args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # a full-model compile left worker processes that held the interpreter's exit for minutes
    driver(args)
    report(args.out, args.command)


if __name__ == "__main__":
    main()
