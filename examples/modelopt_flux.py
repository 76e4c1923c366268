"""Quantize FLUX.1-dev's transformer with SegQuant through NVIDIA ModelOpt, save it, export ONNX.

    python examples/modelopt_flux.py --model black-forest-labs/FLUX.1-dev --prompts prompts.txt --out flux_sq
    python examples/modelopt_flux.py --tiny --out /tmp/flux_sq        # tiny random FLUX, no download

The real path loads the pipeline with diffusers, calibrates on the prompts (denoiser inputs of every
sampling step), quantizes with ``mtq.quantize(transformer, SEGQUANT_CFG, forward_loop)``, saves with
``mto.save`` and exports the transformer to ONNX. ``--tiny`` runs the same quantize/save/export code on a
tiny random FluxTransformer2DModel calibrated on random denoiser inputs.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

import modelopt.torch.opt as mto
import modelopt.torch.quantization as mtq

import segquant
import segquant_modelopt
from segquant_modelopt.export import export_onnx



def quantize_and_save(transformer, forward_loop, out: Path, onnx: bool):
    """mtq.quantize with SegQuant, mto.save, optional ONNX export; returns the quantized transformer."""
    captured = {}

    def keep_first_inputs(module, args, kwargs) -> None:  # example inputs for the ONNX export
        if "kwargs" not in captured:
            captured["kwargs"] = dict(kwargs)

    handle = transformer.register_forward_pre_hook(keep_first_inputs, with_kwargs=True)
    try:
        transformer = mtq.quantize(transformer, segquant_modelopt.SEGQUANT_CFG, forward_loop)
    finally:
        handle.remove()
    print(segquant_modelopt.plan_of(transformer))
    out.mkdir(parents=True, exist_ok=True)
    mto.save(transformer, out / "transformer_segquant.pth")
    print(f"saved {out / 'transformer_segquant.pth'} (restore: import segquant_modelopt; mto.restore(model, path))")
    if onnx:
        example_inputs = captured["kwargs"]
        path = export_onnx(transformer, example_inputs, out / "transformer_segquant.onnx")
        print(f"exported {path}")
    return transformer


def run_tiny(out: Path, onnx: bool) -> None:
    import json

    from diffusers import FluxTransformer2DModel
    from segquant.cli import bundled_configs

    torch.manual_seed(0)
    config = json.loads(bundled_configs()["tiny-flux"].read_text())
    transformer = FluxTransformer2DModel.from_config(config).eval()
    batches = []
    for seed in range(4):
        torch.manual_seed(seed)
        batches.append(segquant.example_inputs(transformer))

    def forward_loop(model):
        for batch in batches:
            model(**batch)

    reference = copy.deepcopy(transformer)  # tiny: affordable, and shows what quantization costs
    quantized = quantize_and_save(transformer, forward_loop, out, onnx)
    with torch.no_grad():
        sqnr = segquant.numerics.sqnr_db(reference(**batches[0])[0], quantized(**batches[0])[0])
    print(f"denoiser output SQNR vs full precision on one calibration input: {sqnr:.1f} dB")


def run_pipeline(model_id: str, prompts_file: Path, out: Path, onnx: bool, steps: int, device: str) -> None:
    from diffusers import FluxPipeline

    prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        sys.exit(f"{prompts_file} holds no prompts")
    pipe = FluxPipeline.from_pretrained(model_id, torch_dtype=torch.bfloat16).to(device)

    def forward_loop(transformer):
        for prompt in prompts:
            pipe(prompt, num_inference_steps=steps, height=1024, width=1024, guidance_scale=3.5,
                 generator=torch.Generator(device).manual_seed(0))

    quantize_and_save(pipe.transformer, forward_loop, out, onnx)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="black-forest-labs/FLUX.1-dev", help="hub id or local folder")
    parser.add_argument("--prompts", type=Path, help="calibration prompts, one per line")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per calibration prompt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("flux_segquant"))
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    parser.add_argument("--tiny", action="store_true", help="tiny random FLUX transformer, no download")
    args = parser.parse_args(argv)
    if args.tiny:
        run_tiny(args.out, not args.no_onnx)
    else:
        if args.prompts is None:
            parser.error("--prompts is required unless --tiny")
        run_pipeline(args.model, args.prompts, args.out, not args.no_onnx, args.steps, args.device)


if __name__ == "__main__":
    main()
