"""Quantize Sana 1600M's transformer with SegQuant through torchao (default: FP8 e4m3 static, torch._scaled_mm).

    python examples/torchao_sana.py --out sana_segquant      # --help for the options
"""

from segquant.app.example import run_example

MODEL = "Efficient-Large-Model/Sana_1600M_1024px_diffusers"
PROMPT = "A cozy cabin in the mountains under a starry sky."


def main(argv: list[str] | None = None):
    return run_example(__doc__, MODEL, backend="torchao", precision="fp8", prompt=PROMPT, argv=argv)


if __name__ == "__main__":
    main()
