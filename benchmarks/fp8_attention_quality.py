"""What FP8 (and INT8 Q K^T) attention costs in image fidelity, before any such kernel runs: the embedded
mnist-flux model with its attention through ``segquant.attention.fp8_attention`` (Q, K, V and P in e4m3, dynamic
per-head scales, K centred over the keys; float32 math with FP8 rounding), alone and on top of SegQuant's FP8
recipe.

Rows: full precision with FP8 attention; the FP8 recipe (ModelOpt fake quant, 5 calibration seeds); the same
quantized models with FP8 attention (as above; K not centred; P left in float; one scale per tensor) and with
SageAttention's numerics (INT8 Q and K with one scale per 64-token block, P V in FP8 or in float); and the
deployable option, ``segquant_modelopt.with_fp8_attention`` (ModelOpt's Q, K and V quantizers with one static
max-calibrated scale per tensor, calibrated with the recipe; P is TensorRT's to quantize, so it stays float in
PyTorch). PSNR against
the full-precision samples of the same noise; paired 95% bootstrap intervals over (image, seed) pairs. Results:
fp8_attention_quality.{json,md}.

    python benchmarks/fp8_attention_quality.py --num-samples 64 --seeds 5
"""

from __future__ import annotations

import copy
import time

import torch
from _common import environment, environment_line, every_linear, parser, write_results
from quality import RECIPE_SKIP, quantize_variant

from segquant import analyze
from segquant.app.embedded import load_classifier, load_denoiser, sample, sample_labels
from segquant.app.evaluation import score_images
from segquant.app.metrics import paired_interval
from segquant.attention import FP8AttentionSpec, fp8_attention_scope

MODEL = "mnist-flux"
ATTENTION = {"fp8 attention": FP8AttentionSpec(),
             "fp8 attention, K not centred": FP8AttentionSpec(center_k=False),
             "fp8 attention, P in float": FP8AttentionSpec(quantize_p=False),
             "fp8 attention, per-tensor scales": FP8AttentionSpec(granularity="per_tensor"),
             "int8 QK per-block, fp8 PV": FP8AttentionSpec(qk_format="int8", granularity="per_block"),
             "int8 QK per-block, PV in float": FP8AttentionSpec(qk_format="int8", granularity="per_block",
                                                              v_format=None)}
MODELOPT_ROW = "fp8 recipe + ModelOpt fp8 attention (static per-tensor Q, K, V)"
COMPARISONS = (("fp8 recipe + fp8 attention", "fp8 recipe"),
               ("fp8 recipe + fp8 attention", "fp8 recipe + fp8 attention, K not centred"),
               ("fp8 recipe + fp8 attention, P in float", "fp8 recipe + fp8 attention"),
               ("fp8 recipe + fp8 attention", "fp8 recipe + fp8 attention, per-tensor scales"),
               ("fp8 recipe + fp8 attention", "full precision + fp8 attention"),
               ("fp8 recipe + int8 QK per-block, fp8 PV", "fp8 recipe"),
               ("fp8 recipe + int8 QK per-block, PV in float", "fp8 recipe"),
               (MODELOPT_ROW, "fp8 recipe"),
               (MODELOPT_ROW, "fp8 recipe + fp8 attention, P in float"))
"""(row, compared with), each a paired PSNR interval."""


def run(num_samples: int, calib_samples: int, seeds: int, steps: int, device: str) -> dict:
    fp = load_denoiser(MODEL, device)
    classifier = load_classifier(device)
    labels, calib_labels = sample_labels(num_samples), sample_labels(calib_samples)
    plan = every_linear(analyze(fp.model, **fp.example_inputs(2)))
    fp_images = sample(fp, labels, seed=0, steps=steps, progress=False)
    psnr: dict[str, list[torch.Tensor]] = {}

    def score(name: str, images: torch.Tensor) -> None:
        psnr.setdefault(name, []).append(score_images(images, fp_images, labels, classifier).psnr)

    with fp8_attention_scope(fp.model, ATTENTION["fp8 attention"]):
        score("full precision + fp8 attention", sample(fp, labels, seed=0, steps=steps, progress=False))
    for seed in range(seeds):
        start = time.time()
        den = copy.deepcopy(fp)

        def forward_loop(_model, den=den, seed=seed):
            sample(den, calib_labels, seed=1000 + seed, steps=steps, progress=False)

        den.model = quantize_variant(den.model, plan, MODEL, "fp8", {RECIPE_SKIP: True}, forward_loop)
        score("fp8 recipe", sample(den, labels, seed=0, steps=steps, progress=False))
        for name, spec in ATTENTION.items():
            with fp8_attention_scope(den.model, spec):
                score(f"fp8 recipe + {name}", sample(den, labels, seed=0, steps=steps, progress=False))
        static = copy.deepcopy(fp)

        def static_loop(_model, den=static, seed=seed):
            sample(den, calib_labels, seed=1000 + seed, steps=steps, progress=False)

        static.model = quantize_variant(static.model, plan, MODEL, "fp8", {RECIPE_SKIP: True}, static_loop,
                                        fp8_attention=True)
        calibrated = [m for m in static.model.modules() if getattr(getattr(m, "q_bmm_quantizer", None), "amax", None)
                      is not None]
        if not calibrated:  # the row would silently be the recipe's
            raise SystemExit("ModelOpt attached no calibrated attention quantizer to mnist-flux")
        score(MODELOPT_ROW, sample(static, labels, seed=0, steps=steps, progress=False))
        print(f"seed {seed}: {time.time() - start:.0f} s", flush=True)
    rows = {name: {"psnr_db_mean": float(torch.cat(v).mean()), "runs": len(v)} for name, v in psnr.items()}
    pairs = []
    for name, other in COMPARISONS:
        runs = len(psnr[name])
        # a row without calibration (full precision) ran once: its images pair with every seed's
        base = psnr[other] * runs if len(psnr[other]) == 1 else psnr[other]
        iv = paired_interval(torch.cat(psnr[name]), torch.cat(base))
        pairs.append({"row": name, "baseline": other, "mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n})
    return {"model": MODEL, "settings": dict(num_samples=num_samples, calib_samples=calib_samples, seeds=seeds,
                                             steps=steps, device=device),
            "spec": {name: vars(spec) for name, spec in ATTENTION.items()}, "rows": rows, "paired": pairs}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["# FP8 attention on mnist-flux (reference numerics)", "",
             f"{s['num_samples']} images, {s['steps']} Euler steps, {s['seeds']} calibration seeds of "
             f"{s['calib_samples']} images for the FP8 recipe (ModelOpt fake quant). FP8 attention: Q, K, V and the "
             "softmax probabilities in e4m3, dynamic per-head scales (`segquant.attention`; float32 math with FP8 "
             "rounding, not a kernel), unless the row says ModelOpt: its Q, K and V quantizers with one static "
             "max-calibrated scale each (`segquant_modelopt.with_fp8_attention`, P left to TensorRT). PSNR against "
             "the full-precision samples of the same noise.",
             environment_line(result["environment"]), "",
             "| row | PSNR dB (mean over images and seeds) | runs |", "|---|---|---|"]
    lines += [f"| {name} | {r['psnr_db_mean']:.2f} | {r['runs']} |" for name, r in result["rows"].items()]
    lines += ["", "Paired differences (row - compared with), 95% bootstrap interval over (image, seed) pairs:", "",
              "| row | compared with | dPSNR dB | n |", "|---|---|---|---|"]
    for p in result["paired"]:
        sig = p["low"] > 0 or p["high"] < 0
        text = f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}]"
        lines.append(f"| {p['row']} | {p['baseline']} | {'**' + text + '**' if sig else text} | {p['n']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.num_samples < 2 or args.seeds < 1:
        p.error("--num-samples must be >= 2 and --seeds >= 1")
    result = run(args.num_samples, args.calib_samples, args.seeds, args.steps, args.device)
    result["environment"] = environment(args.device)
    write_results(args.out, "fp8_attention_quality", result, markdown(result))


if __name__ == "__main__":
    main()
