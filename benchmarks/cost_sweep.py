"""Cost-aware plans on the embedded FLUX model: per-layer SQNR gain of DualScale and input segments on
calibration data, their extra GEMM time, and the speed/quality curve over the selection threshold.

    python benchmarks/cost_sweep.py            # CPU, ~1 minute; writes benchmarks/results/cost_sweep.{json,md,png}

Costs: the FLOP model of ``segquant.cost.CostModel`` with the naive (M-doubled) DualScale GEMM, scaled by the
measured H100 ratio (kernel_bench.md: a fully DualScale FP8 GEMM takes 2.6-2.8x a plain one, so each
DualScale layer costs ``measured_dual_extra`` x its plain GEMM time instead of the FLOP model's 1x).
Gains are per-layer SQNR on the layer's own calibration inputs (the proxy the selection uses); the end-to-end
effect of DualScale on this model is in quality.md.
"""

from __future__ import annotations

import time
from pathlib import Path

from _common import environment, environment_line, figure, parser, write_results

from segquant import analyze
from segquant.app.embedded import load_denoiser, sample, sample_labels
from segquant.cost import CostModel, capture_linear_inputs, layer_gains, sweep
from segquant.numerics import QuantSpec

THRESHOLDS = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
MEASURED_DUAL_EXTRA = 1.7  # kernel_bench.md, H100: fp8_dual_naive_2M / fp8 = 2.6-2.8 -> extra 1.6-1.8


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="mnist-flux")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args(argv)
    start = time.time()
    den = load_denoiser(args.model)
    plan = analyze(den.model, **den.example_inputs(2))
    batches = []  # the denoiser's calls while sampling: the calibration batches
    hook = den.model.register_forward_pre_hook(lambda m, a, kw: batches.append(dict(kw)), with_kwargs=True)
    try:
        sample(den, sample_labels(args.calib_samples), seed=1000, steps=args.steps, progress=False)
    finally:
        hook.remove()
    rows: dict[str, int] = {}
    inputs = capture_linear_inputs(den.model, batches, names=[n for n, lp in plan.layers.items() if not lp.is_plain],
                                   rows=rows)
    result = {"model": args.model, "plan": plan.summary(), **environment(), "formats": {}}
    for fmt in ("int8", "fp8"):
        spec = QuantSpec(weight_format=fmt, weight_granularity="per_channel", act_format=fmt)
        gains = layer_gains(den.model, plan, inputs, spec, tokens=rows)
        measured = {n: (MEASURED_DUAL_EXTRA * len(lp.dual_scale_segments), 0.0)
                    for n, lp in plan.layers.items() if lp.dual_scale}
        curves = {}
        for label, cost in (("FLOP model (naive, folded)", CostModel(kernel="naive", realisation="folded")),
                            ("measured H100 naive DualScale", CostModel(kernel="naive", realisation="folded",
                                                                                      measured=measured))):
            curves[label] = [vars(pt) for pt in sweep(plan, gains, cost, THRESHOLDS)]
        result["formats"][fmt] = {
            "gains": {n: vars(g) for n, g in gains.items()}, "curves": curves,
            "dual_gain_db_sum": sum(g.dual_gain_db for g in gains.values()),
            "seg_gain_db_sum": sum(g.seg_gain_db for g in gains.values())}
    result["seconds"] = time.time() - start
    write_results(args.out, "cost_sweep", result, markdown(result))
    plot(result, args.out / "cost_sweep.png")
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = ["# Cost-aware plans on the embedded FLUX model", "",
             f"{environment_line(r)} Plan: {r['plan']}. "
             "Gain = per-layer SQNR gain (dB) on calibration inputs, summed over the layers that keep the feature; "
             "extra time = share of the model's plain quantized GEMM time the kept features add.", ""]
    for fmt, f in r["formats"].items():
        lines += [f"## {fmt.upper()} (weights per channel, static per-tensor activations)", "",
                  f"All features: DualScale gains {f['dual_gain_db_sum']:.1f} dB summed over layers, segments "
                  f"{f['seg_gain_db_sum']:.1f} dB.", "",
                  "| cost model | threshold (dB per % time) | DualScale layers | segmented layers | gain dB | extra GEMM time |",
                  "|---|---|---|---|---|---|"]
        for label, pts in f["curves"].items():
            for pt in pts:
                lines.append(f"| {label} | {pt['threshold']} | {pt['dual_layers']} | {pt['segmented_layers']} | "
                             f"{pt['gain_db']:.1f} | {100 * pt['extra_time']:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    with figure(path, figsize=(7, 4.5)) as (_, ax):
        for fmt, f in r["formats"].items():
            for (label, pts), style in zip(f["curves"].items(), ("-o", "--s")):
                ax.plot([100 * p["extra_time"] for p in pts], [p["gain_db"] for p in pts], style, markersize=4,
                        label=f"{fmt}: {label}")
        ax.set_xlabel("extra GEMM time of the kept features, % of the quantized model")
        ax.set_ylabel("summed per-layer SQNR gain, dB")
        ax.set_title(f"{r['model']}: threshold sweep ({THRESHOLDS[0]}..{THRESHOLDS[-1]} dB per %)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
