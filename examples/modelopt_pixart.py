"""Quantize PixArt-Sigma's transformer with SegQuant through NVIDIA ModelOpt (default: INT8 W8A8, mto checkpoint).

    python examples/modelopt_pixart.py --out pixart_segquant      # --help for the options
"""

from segquant.app.example import run_example

MODEL = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
PROMPT = "An astronaut riding a horse across a desert."


def main(argv: list[str] | None = None):
    return run_example(__doc__, MODEL, backend="modelopt", precision="int8_w8a8", prompt=PROMPT, argv=argv)


if __name__ == "__main__":
    main()
