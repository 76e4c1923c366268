"""What the benchmark scripts share: the results folder and ``--out``, the environment every result file records
(command, device, torch, python, git), writing JSON, JSON-lines and markdown results, matplotlib figures, the
inputs of Linear layers through ``segquant.recording.record_linears``, and quantizing the embedded models through
the backends (``segquant.get_backend``) with their bundled recipes.

The scripts run from the repository root with segquant installed (``pip install -e .``):
``python benchmarks/<name>.py``. This folder is then ``sys.path[0]``, so ``from _common import ...`` works.
Only public names of segquant and its backends are used here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from segquant import Recipe, SegQuantPlan, get_backend, load_recipe
from segquant.recording import record_linears

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def parser(doc: str, out: bool = True) -> argparse.ArgumentParser:
    """A parser showing the script's docstring, with ``--out`` (default ``benchmarks/results``) unless ``out``
    is False."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if out:
        p.add_argument("--out", type=Path, default=RESULTS, help="folder for the result files (default %(default)s)")
    return p


def command() -> str:
    """The command line that is running, to be written into the results."""
    return shlex.join(["python", *sys.argv])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str | torch.device = "cpu") -> str:
    """The GPU's name for a CUDA device, else ``CPU: <model>``."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_model()}"


def git_rev() -> str:
    """The short commit of the checkout, with a note when it has uncommitted changes; ``unknown`` outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str | torch.device = "cpu", **extra: Any) -> dict[str, Any]:
    """What every result file records: command, device, torch, python and git (plus ``extra``)."""
    return {"command": command(), "device": device_name(device), "torch": torch.__version__,
            "python": platform.python_version(), "git": git_rev(), **extra}


def environment_line(env: dict[str, Any]) -> str:
    """The markdown sentence naming an ``environment()``."""
    return f"Command: `{env['command']}`. Device: {env['device']}, torch {env['torch']}, git {env.get('git', '?')}."


def write_results(out: Path, name: str, result: dict[str, Any], markdown: str) -> None:
    """``out/<name>.json`` and ``out/<name>.md``; prints where they went."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=_json_value) + "\n")
    (out / f"{name}.md").write_text(markdown.rstrip("\n") + "\n")
    print(f"wrote {out / name}.json and .md")


def append_jsonl(fh: Any, record: dict[str, Any]) -> None:
    """One measurement as a JSON line: to the open results file ``fh`` (flushed, so that a crash keeps what
    was measured) and to stdout."""
    line = json.dumps(record, default=_json_value)
    print(line, flush=True)
    fh.write(line + "\n")
    fh.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines results file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _json_value(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else float(value)


@contextlib.contextmanager
def figure(path: Path, nrows: int = 1, ncols: int = 1, dpi: int = 110, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """``with figure(path, figsize=(7, 4)) as (fig, ax):`` draw; on exit the figure is laid out, saved to ``path``
    (matplotlib's Agg backend, no display) and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def timing_bars(ax: Any, labels: list[str], ms: list[float], baseline: str, title: str, labelsize: int = 8) -> None:
    """Horizontal bars of per-call times, top to bottom in ``labels``' order, the ``baseline`` bar grey."""
    ax.barh(labels, ms, color=["grey" if label == baseline else "tab:blue" for label in labels])
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("ms per call (do_bench median)")
    ax.tick_params(labelsize=labelsize)


def linear_inputs(model: nn.Module, run: Callable[[], Any], names: Iterable[str] | None = None,
                  transform: Callable[[Tensor], Tensor] | None = None) -> dict[str, list[Tensor]]:
    """Per Linear of ``model`` (or of ``names``), its inputs over ``run()`` (no grad), one tensor per call,
    through ``transform`` (default: detached)."""
    with record_linears(model, names, transform=transform) as recording, torch.no_grad():
        run()
    return recording.inputs


def observe_linears(model: nn.Module, observers: dict[str, Any], run: Callable[[], Any]) -> None:
    """Feed the input of every Linear named in ``observers`` to its ``update`` while ``run()`` runs (no grad)."""
    with record_linears(model, observers, keep=False, on_input=lambda n, x: observers[n].update(x)), torch.no_grad():
        run()


# ---- quantizing the embedded models ----------------------------------------------------------------------
def every_linear(plan: SegQuantPlan) -> SegQuantPlan:
    """The analysed ``plan`` with every Linear quantized (analysis keeps the model's output layer in high
    precision)."""
    for name in plan.high_precision_layers():
        plan = plan.override(name, high_precision=False)
    return plan


def model_recipe(model: str, precision: str, **changes: Any) -> Recipe:
    """The bundled recipe ``<model>/<precision>`` of an embedded model, with ``changes`` (``skip=()``,
    ``seg_linear=False``...)."""
    return dataclasses.replace(load_recipe(f"{model}/{precision}"), **changes)


def quantize_segquant(model: nn.Module, plan: SegQuantPlan, recipe: Recipe, forward_loop: Callable | None,
                      backend: str = "modelopt") -> nn.Module:
    """``recipe`` applied to the analysed ``plan``, quantized through the backend ``backend`` (no progress bars)."""
    return get_backend(backend).quantize(model, recipe.apply(plan), recipe.quantize_options(show_progress=False),
                                         forward_loop)


def modelopt_without_jit():
    """``modelopt.torch.quantization`` with its CUDA extensions off: no JIT build, ModelOpt's PyTorch fallback fake
    quantization (as on CPU)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization import extensions

    for fn in (extensions.get_cuda_ext, extensions.get_cuda_ext_fp8):
        fn.extension = None
    return mtq


QUANTIZERS = ("input_quantizer", "weight_quantizer", "output_quantizer")
"""The quantizer attributes ModelOpt gives a quantized module."""


def enabled_quantizers(module: nn.Module) -> list[Any]:
    """The enabled ModelOpt quantizers of ``module`` (none for a torchao or float module)."""
    found = (getattr(module, a, None) for a in QUANTIZERS)
    return [q for q in found if q is not None and getattr(q, "is_enabled", False)]


def disable_quantizers(model: nn.Module, keep: Callable[[str, nn.Module], bool]) -> None:
    """Disable the ModelOpt quantizers of every module for which ``keep(name, module)`` is False."""
    for name, module in model.named_modules():
        if not keep(name, module):
            for quantizer in enabled_quantizers(module):
                quantizer.disable()


def flux_call_inputs(model: nn.Module, gen: torch.Generator, dtype: torch.dtype, image_tokens: int, text_tokens: int,
                     timestep: float | None = None) -> dict[str, Any]:
    """Keyword inputs of one FluxTransformer2DModel call, batch 1, on ``gen``'s device: random latents, text
    embeddings and pooled projections from ``gen`` (in that order), a square grid of image ids, the timestep
    ``timestep`` (None: drawn from ``gen`` after the rest), guidance 3.5 when the model takes it."""
    device = gen.device
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dtype)  # noqa: E731
    side = int(image_tokens ** 0.5)
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] = torch.arange(side, device=device)[:, None]
    ids[..., 2] = torch.arange(side, device=device)[None, :]
    guidance = dict(guidance=torch.tensor([3.5], device=device, dtype=dtype)) if model.config.guidance_embeds else {}
    inputs = dict(hidden_states=randn(1, image_tokens, model.config.in_channels),
                  encoder_hidden_states=randn(1, text_tokens, model.config.joint_attention_dim),
                  pooled_projections=randn(1, model.config.pooled_projection_dim))
    t = torch.rand(1, generator=gen, device=device) if timestep is None else torch.tensor([timestep], device=device)
    return dict(inputs, timestep=t.to(dtype), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(text_tokens, 3, device=device), **guidance, return_dict=False)
