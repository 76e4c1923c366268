"""Quantize SDXL base 1.0's UNet with SegQuant through torchao (default: FP8 e4m3 static, torch._scaled_mm).

    python examples/torchao_sdxl.py --out sdxl_segquant      # --help for the options
"""

from segquant.app.example import run_example

MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
PROMPT = "A bowl of ramen on a wooden table, steam rising."


def main(argv: list[str] | None = None):
    return run_example(__doc__, MODEL, backend="torchao", precision="fp8", prompt=PROMPT, argv=argv)


if __name__ == "__main__":
    main()
