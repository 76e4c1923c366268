"""Quantize SD 3.5 Medium's transformer with SegQuant through torchao (default: FP8 e4m3 static, torch._scaled_mm).

    python examples/torchao_sd3.py --out sd3_segquant      # --help for the options
"""

from segquant.app.example import run_example

MODEL = "stabilityai/stable-diffusion-3.5-medium"
PROMPT = "A lighthouse on a rocky cliff above crashing waves."


def main(argv: list[str] | None = None):
    return run_example(__doc__, MODEL, backend="torchao", precision="fp8", prompt=PROMPT, argv=argv)


if __name__ == "__main__":
    main()
