"""Quantize FLUX.1-dev's transformer with SegQuant through NVIDIA ModelOpt (default: INT8 W8A8, mto checkpoint).

    python examples/modelopt_flux.py --out flux_segquant      # --help for the options
"""

from segquant.app.example import run_example

MODEL = "black-forest-labs/FLUX.1-dev"
PROMPT = "A red fox standing in fresh snow at dawn."


def main(argv: list[str] | None = None):
    return run_example(__doc__, MODEL, backend="modelopt", precision="int8_w8a8", prompt=PROMPT, argv=argv)


if __name__ == "__main__":
    main()
