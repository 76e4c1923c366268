"""Does keeping the embedders in high precision pay? The error budget (quality.md) shows mnist-flux's INT8
error coming mostly from its embedders (0.0% of the Linear FLOPs). This compares SegQuant INT8 W8A8 with every
Linear quantized against the same config with the embedders (``x_embedder``, ``context_embedder``,
``time_text_embed.*``) left in high precision: same noise, same calibration sets, paired intervals.

    python benchmarks/embedder_skip.py        # CPU, a few minutes; writes benchmarks/results/embedder_skip.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from quality import modelopt, segquant_config  # noqa: E402

from segquant import analyze  # noqa: E402
from segquant.embedded import load_classifier, load_denoiser, sample, sample_labels  # noqa: E402
from segquant.evaluation import score_images  # noqa: E402
from segquant.metrics import paired_interval  # noqa: E402

EMBEDDERS = ["x_embedder.*", "context_embedder.*", "time_text_embed.*"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    import segquant_modelopt  # noqa: F401

    start = time.time()
    fp = load_denoiser("mnist-flux")
    clf = load_classifier()
    plan = analyze(fp.model, **fp.example_inputs(2)).to_dict()
    labels, calib = sample_labels(args.num_samples), sample_labels(args.calib_samples)
    ref = sample(fp, labels, seed=0, steps=args.steps, progress=False)
    per = {"every Linear": [], "embedders in high precision": []}
    for seed in range(args.seeds):
        for label in per:
            den = copy.deepcopy(fp)
            cfg = segquant_config("int8_w8a8", True, True, plan)
            if label != "every Linear":
                cfg["quant_cfg"] += [{"quantizer_name": g, "enable": False} for g in EMBEDDERS]

            def loop(_m, den=den, seed=seed):
                sample(den, calib, seed=1000 + seed, steps=args.steps, progress=False)

            den.model = modelopt().quantize(den.model, cfg, loop)
            scores = score_images(sample(den, labels, seed=0, steps=args.steps, progress=False), ref, labels, clf)
            per[label].append(scores.psnr)
            print(f"seed {seed} {label}: PSNR {scores.psnr.mean():.2f}", flush=True)
    a, b = torch.cat(per["embedders in high precision"]), torch.cat(per["every Linear"])
    iv = paired_interval(a, b)
    result = {"command": "python " + " ".join(sys.argv), "device": platform.processor() or "cpu",
              "torch": torch.__version__, "settings": vars(args),
              "psnr_db": {k: float(torch.cat(v).mean()) for k, v in per.items()},
              "paired_difference_db": {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n,
                                       "significant": iv.significant}, "seconds": time.time() - start}
    out = Path(args.out)
    (out / "embedder_skip.json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["# Embedders in high precision (mnist-flux, SegQuant INT8 W8A8)", "",
          f"Command: `{result['command']}`. Device: {result['device']}, torch {result['torch']}. "
          f"{args.num_samples} images x {args.seeds} calibration seeds, {args.steps} Euler steps, "
          f"{args.calib_samples} calibration images. Embedders: {', '.join(EMBEDDERS)} (0.0% of the Linear FLOPs).",
          "", "| config | PSNR vs FP (dB) |", "|---|---|"]
    md += [f"| {k} | {v:.2f} |" for k, v in result["psnr_db"].items()]
    md += ["", f"Paired difference (embedders in high precision - every Linear), (image, seed) pairs: "
           f"{iv.mean:+.2f} dB [{iv.low:+.2f}, {iv.high:+.2f}] (95% bootstrap, n={iv.n})"
           f"{', significant' if iv.significant else ', not significant'}.", ""]
    (out / "embedder_skip.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
