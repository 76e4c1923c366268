"""The body every ``examples/<backend>_<family>.py`` script shares: quantize a diffusers pipeline with a backend
(``quantize_pipeline``), load the checkpoint back as a user would later (``load_quantized``) and sample one image.

Example (an example script's whole ``main``):
    >>> def main(argv=None):
    ...     return run_example(__doc__, model="black-forest-labs/FLUX.1-dev", backend="modelopt",
    ...                        precision="int8_w8a8", prompt="A red fox standing in fresh snow at dawn.", argv=argv)
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from .pipelines import call_kwargs
from .quantize_job import QuantizeResult, add_job_arguments, job_from_args, load_quantized, quantize_pipeline

HOW_IT_RUNS = """\
Loads the pipeline with diffusers, from the Hugging Face cache or a local folder (--model; local files only when
HF_HUB_OFFLINE is set), calibrates on the bundled COCO-style prompts with the recipe's steps, guidance and size,
quantizes, saves a checkpoint to --out, loads it back into a fresh pipeline and writes one sample image
(--out/sample.png). --model, --precision and --backend change the defaults; the tests run every example on a
tiny random pipeline."""


def run_example(description: str, model: str, backend: str, precision: str, prompt: str,
                argv: list[str] | None = None) -> tuple[QuantizeResult, Any]:
    """Parse ``argv`` with the ``segquant quantize`` arguments, quantize and save, reload and sample ``prompt``.

    Args:
        description: the example's docstring (the first part of ``--help``).
        model: default ``--model`` (a hub id).
        backend: default ``--backend`` (a name of ``segquant.backend_names()``).
        precision: default ``--precision``.
        prompt: what the sample image shows.
        argv: command-line arguments; default ``sys.argv[1:]``.
    Returns:
        the ``QuantizeResult`` of the quantization and the pipeline loaded back from ``--out``.
    """
    parser = argparse.ArgumentParser(description=f"{description.strip()}\n\n{HOW_IT_RUNS}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser, model=model, backend=backend, precision=precision)
    args = parser.parse_args(argv)

    result = quantize_pipeline(job_from_args(args))  # load, calibrate, quantize, save to args.out
    print(f"{result.recipe.name} ({args.backend}): {result.plan.summary()}")

    pipe = load_quantized(args.out, device=args.device)  # what a user does later, in a fresh process
    generator = torch.Generator(args.device).manual_seed(0)
    image = pipe(prompt, generator=generator, **call_kwargs(pipe, result.calibration)).images[0]
    image.save(args.out / "sample.png")
    print(f"wrote {args.out / 'sample.png'}")
    return result, pipe
