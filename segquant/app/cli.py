"""The ``segquant`` command line. ``segquant analyze`` writes the plan of a diffusers denoiser."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from segquant import PRECISIONS, SegQuantError, backend_names
from segquant.model_configs import bundled_configs

from .pipelines import MAX_REPEATS, MAX_WIDTH, check_config_size, read_json_object
from .quantize_job import DEFAULT_BACKEND

DEFAULT_MODEL = "tiny-flux"
"""The bundled tiny model that ``segquant analyze`` uses without arguments."""


def _read_config(args: argparse.Namespace) -> tuple[str, dict[str, Any], str]:
    if args.model_dir is not None:
        folder = Path(args.model_dir)
        for sub in ("", "transformer", "unet"):
            path = folder / sub / "config.json"
            if path.is_file():
                break
        else:
            raise SegQuantError(f"{folder}: no config.json in the folder or its transformer/ or unet/ "
                                "subfolder; pass a diffusers model folder or --config")
    elif args.config is not None:
        path = Path(args.config)
        if not path.exists():
            raise SegQuantError(f"config file {path} does not exist")
        if not path.is_file():  # a folder, a FIFO or a device would block or fail in read_text
            raise SegQuantError(f"config {path} is not a regular file; pass a diffusers config.json")
    else:
        configs = bundled_configs()
        if args.model not in configs:
            raise SegQuantError(f"unknown bundled model {args.model!r}; bundled: {', '.join(sorted(configs))}")
        path = configs[args.model]
    config = read_json_object(path, "a diffusers config")
    check_config_size(config, str(path), args.allow_large)
    model_class = args.model_class or config.get("_class_name")
    if not model_class:
        raise SegQuantError(f"{path} has no _class_name; pass --model-class (e.g. FluxTransformer2DModel)")
    return model_class, config, str(path)


def check_json_target(path: Path) -> None:
    """``--json`` is checked before the analysis runs."""
    if path.is_dir():
        raise SegQuantError(f"--json {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise SegQuantError(f"--json {path}: the folder {path.parent} does not exist")


def _build_on_meta(model_class: str, config: dict[str, Any]):
    import torch

    try:
        import diffusers
    except ImportError:
        raise SegQuantError("segquant analyze needs diffusers: pip install 'segquant[diffusers]'") from None
    from segquant.inputs import supported_models

    cls = getattr(diffusers, model_class, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise SegQuantError(f"{model_class} is not a diffusers model class; supported denoisers: "
                            f"{', '.join(supported_models())}")
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except Exception as e:  # noqa: BLE001 - any config error is bad user input here
        raise SegQuantError(f"could not build {model_class} from the config: {type(e).__name__}: {e}") from None


def cmd_analyze(args: argparse.Namespace) -> int:
    from segquant.graph import AnalysisOptions, analyze
    from segquant.inputs import example_inputs
    from segquant.plan import format_table

    if args.json:
        check_json_target(Path(args.json))
    model_class, config, source = _read_config(args)
    start = time.perf_counter()
    model = _build_on_meta(model_class, config)
    options = AnalysisOptions(capture=args.capture, head_segments=args.head_segments)
    plan = analyze(model, analysis_options=options, **example_inputs(model))
    seconds = time.perf_counter() - start
    if not args.quiet:
        print(format_table(plan, only_changed=not args.all_layers))
        print(f"analysed {model_class} from {source} on meta in {seconds:.1f} s")
    if args.json:
        plan.save(args.json)
        if not args.quiet:
            print(f"wrote {args.json}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize_job import job_from_args, quantize_pipeline

    result = quantize_pipeline(job_from_args(args))
    print(result.plan)  # the applied plan: what the backend quantized
    print(f"quantized {args.model} with {result.recipe.name} ({args.backend}); plan: {result.plan.summary()}")
    for path in result.files:
        print(f"wrote {path}")
    print(f"load: segquant.app.load_quantized({str(args.out)!r})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run_job import RunSettings, run

    settings = RunSettings(model=args.model, backend=args.backend, recipe=args.recipe, num_samples=args.num_samples,
                           calib_samples=args.calib_samples, steps=args.steps, out=args.out, device=args.device,
                           seed=args.seed, progress=not args.quiet, overwrite=args.overwrite)
    metrics = run(settings)
    if not args.quiet:
        for label, row in metrics["rows"].items():
            print(f"{label:60s} PSNR {row['psnr_db']:6.2f} dB  SSIM {row['ssim']:.4f}  "
                  f"class accuracy {row['class_accuracy']:.3f}")
        print(f"report: {Path(args.out) / 'report.md'} (grid.png, layers.png, metrics.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segquant", description="SegQuant: segment-aware, dual-scale "
                                     "post-training quantization for diffusion models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the analysis does")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="write the SegQuant plan of a diffusers denoiser (built on meta)",
                       description="Build the model on the meta device (no weights), trace it and write "
                       "the plan. Without --config/--model-dir the bundled tiny FLUX model is analysed.")
    p.add_argument("--model-class", help="diffusers class name, e.g. FluxTransformer2DModel "
                   "(default: the config's _class_name)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="a diffusers config.json")
    src.add_argument("--model-dir", help="a diffusers model or pipeline folder (reads its config.json)")
    src.add_argument("--model", default=DEFAULT_MODEL, help=f"a bundled model (default {DEFAULT_MODEL})")
    p.add_argument("--json", help="write the plan to this JSON file")
    p.add_argument("--allow-large", action="store_true",
                   help=f"analyse configs beyond {MAX_REPEATS} blocks or width {MAX_WIDTH} (slow)")
    p.add_argument("--capture", choices=("auto", "export", "eager"), default="auto",
                   help="graph capture: torch.export with eager fallback (default), or one of them")
    p.add_argument("--head-segments", action="store_true",
                   help="one input segment per attention head before output projections")
    p.add_argument("--all-layers", action="store_true", help="list plain layers too")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=cmd_analyze)
    from .quantize_job import add_job_arguments

    q = sub.add_parser("quantize", help="quantize a diffusers pipeline's denoiser with a recipe and save it",
                       description="Load the pipeline (local files only when HF_HUB_OFFLINE is set), calibrate "
                       "on a prompt file, quantize the denoiser with the backend and recipe, save a checkpoint "
                       "that segquant.app.load_quantized loads back, optionally export ONNX.")
    add_job_arguments(q)
    q.set_defaults(func=cmd_quantize)

    r = sub.add_parser("run", help="the main job: quantize an embedded MNIST model with SegQuant and the "
                       "backend's preset, and write a report", description="Quantize an embedded model (or a "
                       "folder in its layout) with the backend's own preset and with SegQuant, sample every row "
                       "from the same noise and write metrics.json, report.md, grid.png and layers.png.")
    r.add_argument("--model", default="mnist-flux", help="mnist-flux (default), mnist-unet, or a folder written "
                   "by examples/train_mnist_models.py")
    r.add_argument("--backend", default=DEFAULT_BACKEND, choices=backend_names(), help=f"default {DEFAULT_BACKEND}")
    r.add_argument("--recipe", default="int8_w8a8", help=f"a precision ({', '.join(PRECISIONS)}), a "
                   "bundled recipe name (mnist-flux/fp8) or a recipe file")
    r.add_argument("--num-samples", type=int, default=8, help="images per row (default 8)")
    r.add_argument("--calib-samples", type=int, help="calibration images (default: the recipe's)")
    r.add_argument("--steps", type=int, help="Euler steps (default: the recipe's)")
    r.add_argument("--out", default="segquant-run", help="report folder (default ./segquant-run)")
    r.add_argument("--device", default="cpu", help="torch device (default cpu)")
    r.add_argument("--seed", type=int, default=0, help="noise seed of the evaluated images")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that is not an earlier "
                   "segquant run report")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars, print nothing")
    r.set_defaults(func=cmd_run)
    return parser


@contextlib.contextmanager
def _libraries_silenced(quiet: bool):
    """``-q``: no warnings or log records below ERROR from the libraries (torch, torchao, ModelOpt, diffusers);
    our own errors still reach stderr."""
    if not quiet:
        yield
        return
    previous = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with _libraries_silenced(getattr(args, "quiet", False)):
            return args.func(args)
    except SegQuantError as e:
        print(f"segquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segquant: interrupted (outputs left as they were)", file=sys.stderr)
        return 130
    except (OSError, UnicodeDecodeError) as e:  # the environment or a file, not SegQuant
        if args.verbose:
            raise
        print(f"segquant: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback with -v
        if args.verbose:
            raise
        print(f"segquant: internal error: {type(e).__name__}: {e} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
