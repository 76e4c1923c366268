"""Quantize SD 3.5 Medium's transformer with SegQuant through NVIDIA ModelOpt (default: INT8 W8A8, mto checkpoint).

    python examples/modelopt_sd3.py --out sd3_segquant      # --help for the options
"""

from segquant.app.example import run_example

MODEL = "stabilityai/stable-diffusion-3.5-medium"
PROMPT = "A lighthouse on a rocky cliff above crashing waves."


def main(argv: list[str] | None = None):
    return run_example(__doc__, MODEL, backend="modelopt", precision="int8_w8a8", prompt=PROMPT, argv=argv)


if __name__ == "__main__":
    main()
