"""Quality benchmark on the embedded MNIST models (issue 6): ModelOpt's presets, torchao's dynamic configs
and the SegQuant ablation, all sampled from the same noise and calibrated on the same calibration sets.

    python benchmarks/quality.py --device cuda --out benchmarks/results          # what produced the results
    python benchmarks/quality.py --models mnist-unet --num-samples 8 --seeds 2 --steps 2   # a quick CPU check
    python benchmarks/quality.py --device cuda --num-gpus 2 ...      # the (row, seed) jobs split over 2 GPUs
    python benchmarks/quality.py --models mnist-flux --device cuda --num-samples 128 --no-budget \
        --precisions int8_w8a8 fp8 int8_dynamic fp8_dynamic          # the rows benchmarks/quality_speed.py joins

SegQuant rows per precision are ``VARIANTS`` (recipe changes: the ablation, the activation shift per tensor / per
channel in place of or beside DualScale, per-layer alpha search and ``choose: auto`` on the int8 precisions, and
the core's per-segment SmoothQuant when it has it), plus SegQuant with per-token dynamic activations on torchao
(``DYNAMIC_VARIANTS``, built as benchmarks/speed.py builds its ``segquant_<fmt>_dynamic*`` variants).

For every calibration seed, every row is calibrated on the SAME calibration set (labels and noise of that
seed) and evaluated on the SAME evaluation noise. Per-image PSNR/SSIM pairs (image, seed) give paired
differences against each row's baseline (and shift vs DualScale vs both) with 95% bootstrap intervals; every
int8/fp8 SegQuant row is also paired with every peer preset of its format (``peer_paired``, read by
benchmarks/quality_speed.py). ModelOpt's CUDA extensions are not built here: ModelOpt's own PyTorch fallback fake
quant runs (as on CPU). Results: quality.{json,md,png}.

``--num-gpus N`` (or ``torch.distributed.run`` / ``accelerate launch``) splits the (row, calibration seed) jobs over N
processes; each job runs whole in one process, exactly as a single process runs it, and rank 0 gathers them in order
and writes the results. They equal one process's bit for bit on the same device type and thread count (on the CPU,
torch.distributed.run gives each rank one thread: compare with ``OMP_NUM_THREADS=1``). Jobs rather than images are
split because every row calibrates on its own: no statistic has to be merged, ModelOpt's own presets included.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from _common import (disable_quantizers, enabled_quantizers, environment, every_linear, figure, model_recipe,
                     modelopt_without_jit, parser, write_results)

from segquant import SegQuantError, SegQuantPlan, analyze, get_backend
from segquant.app.embedded import (load_classifier, load_denoiser, mnist_test_feature_stats, sample,
                                   sample_labels)
from segquant.app.evaluation import (layer_sqnr, linear_flops, mean_sqnr, quantized_flop_fraction,
                                     record_linear_io, score_images)
from segquant.app.metrics import paired_interval
from segquant.app.parallel import check_num_processes, launched, relaunch
from segquant.distributed import gather_objects

PRECISIONS = ("int8_w8a8", "int8_perchannel", "fp8", "w8a6", "w4a8")
RECIPE_SKIP = "recipe_skip"
"""A variant key (not a recipe field): keep the bundled recipe's skip list."""
VARIANTS: dict[str, dict] = {  # variant -> its changes to the model's bundled recipe (segquant.recipe.Recipe fields)
    "baseline": {"seg_linear": False, "dual_scale": False},
    "+SegLinear": {"seg_linear": True, "dual_scale": False},
    "+DualScale": {"seg_linear": False, "dual_scale": True},
    "SegQuant": {"seg_linear": True, "dual_scale": True},
    "shift": {"seg_linear": True, "dual_scale": False, "shift": "per_tensor"},
    "shift per-channel": {"seg_linear": True, "dual_scale": False, "shift": "per_channel"},
    "DualScale+shift": {"seg_linear": True, "dual_scale": True, "shift": "per_tensor"},
    "alpha search": {"seg_linear": True, "dual_scale": True, "alpha_search": True},
    "auto": {"seg_linear": True, "dual_scale": True, "shift": "per_tensor", "choose": "auto"},
    "recipe": {RECIPE_SKIP: True},
    "recipe DualScale": {RECIPE_SKIP: True, "dual_scale": True, "shift": None},
}
"""Every variant but the ``recipe`` ones quantizes every Linear; ``recipe`` is the model's bundled recipe as shipped
(its skip list keeps the embedders and the final ``proj_out`` in high precision, 0.0% of the Linear FLOPs; its
techniques: on INT8 the shift), ``recipe DualScale`` the same with DualScale in place of the shift (the INT8
recipes' techniques until 2026-12-01)."""
INT8_ONLY = ("alpha search", "auto", "per-segment smoothing", "recipe DualScale")
"""Variants run on the int8 precisions only (SmoothQuant variants: the fp8 recipes do not smooth)."""
INT8_PRECISIONS = ("int8_w8a8", "int8_perchannel")
PER_SEGMENT_SMOOTHING = {"smoothing": "per_segment"}
"""The ``QuantizeOptions`` change of the core's per-segment SmoothQuant (the reference code's); the "per-segment
smoothing" variant exists only when the core has that option."""
DYNAMIC_FORMATS = ("int8", "fp8")
DYNAMIC_VARIANTS: dict[str, dict] = {  # SegQuant with per-token activations on torchao (speed.py's *_dynamic*)
    "SegQuant": {"seg_linear": True, "dual_scale": True},
    "+SegLinear": {"seg_linear": True, "dual_scale": False},
    "shift": {"seg_linear": True, "dual_scale": False, "shift": "per_tensor"},
    "DualScale+shift": {"seg_linear": True, "dual_scale": True, "shift": "per_tensor"},
}
COMPARISONS = (("shift", "+DualScale"), ("shift", "SegQuant"), ("shift per-channel", "SegQuant"),
               ("DualScale+shift", "SegQuant"), ("alpha search", "SegQuant"), ("auto", "SegQuant"),
               ("per-segment smoothing", "SegQuant"), ("recipe", "recipe DualScale"))
"""Paired comparisons beside each variant vs its precision's baseline: DualScale vs shift vs both."""
DYNAMIC_COMPARISONS = (("SegQuant", "+SegLinear"), ("shift", "+SegLinear"), ("shift", "SegQuant"),
                       ("DualScale+shift", "SegQuant"))
PEERS: dict[str, tuple[str, ...]] = {  # the library presets each format's SegQuant rows are compared with
    "int8": ("torchao int8 dynamic", "ModelOpt INT8_SMOOTHQUANT_CFG (as shipped)",
             "ModelOpt INT8_SMOOTHQUANT_CFG (every Linear)", "ModelOpt INT8_DEFAULT_CFG (as shipped)",
             "ModelOpt INT8_DEFAULT_CFG (every Linear)"),
    "fp8": ("torchao fp8 dynamic per-row", "ModelOpt FP8_DEFAULT_CFG (as shipped)",
            "ModelOpt FP8_DEFAULT_CFG (every Linear)"),
}
FORMAT_OF = {"int8_w8a8": "int8", "int8_perchannel": "int8", "fp8": "fp8", "int8_dynamic": "int8",
             "fp8_dynamic": "fp8"}
"""The GEMM format of a SegQuant row's precision (w8a6 and w4a8 have no peer preset)."""


def variants() -> dict[str, dict]:
    """``VARIANTS``, plus "per-segment smoothing" (SegQuant with the core's per-segment SmoothQuant reference
    mode) when ``QuantizeOptions`` has that option."""
    from segquant.backend import QuantizeOptions

    out = dict(VARIANTS)
    if set(PER_SEGMENT_SMOOTHING) <= {f.name for f in dataclasses.fields(QuantizeOptions)}:
        out["per-segment smoothing"] = {"seg_linear": True, "dual_scale": True, **PER_SEGMENT_SMOOTHING}
    return out
GROUPS_FLUX = {
    "embedders": ("x_embedder", "context_embedder", "time_text_embed"),
    "adaLN": ("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear"),
    "qkv": ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"),
    "attention out": ("to_out", "to_add_out"),
    "MLP up": ("ff.net.0", "ff_context.net.0", "proj_mlp"),
    "MLP down": ("ff.net.2", "ff_context.net.2"),
    "single proj_out": ("single_transformer_blocks.",),
    "final proj_out": ("proj_out",),
}
GROUPS_UNET = {
    "embedders": ("time_embedding",),
    "resnet time proj": ("time_emb_proj",),
    "qkv": ("to_q", "to_k", "to_v"),
    "attention out": ("to_out",),
    "MLP up (GEGLU)": ("ff.net.0",),
    "MLP down": ("ff.net.2",),
    "proj_in/out": ("proj_in", "proj_out"),
}


def group_of(name: str, family: str) -> str:
    groups = GROUPS_FLUX if family == "flux" else GROUPS_UNET
    if family == "flux" and name.startswith("single_transformer_blocks.") and name.endswith("proj_out"):
        return "single proj_out"
    for group, keys in groups.items():
        if group == "single proj_out":
            continue
        if group == "final proj_out":
            if name == "proj_out":
                return group
            continue
        if any(k in name for k in keys):
            return group
    return "other"


def preset_config(name: str) -> dict:
    """A ModelOpt preset as shipped."""
    return copy.deepcopy(getattr(modelopt_without_jit(), name))


def w8a6_config(applied: SegQuantPlan, options) -> dict:
    """ModelOpt only: the int8_w8a8 SegQuant config with 6-bit activations. No ``segquant.precision`` has 6-bit
    activations, so the plan the algorithm gets names no precision (the quantizers say what they are)."""
    from segquant_modelopt import config_for_plan

    cfg = config_for_plan(applied, options)
    plan = cfg["algorithm"]["plan"]
    cfg["algorithm"]["plan"] = dict(plan, layers={n: dict(e, precision=None) for n, e in plan["layers"].items()})
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*input_quantizer" and "cfg" in entry:
            entry["cfg"]["num_bits"] = 6
    return cfg


def split_changes(changes: dict) -> tuple[dict, dict]:
    """A variant's changes as (``Recipe`` fields, ``QuantizeOptions`` fields)."""
    from segquant.backend import QuantizeOptions

    option_fields = {f.name for f in dataclasses.fields(QuantizeOptions)}
    changes = {k: v for k, v in changes.items() if k != RECIPE_SKIP}
    return ({k: v for k, v in changes.items() if k not in option_fields},
            {k: v for k, v in changes.items() if k in option_fields})


def quantize_variant(model, plan: SegQuantPlan, model_name: str, precision: str, changes: dict, forward_loop,
                     notes: list[str] | None = None, fp8_attention: bool = False):
    """SegQuant (or one variant of it) of a precision through the ModelOpt backend, every Linear quantized: the
    model's bundled recipe (its SmoothQuant alpha and realisation) with the variant's ``changes`` and without its
    skipped layers. A recipe with ``alpha_search`` or ``choose: auto`` first makes its per-layer choices on the
    float model's inputs over the calibration loop, as ``segquant run`` does (their summary goes to ``notes``).
    ``fp8_attention``: ModelOpt's attention quantizers too (``segquant_modelopt.with_fp8_attention``)."""
    changes = dict(changes)
    skip = {} if changes.pop(RECIPE_SKIP, False) else {"skip": ()}
    recipe_changes, option_changes = split_changes(changes)
    recipe = model_recipe(model_name, "int8_w8a8" if precision == "w8a6" else precision, **skip, **recipe_changes)
    applied = recipe.apply(plan)
    options = dataclasses.replace(recipe.quantize_options(show_progress=False), **option_changes)
    if recipe.choose == "auto" or recipe.alpha_search:
        from segquant.choose import recipe_choices

        plans, lines = recipe_choices(model, {"plan": applied}, recipe, forward_loop)
        applied = plans["plan"]
        if notes is not None:
            notes += lines["plan"]
    if fp8_attention:  # the backend's checks and quiet quantize, with the attention rules added to its config
        from segquant.backend import check_quantize_call
        from segquant_modelopt import config_for_plan, with_fp8_attention
        from segquant_modelopt.backend import quantize_quietly

        if precision == "w8a6":
            raise SegQuantError("fp8_attention goes with the fp8, int8 and w4a8 configs, not w8a6")
        backend = get_backend("modelopt")
        check_quantize_call(backend, applied, options, forward_loop)
        applied.check_model(model, complete=True)
        return quantize_quietly(model, with_fp8_attention(config_for_plan(applied, options)), forward_loop)
    if precision != "w8a6":
        return get_backend("modelopt").quantize(model, applied, options, forward_loop)
    return modelopt_without_jit().quantize(model, w8a6_config(applied, options), forward_loop)


def quantize_dynamic(model, plan: SegQuantPlan, fmt: str, changes: dict, forward_loop):
    """SegQuant with per-token dynamic activations on torchao, built as ``benchmarks/speed.py`` builds its
    ``segquant_<fmt>_dynamic*`` variants: ``segquant_torchao.SegQuantConfig`` on the analysed plan (every Linear
    here), static input segments folded into the weight, the fused kernels (torch's off CUDA). A plan with a shift
    is prepared and calibrated first (only the shifted layers: their centres)."""
    from segquant_torchao import SegQuantConfig, calibration_from, quantize

    dyn = plan.with_shift(changes["shift"]) if changes.get("shift") else plan
    dyn = dyn.ablate(seg_linear=changes.get("seg_linear", True), dual_scale=changes.get("dual_scale", True))
    common = dict(precision=fmt, realisation="folded", kernel="fused")
    if not dyn.shifted():
        return quantize(model, SegQuantConfig(dyn, **common))
    quantize(model, SegQuantConfig(dyn, step="prepare", **common))
    with torch.no_grad():
        forward_loop(model)
    return quantize(model, SegQuantConfig(dyn, step="convert", calibration=calibration_from(model), **common))


def quantized_other_layers(model: torch.nn.Module) -> int:
    """Non-Linear modules with an enabled quantizer (ModelOpt presets also quantize convolutions)."""
    return sum(1 for _, m in model.named_modules() if not isinstance(m, torch.nn.Linear) and enabled_quantizers(m))


def build_rows(family: str, precisions: tuple[str, ...] = PRECISIONS + ("int8_dynamic", "fp8_dynamic"),
               ) -> list[dict]:
    """Every row of a model: the library presets, then the SegQuant variants of ``precisions`` (static
    ``PRECISIONS`` through ModelOpt; ``<fmt>_dynamic`` through torchao)."""
    rows = []
    for preset in ("INT8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG", "FP8_DEFAULT_CFG"):
        for every in (False, True):
            rows.append({"name": f"ModelOpt {preset} ({'every Linear' if every else 'as shipped'})",
                         "kind": "modelopt", "preset": preset, "every_linear": every, "calibrated": True})
    rows.append({"name": "torchao int8 dynamic", "kind": "torchao", "precision": "int8", "calibrated": False})
    rows.append({"name": "torchao fp8 dynamic per-row", "kind": "torchao", "precision": "fp8", "calibrated": False})
    for precision in PRECISIONS:
        if precision not in precisions:
            continue
        for variant, changes in variants().items():
            if variant in INT8_ONLY and precision not in INT8_PRECISIONS:
                continue
            rows.append({"name": f"{precision} {variant}", "kind": "segquant", "precision": precision,
                         "variant": variant, "changes": changes, "calibrated": True})
    for fmt in DYNAMIC_FORMATS:
        if f"{fmt}_dynamic" not in precisions:
            continue
        for variant, changes in DYNAMIC_VARIANTS.items():  # calibrated only for a shift's centres
            rows.append({"name": f"{fmt} dynamic {variant}", "kind": "segquant_dynamic", "precision": f"{fmt}_dynamic",
                         "variant": variant, "changes": changes, "calibrated": bool(changes.get("shift"))})
    return rows


def quantize_row(row: dict, den, forward_loop, plan: SegQuantPlan, model_name: str, notes: list[str]):
    model = den.model
    if row["kind"] == "modelopt":
        cfg = preset_config(row["preset"])
        if row["every_linear"]:  # the preset without its *proj_out* skip, then only Linear layers quantized
            cfg["quant_cfg"] = [e for e in cfg["quant_cfg"] if e.get("quantizer_name") != "*proj_out.*"]
        model = modelopt_without_jit().quantize(model, cfg, forward_loop)
        if row["every_linear"]:
            disable_quantizers(model, lambda _, m: isinstance(m, torch.nn.Linear))
        return model
    if row["kind"] == "segquant":
        return quantize_variant(model, plan, model_name, row["precision"], row["changes"], forward_loop, notes)
    if row["kind"] == "segquant_dynamic":
        fmt = row["precision"].removesuffix("_dynamic")
        return quantize_dynamic(model, plan, fmt, row["changes"], forward_loop)
    torchao = get_backend("torchao")
    if row["precision"] == "fp8":  # torchao's per-row fp8 takes bf16 weights only
        return torchao.quantize_baseline(model.to(torch.bfloat16), "fp8", forward_loop)[0]
    return torchao.quantize_baseline(model, "int8_w8a8", forward_loop)[0]


def quantized_names(row: dict, model) -> set[str]:
    backend = "torchao" if row["kind"] in ("torchao", "segquant_dynamic") else "modelopt"
    return set(get_backend(backend).quantized_linears(model))


@dataclasses.dataclass
class ModelContext:
    """What every (row, seed) job of one model reads: the float model and its reference images and scores."""

    name: str
    fp: object
    plan: SegQuantPlan
    changed: list[str]
    ref_io: dict
    flops: dict
    fp_images: torch.Tensor
    fp_scores: object
    rows: list[dict]


def model_context(model_name: str, args, labels: torch.Tensor, classifier) -> ModelContext:
    fp = load_denoiser(model_name, args.device)
    example = fp.example_inputs(2)
    plan = every_linear(analyze(fp.model, **example))
    ref_io = record_linear_io(fp.model, lambda: fp.model(**example))
    fp_images = sample(fp, labels, seed=0, steps=args.steps, progress=False)
    rows = build_rows(fp.family, tuple(args.precisions))
    if args.rows:
        rows = [r for r in rows if any(s in r["name"] for s in args.rows)]
    return ModelContext(model_name, fp, plan, sorted(n for n, lp in plan.layers.items() if not lp.is_plain), ref_io,
                        linear_flops(ref_io), fp_images, score_images(fp_images, fp_images, labels, classifier), rows)


def row_seeds(row: dict, args) -> list:
    return list(range(args.seeds)) if row["calibrated"] else [None]


def run_job(row: dict, seed, ctx: ModelContext, args, labels, calib_labels, classifier, mnist, started) -> dict:
    """One row calibrated with one seed: a copy of the float model quantized, sampled and scored. Returns the run's
    summary (``error`` when it failed) and its per-image PSNR, SSIM and correctness (CPU tensors)."""
    t = time.time()
    den = copy.deepcopy(ctx.fp)

    def forward_loop(_model, den=den, seed=seed):
        sample(den, calib_labels, seed=1000 + (seed or 0), steps=args.steps, progress=False)

    notes: list[str] = []
    try:
        den.model = quantize_row(row, den, forward_loop, ctx.plan, ctx.name, notes)
        images = sample(den, labels, seed=0, steps=args.steps, progress=False)
    except Exception as e:  # noqa: BLE001 - a failing row is a result, recorded as such
        run = {"seed": seed, "error": f"{type(e).__name__}: {e}"[:400]}
        print(f"{ctx.name} | {row['name']} | seed {seed}: FAILED {run['error']}", flush=True)
        return {"run": run, "per_image": None}
    scores = score_images(images, ctx.fp_images, labels, classifier)
    sq = layer_sqnr(den.model, ctx.ref_io)
    qnames = quantized_names(row, den.model)
    run = {"seed": seed, **scores.summary(ctx.fp_scores, mnist),
           "quantized_linear_flop_fraction": quantized_flop_fraction(ctx.flops, qnames),
           "quantized_other_layers": quantized_other_layers(den.model),
           "mean_sqnr_db_changed_layers": mean_sqnr(sq, ctx.changed, qnames),
           "layer_sqnr_db": sq, "seconds": time.time() - t, **({"notes": notes} if notes else {})}
    print(f"{ctx.name} | {row['name']} | seed {seed}: PSNR {run['psnr_db']:.2f} SSIM {run['ssim']:.4f} "
          f"acc {run['class_accuracy']:.3f} ({run['seconds']:.1f}s, total {time.time() - started:.0f}s)", flush=True)
    return {"run": run, "per_image": {"psnr": scores.psnr.cpu(), "ssim": scores.ssim.cpu(),
                                      "correct": scores.correct.float().cpu()}}


def record_job(job: dict, row: dict, ctx: ModelContext, runs: list, per_image: dict, log) -> None:
    """A job's result into its row's runs, the per-image lists and quality_runs.jsonl."""
    runs.append(job["run"])
    if job["per_image"] is None:
        return
    rec = per_image.setdefault(row["name"], {"psnr": [], "ssim": [], "correct": []})
    for key, values in job["per_image"].items():
        rec[key].append(values)
    log.write(json.dumps({"model": ctx.name, "row": row["name"],
                          **{k: v for k, v in job["run"].items() if k != "layer_sqnr_db"}}) + "\n")
    log.flush()


def gather_jobs(local: dict, device: str) -> dict:
    """Every rank's job results, merged (a collective of the processes ``--num-gpus`` started). The process group
    exists only for this gather: while the jobs run, each rank samples and calibrates on its own, as one process
    would, so its numbers are bit for bit a single process's on the same device."""
    import datetime

    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                         timeout=datetime.timedelta(hours=24))  # ranks finish their jobs unevenly
    try:
        parts = gather_objects(local)
    finally:
        torch.distributed.destroy_process_group()
    return {key: job for part in parts for key, job in part.items()}


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--models", nargs="+", default=["mnist-flux", "mnist-unet"])
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="run the (row, seed) jobs in N processes, one per GPU (gloo processes with --device cpu); "
                   "rank 0 gathers them and writes the results, which equal one process's")
    p.add_argument("--rows", nargs="*", help="only rows whose name contains one of these strings")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS) + [f"{f}_dynamic" for f in DYNAMIC_FORMATS],
                   choices=list(PRECISIONS) + [f"{f}_dynamic" for f in DYNAMIC_FORMATS],
                   help="SegQuant rows of these precisions only (the library presets always run; default: all)")
    p.add_argument("--no-budget", action="store_true", help="skip the per-group error budget")
    p.add_argument("--save-every-row", action="store_true", help="rewrite quality.json/.md after every row (a run "
                   "stopped by a time limit keeps its finished rows; one process only)")
    p.add_argument("--merge", nargs="+", type=Path, help="combine the models of these quality.json files (e.g. "
                   "runs on different devices) into --out, each model keeping its own command and device")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.num_samples < 2 or args.seeds < 1:
        raise SystemExit("--num-samples must be >= 2 and --seeds >= 1")
    try:
        check_num_processes(args.num_gpus, args.device)
    except SegQuantError as e:
        raise SystemExit(str(e)) from None
    if args.num_gpus > 1 and not launched():
        raise SystemExit(relaunch(args.num_gpus, sys.argv[1:] if argv is None else list(argv), target=[__file__]))
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and args.device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    torch.backends.cuda.matmul.allow_tf32 = False  # full fp32 reference math
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(args.device)
    mnist = mnist_test_feature_stats()
    labels = sample_labels(args.num_samples)
    calib_labels = sample_labels(args.calib_samples)
    settings = vars(args)
    result = {"settings": settings, "models": {}, "environment": environment(args.device, processes=world)}
    started = time.time()
    contexts = {name: None for name in args.models}
    jobs: dict = {}
    if world > 1:  # each rank runs every world-th (row, seed) job of every model, then rank 0 gathers them
        for model_name in args.models:
            ctx = contexts[model_name] = model_context(model_name, args, labels, classifier)
            mine = [(i, seed) for i, row in enumerate(ctx.rows) for seed in row_seeds(row, args)][rank::world]
            for i, seed in mine:
                jobs[(model_name, i, seed)] = run_job(ctx.rows[i], seed, ctx, args, labels, calib_labels,
                                                      classifier, mnist, started)
        jobs = gather_jobs(jobs, args.device)
        if rank != 0:
            return
    log = open(out / "quality_runs.jsonl", "w")
    for model_name in args.models:
        ctx = contexts[model_name] or model_context(model_name, args, labels, classifier)
        model_result = {"fp": ctx.fp_scores.summary(None, mnist), "plan": ctx.plan.summary(),
                        "changed_layers": ctx.changed, "rows": {}, "environment": result["environment"],
                        "settings": settings}
        per_image: dict[str, dict[str, list]] = {}
        for i, row in enumerate(ctx.rows):
            runs: list = []
            for seed in row_seeds(row, args):
                job = jobs.get((model_name, i, seed)) if world > 1 else \
                    run_job(row, seed, ctx, args, labels, calib_labels, classifier, mnist, started)
                record_job(job, row, ctx, runs, per_image, log)
                if "error" in job["run"]:
                    break  # a row that failed on one seed is not run on the next (nor recorded, across ranks)
            model_result["rows"][row["name"]] = {"spec": row, "runs": runs}
            if args.save_every_row and world == 1:  # a run cut short by a time limit keeps every finished row
                model_result["paired"] = paired_comparisons(comparison_pairs(ctx.rows), per_image)
                model_result["peer_paired"] = paired_comparisons(peer_pairs(ctx.rows), per_image, metrics=("psnr",))
                result["models"][model_name] = model_result
                result["seconds"] = time.time() - started
                write_results(out, "quality", result, markdown(result))
        model_result["paired"] = paired_comparisons(comparison_pairs(ctx.rows), per_image)
        model_result["peer_paired"] = paired_comparisons(peer_pairs(ctx.rows), per_image, metrics=("psnr",))
        if not args.no_budget:
            model_result["error_budget"] = error_budget(ctx.fp, model_name, ctx.plan, labels, calib_labels,
                                                        ctx.fp_images, ctx.ref_io, ctx.flops, classifier, args)
        result["models"][model_name] = model_result
        result["seconds"] = time.time() - started
        save(result, out)
    print(f"{len(args.models)} models in {result['seconds']:.0f}s")


SAME_SETTINGS = ("num_samples", "calib_samples", "steps", "seeds")
"""Runs whose rows of one model may be merged: the same evaluation images, calibration sets and seeds (rows are
deterministic functions of these, so a row of a later run pairs with the earlier run's rows image by image)."""


def merge(paths: list[Path], out: Path) -> None:
    """Combine quality.json files: models side by side; a model in several files gets the rows (and the paired
    comparisons) of every file, later files adding rows, when their settings agree (``SAME_SETTINGS``)."""
    result = {"settings": None, "models": {}, "environment": None, "seconds": 0.0, "merged_from": []}
    for path in paths:
        part = json.loads(path.read_text())
        for name, model in part["models"].items():
            model.setdefault("environment", part["environment"])
            model.setdefault("settings", part["settings"])
            if name in result["models"]:
                _merge_rows(result["models"][name], model, path)
            else:
                result["models"][name] = model
        result["seconds"] += part["seconds"]
        result["merged_from"] += part.get("merged_from") or [part["environment"]["command"]]  # a merged file too
    save(result, out)
    print(f"merged {len(paths)} files")


def _merge_rows(into: dict, more: dict, path: Path) -> None:
    differ = [k for k in SAME_SETTINGS if into["settings"].get(k) != more["settings"].get(k)]
    if differ:
        raise SystemExit(f"{path}: its {', '.join(differ)} differ from the earlier file's: its rows do not pair")
    into["rows"].update(more["rows"])
    into.setdefault("added_by", []).append(more["environment"]["command"])
    for key in ("paired", "peer_paired"):
        seen = {(e["row"], e["baseline"]) for e in more.get(key, [])}
        into[key] = [e for e in into.get(key, []) if (e["row"], e["baseline"]) not in seen] + more.get(key, [])


def save(result: dict, out: Path) -> None:
    write_results(out, "quality", result, markdown(result))
    plot(result, out / "quality.png")


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(values).flatten()


def comparison_pairs(rows: list[dict]) -> list[tuple[str, str]]:
    """(row, compared with) for quality.md: each SegQuant variant against its precision's baseline and the
    ``COMPARISONS`` (shift vs DualScale vs both), the dynamic rows' ``DYNAMIC_COMPARISONS``, and SegQuant against
    the ModelOpt preset of its precision."""
    pairs = []
    for row in rows:
        if row["kind"] == "segquant":
            p, v = row["precision"], row["variant"]
            if v != "baseline":
                pairs.append((row["name"], f"{p} baseline"))
            pairs += [(row["name"], f"{p} {b}") for a, b in COMPARISONS if a == v]
        elif row["kind"] == "segquant_dynamic":
            fmt = row["precision"].removesuffix("_dynamic")
            pairs += [(row["name"], f"{fmt} dynamic {b}") for a, b in DYNAMIC_COMPARISONS if a == row["variant"]]
    for precision, preset in (("int8_w8a8", "INT8_SMOOTHQUANT_CFG"), ("int8_perchannel", "INT8_DEFAULT_CFG"),
                              ("fp8", "FP8_DEFAULT_CFG")):
        for shipped in ("as shipped", "every Linear"):
            pairs.append((f"{precision} SegQuant", f"ModelOpt {preset} ({shipped})"))
    return pairs


def peer_pairs(rows: list[dict]) -> list[tuple[str, str]]:
    """(SegQuant row, peer preset) for every SegQuant row of an int8 or fp8 precision and every ``PEERS`` preset
    of that format (what benchmarks/quality_speed.py reads)."""
    return [(row["name"], peer) for row in rows if row["kind"] in ("segquant", "segquant_dynamic")
            and row["precision"] in FORMAT_OF for peer in PEERS[FORMAT_OF[row["precision"]]]]


def _aligned(a: list, b: list) -> tuple[list, list] | None:
    """Per-seed series of two rows paired run by run; an uncalibrated row's single run pairs with every seed of
    a calibrated one (same evaluation noise). None when they cannot be paired."""
    if len(a) == len(b):
        return a, b
    if len(a) == 1:
        return a * len(b), b
    if len(b) == 1:
        return a, b * len(a)
    return None


def paired_comparisons(pairs: list[tuple[str, str]], per_image: dict,
                       metrics: tuple[str, ...] = ("psnr", "ssim", "correct")) -> list[dict]:
    """Paired differences (row - the row it is compared with) over (image, seed) pairs, 95% bootstrap intervals;
    pairs with a row that did not run are left out."""
    out = []
    for a, b in pairs:
        if a not in per_image or b not in per_image:
            continue
        entry = {"row": a, "baseline": b}
        for metric in metrics:
            series = _aligned(per_image[a][metric], per_image[b][metric])
            if series is None:
                break
            x, y = _stack(series[0]), _stack(series[1])
            finite = torch.isfinite(x) & torch.isfinite(y)
            iv = paired_interval(x[finite], y[finite])
            entry[metric] = {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n, "significant": iv.significant}
        else:
            out.append(entry)
    return out


def error_budget(fp, model_name, plan, labels, calib_labels, fp_images, ref_io, flops, classifier, args) -> dict:
    """INT8 W8A8, seed 0: the end-to-end PSNR with ONE layer group quantized (all others in full precision),
    for the SegQuant baseline and full SegQuant: where the error comes from, and whether SegQuant's gains sit
    in the groups that dominate it."""
    groups: dict[str, set[str]] = {}
    for name in ref_io:
        groups.setdefault(group_of(name, fp.family), set()).add(name)
    out = {}
    for variant in ("baseline", "SegQuant"):
        base = copy.deepcopy(fp)

        def forward_loop(_model, den=base):
            sample(den, calib_labels, seed=1000, steps=args.steps, progress=False)

        base.model = quantize_variant(base.model, plan, model_name, "int8_w8a8", VARIANTS[variant], forward_loop)
        entries = {}
        for group, names in [("all", set(ref_io))] + sorted(groups.items()):
            den = copy.deepcopy(base)
            disable_quantizers(den.model, lambda name, _m, names=names: name in names)
            images = sample(den, labels, seed=0, steps=args.steps, progress=False)
            scores = score_images(images, fp_images, labels, classifier)
            sq = layer_sqnr(den.model, {n: ref_io[n] for n in names})
            entries[group] = {"layers": len(names), "flop_share": sum(flops[n] for n in names) / sum(flops.values()),
                              "psnr_db": float(scores.psnr[torch.isfinite(scores.psnr)].mean()),
                              "mse": float((((images + 1) / 2 - (fp_images + 1) / 2) ** 2).mean()),
                              "mean_layer_sqnr_db": sum(sq.values()) / len(sq)}
            print(f"budget {variant} {group}: PSNR {entries[group]['psnr_db']:.2f}", flush=True)
        out[variant] = entries
    return out


def _mean(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get(key) is not None and "error" not in r]
    if not vals:
        return None
    return sum(vals) / len(vals)


def _std(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get(key) is not None and "error" not in r]
    if len(vals) < 2:
        return None
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _f(v, d=2):
    return "-" if v is None else f"{v:.{d}f}"


def markdown(result: dict) -> str:
    lines = ["# Quality on the embedded MNIST models", "",
             "Every row of a model sees the same evaluation noise and, per calibration seed, the same calibration set. "
             "PSNR/SSIM against the full-precision samples; FID on the embedded classifier's 128-d features (vs FP "
             "samples and vs the MNIST test set); mean +- std over calibration seeds. 'other layers quantized' counts "
             "non-Linear modules with an enabled quantizer (ModelOpt presets also quantize LayerNorm and conv inputs).",
             *([f"Row names: {result['relabelled']}"] if result.get("relabelled") else []), ""]
    for model, mr in result["models"].items():
        s, env = mr["settings"], mr["environment"]
        lines += [f"## {model}", "", f"Command: `{env['command']}`. Device: {env['device']}, torch {env['torch']}. "
                  f"{s['num_samples']} images per run, {s['steps']} Euler steps, {s['calib_samples']} calibration "
                  f"images, {s['seeds']} calibration seeds."
                  + "".join(f" Rows added (same images and seeds, same device kind) by `{c}`."
                            for c in mr.get("added_by", [])), "", f"Plan: {mr['plan']}. Full precision: class accuracy "
                  f"{mr['fp']['class_accuracy']:.3f}, FID vs MNIST {_f(mr['fp'].get('fid_vs_mnist'))}.", "",
                  "| row | PSNR dB | SSIM | class acc | FID vs FP | FID vs MNIST | Linear FLOPs quantized | "
                  "other layers quantized | SQNR of SegQuant's layers dB |", "|---|---|---|---|---|---|---|---|---|"]
        for name, rr in mr["rows"].items():
            runs = rr["runs"]
            if runs and "error" in runs[-1]:
                lines.append(f"| {name} | failed: {runs[-1]['error'][:120]} | | | | | | | |")
                continue
            psd = _std(runs, "psnr_db")
            lines.append(f"| {name} | {_f(_mean(runs, 'psnr_db'))}{'' if psd is None else ' +- ' + _f(psd)} | "
                         f"{_f(_mean(runs, 'ssim'), 4)} | {_f(_mean(runs, 'class_accuracy'), 3)} | "
                         f"{_f(_mean(runs, 'fid_vs_fp'))} | {_f(_mean(runs, 'fid_vs_mnist'))} | "
                         f"{_f(100 * (_mean(runs, 'quantized_linear_flop_fraction') or 0), 1)}% | "
                         f"{_f(_mean(runs, 'quantized_other_layers'), 0)} | "
                         f"{_f(_mean(runs, 'mean_sqnr_db_changed_layers'))} |")
        lines += ["", "Paired differences (row - baseline) over (image, seed) pairs, 95% bootstrap interval; "
                  "**bold** = the interval excludes 0.", "",
                  "| row | vs | dPSNR dB | dSSIM | d class acc |", "|---|---|---|---|---|"]
        for e in mr["paired"]:
            cells = []
            for metric, d in (("psnr", 2), ("ssim", 4), ("correct", 3)):
                v = e[metric]
                text = f"{v['mean']:+.{d}f} [{v['low']:+.{d}f}, {v['high']:+.{d}f}]"
                cells.append(f"**{text}**" if v["significant"] else text)
            lines.append(f"| {e['row']} | {e['baseline']} | {' | '.join(cells)} |")
        if "error_budget" in mr:
            lines += ["", "Error budget (INT8 W8A8, seed 0): end-to-end PSNR with only one layer group quantized.", "",
                      "| group | layers | Linear FLOP share | PSNR baseline | PSNR SegQuant | layer SQNR baseline | "
                      "layer SQNR SegQuant |", "|---|---|---|---|---|---|---|"]
            b, q = mr["error_budget"]["baseline"], mr["error_budget"]["SegQuant"]
            for g in b:
                lines.append(f"| {g} | {b[g]['layers']} | {100 * b[g]['flop_share']:.1f}% | {_f(b[g]['psnr_db'])} | "
                             f"{_f(q[g]['psnr_db'])} | {_f(b[g]['mean_layer_sqnr_db'])} | "
                             f"{_f(q[g]['mean_layer_sqnr_db'])} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    models = list(result["models"])
    with figure(path, 1, len(models), figsize=(7 * len(models), 5), squeeze=False) as (_, axes):
        for ax, model in zip(axes[0], models):
            entries = result["models"][model]["paired"]
            for y, e in enumerate(entries):
                v = e["psnr"]
                color = "tab:green" if v["significant"] and v["mean"] > 0 else (
                    "tab:red" if v["significant"] else "tab:gray")
                ax.errorbar(v["mean"], y, xerr=[[v["mean"] - v["low"]], [v["high"] - v["mean"]]], fmt="o",
                            color=color, capsize=3)
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_yticks(range(len(entries)), [f"{e['row']} vs {e['baseline']}" for e in entries], fontsize=6)
            ax.set_xlabel("paired PSNR difference, dB (95% CI)")
            ax.set_title(model)
            ax.grid(alpha=0.3)


if __name__ == "__main__":
    main()
