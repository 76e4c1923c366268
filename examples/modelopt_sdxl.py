"""Quantize SDXL base 1.0's UNet with SegQuant through NVIDIA ModelOpt:
The paper's INT8 W8A8 (ModelOpt fake quantization, mto checkpoint).

stabilityai/stable-diffusion-xl-base-1.0 by default, from the Hugging Face cache or a local folder (--model):

    python examples/modelopt_sdxl.py --out sdxl_segquant
    python examples/modelopt_sdxl.py --model /path/to/pipeline --out sdxl_segquant --precision fp8 --onnx

Loads the pipeline with diffusers (local files only when HF_HUB_OFFLINE is set), calibrates on the bundled
COCO-style prompts with the recipe's steps, guidance and size, quantizes, saves a checkpoint, loads it back
into a fresh pipeline and writes one sample image. The tests run this script on a tiny random pipeline.
"""

from __future__ import annotations

import argparse

import torch

from segquant.pipelines import call_kwargs
from segquant.quantize_job import add_job_arguments, job_from_args, load_quantized, quantize_pipeline

PROMPT = "A bowl of ramen on a wooden table, steam rising."


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser, model="stabilityai/stable-diffusion-xl-base-1.0", backend="modelopt")
    parser.set_defaults(precision="int8_w8a8")
    args = parser.parse_args(argv)

    result = quantize_pipeline(job_from_args(args))  # load, calibrate, quantize, save to args.out
    print(f"{result.recipe.name} (modelopt): {result.plan.summary()}")

    pipe = load_quantized(args.out, device=args.device)  # what a user does later, in a fresh process
    generator = torch.Generator(args.device).manual_seed(0)
    image = pipe(PROMPT, generator=generator, **call_kwargs(pipe, result.calibration)).images[0]
    image.save(args.out / "sample.png")
    print(f"wrote {args.out / 'sample.png'}")
    return result, pipe


if __name__ == "__main__":
    main()
