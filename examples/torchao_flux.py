"""Quantize FLUX.1-dev's transformer with SegQuant through torchao (default: FP8 e4m3 static, torch._scaled_mm).

    python examples/torchao_flux.py --out flux_segquant      # --help for the options
"""

from segquant.app.example import run_example

MODEL = "black-forest-labs/FLUX.1-dev"
PROMPT = "A red fox standing in fresh snow at dawn."


def main(argv: list[str] | None = None):
    return run_example(__doc__, MODEL, backend="torchao", precision="fp8", prompt=PROMPT, argv=argv)


if __name__ == "__main__":
    main()
