"""Quantize Sana 1600M's transformer with SegQuant through NVIDIA ModelOpt (default: INT8 W8A8, mto checkpoint).

    python examples/modelopt_sana.py --out sana_segquant      # --help for the options
"""

from segquant.app.example import run_example

MODEL = "Efficient-Large-Model/Sana_1600M_1024px_diffusers"
PROMPT = "A cozy cabin in the mountains under a starry sky."


def main(argv: list[str] | None = None):
    return run_example(__doc__, MODEL, backend="modelopt", precision="int8_w8a8", prompt=PROMPT, argv=argv)


if __name__ == "__main__":
    main()
