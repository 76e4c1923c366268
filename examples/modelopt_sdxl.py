"""Quantize SDXL base 1.0's UNet with SegQuant through NVIDIA ModelOpt (default: INT8 W8A8, mto checkpoint).

    python examples/modelopt_sdxl.py --out sdxl_segquant      # --help for the options
"""

from segquant.app.example import run_example

MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
PROMPT = "A bowl of ramen on a wooden table, steam rising."


def main(argv: list[str] | None = None):
    return run_example(__doc__, MODEL, backend="modelopt", precision="int8_w8a8", prompt=PROMPT, argv=argv)


if __name__ == "__main__":
    main()
