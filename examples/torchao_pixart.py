"""Quantize PixArt-Sigma's transformer with SegQuant through torchao (default: FP8 e4m3 static, torch._scaled_mm).

    python examples/torchao_pixart.py --out pixart_segquant      # --help for the options
"""

from segquant.app.example import run_example

MODEL = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
PROMPT = "An astronaut riding a horse across a desert."


def main(argv: list[str] | None = None):
    return run_example(__doc__, MODEL, backend="torchao", precision="fp8", prompt=PROMPT, argv=argv)


if __name__ == "__main__":
    main()
