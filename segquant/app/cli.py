"""The ``segquant`` command line. ``segquant analyze`` writes the plan of a diffusers denoiser."""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from segquant import PRECISIONS, SegQuantError, backend_names
from segquant.model_configs import bundled_configs

from .console import NORMAL, QUIET, VERBOSE, command_output
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


def _parallel(args: argparse.Namespace, command, check) -> int:
    """``command(args)`` in this process, or (``--num-gpus N > 1``, not yet launched) relaunched in N processes,
    after ``check(args)`` has refused bad input here, with one line, before any process starts; inside a launched
    job, in its process group with this rank's device."""
    from .parallel import check_num_processes, launched, process_group, relaunch

    check_num_processes(args.num_gpus, args.device)
    if args.num_gpus > 1 and not launched():
        check(args)
        return relaunch(args.num_gpus, sys.argv[1:] if args.argv is None else args.argv)
    with process_group(args.device) as device:
        args.device = device
        return command(args)


def cmd_quantize(args: argparse.Namespace) -> int:
    return _parallel(args, _quantize, _check_quantize)


def _check_quantize(args: argparse.Namespace) -> None:
    from .outputs import check_output_folder
    from .quantize_job import COMMAND, job_from_args

    job = job_from_args(args)
    check_output_folder(job.out, [p for p in (job.model, job.prompts, job.recipe) if p], COMMAND, job.overwrite)


def _quantize(args: argparse.Namespace) -> int:
    from .parallel import is_main
    from .quantize_job import job_from_args, quantize_pipeline

    args.no_progress = args.no_progress or args.quiet  # --no-progress: the option before -q, kept
    result = quantize_pipeline(job_from_args(args))
    if args.quiet or not is_main():
        return 0
    print(result.plan)  # the applied plan: what the backend quantized
    print(f"quantized {args.model} with {result.recipe.name} ({args.backend}); plan: {result.plan.summary()}")
    for note in result.notes:
        print(note)
    for path in result.files:
        print(f"wrote {path}")
    print(f"load: segquant.app.load_quantized({str(args.out)!r})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return _parallel(args, _run, _check_run)


def _run_settings(args: argparse.Namespace):
    from .run_job import RunSettings

    return RunSettings(model=args.model, backend=args.backend, recipe=args.recipe, num_samples=args.num_samples,
                       calib_samples=args.calib_samples, steps=args.steps, out=args.out, device=args.device,
                       seed=args.seed, progress=not args.quiet, overwrite=args.overwrite)


def _check_run(args: argparse.Namespace) -> None:
    from .outputs import check_output_folder
    from .run_job import COMMAND

    settings = _run_settings(args)
    check_output_folder(settings.out, [settings.model], COMMAND, settings.overwrite)


def _run(args: argparse.Namespace) -> int:
    from .parallel import is_main
    from .run_job import run

    metrics = run(_run_settings(args))
    if not args.quiet and is_main():
        for label, row in metrics["rows"].items():
            print(f"{label:60s} PSNR {row['psnr_db']:6.2f} dB  SSIM {row['ssim']:.4f}  "
                  f"class accuracy {row['class_accuracy']:.3f}")
        print(f"report: {Path(args.out) / 'report.md'} (grid.png, layers.png, metrics.json)")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from segquant.precision import PRECISIONS as SPECS
    from segquant.recipe import bundled_recipe, bundled_recipes

    if args.quiet:
        return 0
    rows = [("recipe", "model class", "precision", "SegLinear", "DualScale", "SmoothQuant alpha")]
    for name in bundled_recipes():
        r = bundled_recipe(name)
        alpha = "-" if r.smoothquant_alpha is None else f"{r.smoothquant_alpha:g}"
        rows.append((name, r.model_class, r.precision, "on" if r.seg_linear else "off",
                     "on" if r.dual_scale else "off", alpha))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("\nprecisions (--precision, or --recipe of segquant run):")
    width = max(map(len, SPECS))
    for spec in SPECS.values():
        print(f"  {spec.name.ljust(width)}  {spec.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segquant", description="SegQuant: segment-aware, dual-scale "
                                     "post-training quantization for diffusion models",
                                     parents=[_verbosity_options(subcommand=False)])
    parser.add_argument("--version", action="version", version=f"segquant {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    verbosity = _verbosity_options(subcommand=True)
    p = sub.add_parser("analyze", parents=[verbosity],
                       help="write the SegQuant plan of a diffusers denoiser (built on meta)",
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
    p.set_defaults(func=cmd_analyze)
    from .quantize_job import add_job_arguments

    q = sub.add_parser("quantize", parents=[verbosity],
                       help="quantize a diffusers pipeline's denoiser with a recipe and save it",
                       description="Load the pipeline (local files only when HF_HUB_OFFLINE is set), calibrate "
                       "on a prompt file, quantize the denoiser with the backend and recipe, save a checkpoint "
                       "that segquant.app.load_quantized loads back, optionally export ONNX.")
    add_job_arguments(q)
    add_num_gpus(q)
    q.set_defaults(func=cmd_quantize)

    _add_run(sub.add_parser("run", parents=[verbosity], help="the main job: quantize an embedded MNIST model "
                            "with SegQuant and the backend's preset, and write a report",
                            description="Quantize an embedded model (or a folder in its layout) with the "
                            "backend's own preset and with SegQuant, sample every row from the same noise and "
                            "write metrics.json, report.md, grid.png and layers.png."))
    c = sub.add_parser("recipes", parents=[verbosity], help="list the bundled recipes and precisions",
                       description="The bundled recipes (--recipe of quantize and run, or the base: of a recipe "
                       "file) with their model class, precision and techniques, and the precisions.")
    c.set_defaults(func=cmd_recipes)
    return parser


def _add_run(r: argparse.ArgumentParser) -> None:
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
    add_num_gpus(r)
    r.set_defaults(func=cmd_run)


def add_num_gpus(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-gpus", type=int, default=1, help="run in N processes, one per GPU (gloo processes "
                        "with --device cpu): calibration and evaluation batches sharded, statistics merged exactly, "
                        "rank 0 writes (default 1)")


def _verbosity_options(subcommand: bool) -> argparse.ArgumentParser:
    """``-q``/``-v``, the same before and after the subcommand. After it they default to SUPPRESS, so that an
    option given before it is not reset by the subcommand's default."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_mutually_exclusive_group()
    default = argparse.SUPPRESS if subcommand else False
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="print errors only: no results, no progress, no warnings")
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="also print what the steps do, the libraries' warnings and log records, and the "
                       "traceback of an internal error")
    return options


def version() -> str:
    """The installed distribution's version (the package's own when it runs from a source tree)."""
    try:
        return metadata.version("segquant")
    except metadata.PackageNotFoundError:
        from segquant import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    if args.quiet and args.verbose:
        parser.error("-q/--quiet and -v/--verbose: give one of them")
    try:
        with command_output(QUIET if args.quiet else VERBOSE if args.verbose else NORMAL):
            return args.func(args)
    except SegQuantError as e:
        print(f"segquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segquant: interrupted (outputs left as they were)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `segquant recipes | head`: the reader left; stop writing, say nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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
