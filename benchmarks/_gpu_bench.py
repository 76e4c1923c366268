"""The command line the GPU microbenchmarks share (attention_bench, quantize_epilogue_bench, fp8_gemm_algos). It
needs torch alone, not segquant (unlike ``_common``), so that a probe of torch's own kernels runs on a machine that
carries only its wheels."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch


def gpu_bench_main(doc: str, script: str, rep_ms: int, run: Callable[..., Any],
                   write_report: Callable[[dict, Path], None],
                   add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """The command line of a GPU microbenchmark: ``--out DIR`` runs it (``--rep-ms`` per case), ``--report JSON``
    only writes the report of a stored result next to it; without a CUDA device it exits with a message. The
    script's own options (``add_arguments``) reach ``run(out, rep_ms, **options)`` by their ``dest`` names."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--rep-ms", type=int, default=rep_ms)
    p.add_argument("--report", type=Path, help="only write the report next to this stored JSON")
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args()
    if args.report:
        return write_report(json.loads(args.report.read_text()), args.report.parent)
    if args.out is None:
        sys.exit("--out DIR is required (or --report JSON)")
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA device")
    options = {k: v for k, v in vars(args).items() if k not in ("out", "rep_ms", "report")}
    run(args.out, args.rep_ms, **options)
