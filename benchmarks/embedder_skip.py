"""Does keeping the embedders in high precision pay? The error budget (quality.md) shows mnist-flux's INT8
error coming mostly from its embedders (0.0% of the Linear FLOPs). This compares SegQuant INT8 W8A8 with every
Linear quantized against the same config with the embedders (``x_embedder``, ``context_embedder``,
``time_text_embed.*``) left in high precision: same noise, same calibration sets, paired intervals.

    python benchmarks/embedder_skip.py        # CPU, a few minutes; writes benchmarks/results/embedder_skip.{json,md}
"""

from __future__ import annotations

import copy
import time

import torch
from _common import (environment, environment_line, every_linear, model_recipe, modelopt_without_jit, parser,
                     quantize_segquant, write_results)

from segquant import analyze
from segquant.app.embedded import load_classifier, load_denoiser, sample, sample_labels
from segquant.app.evaluation import score_images
from segquant.app.metrics import paired_interval

EMBEDDERS = ("x_embedder", "context_embedder", "time_text_embed.*")
CONFIGS = {"every Linear": (), "embedders in high precision": EMBEDDERS}
"""Row label -> the layers the recipe keeps in high precision."""


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args(argv)
    modelopt_without_jit()

    start = time.time()
    fp = load_denoiser("mnist-flux")
    clf = load_classifier()
    plan = every_linear(analyze(fp.model, **fp.example_inputs(2)))
    labels, calib = sample_labels(args.num_samples), sample_labels(args.calib_samples)
    ref = sample(fp, labels, seed=0, steps=args.steps, progress=False)
    per = {label: [] for label in CONFIGS}
    for seed in range(args.seeds):
        for label, skip in CONFIGS.items():
            den = copy.deepcopy(fp)

            def loop(_m, den=den, seed=seed):
                sample(den, calib, seed=1000 + seed, steps=args.steps, progress=False)

            recipe = model_recipe("mnist-flux", "int8_w8a8", skip=skip)
            den.model = quantize_segquant(den.model, plan, recipe, loop)
            scores = score_images(sample(den, labels, seed=0, steps=args.steps, progress=False), ref, labels, clf)
            per[label].append(scores.psnr)
            print(f"seed {seed} {label}: PSNR {scores.psnr.mean():.2f}", flush=True)
    a, b = torch.cat(per["embedders in high precision"]), torch.cat(per["every Linear"])
    iv = paired_interval(a, b)
    result = {**environment(), "settings": vars(args),
              "psnr_db": {k: float(torch.cat(v).mean()) for k, v in per.items()},
              "paired_difference_db": {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n,
                                       "significant": iv.significant}, "seconds": time.time() - start}
    md = ["# Embedders in high precision (mnist-flux, SegQuant INT8 W8A8)", "",
          f"{environment_line(result)} {args.num_samples} images x {args.seeds} calibration seeds, {args.steps} Euler "
          f"steps, {args.calib_samples} calibration images. Embedders: {', '.join(EMBEDDERS)} (0.0% of the Linear "
          "FLOPs). Recipe: the bundled mnist-flux/int8_w8a8 with only these layers skipped.",
          "", "| config | PSNR vs FP (dB) |", "|---|---|"]
    md += [f"| {k} | {v:.2f} |" for k, v in result["psnr_db"].items()]
    md += ["", f"Paired difference (embedders in high precision - every Linear), (image, seed) pairs: "
           f"{iv.mean:+.2f} dB [{iv.low:+.2f}, {iv.high:+.2f}] (95% bootstrap, n={iv.n})"
           f"{', significant' if iv.significant else ', not significant'}.", ""]
    write_results(args.out, "embedder_skip", result, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
