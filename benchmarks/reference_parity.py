"""Parity of SegQuant's reference mode with the paper's reference code (OptiSys-ZJU/segquant), INT8 W8A8 fake quant.

    # 1. generate the stored outputs (needs an exported copy of the reference repository, never committed here):
    mkdir /tmp/segquant_ref; git -C <segquant-repo> archive HEAD | tar -x -C /tmp/segquant_ref
    git -C <segquant-repo> rev-parse HEAD > /tmp/segquant_ref/REFERENCE_COMMIT  # for the manifest
    python benchmarks/reference_parity.py --reference /tmp/segquant_ref   # CPU, about 15 s
    # 2. compare SegQuant's reference mode with the stored outputs (no reference code needed; the CI test does this):
    python benchmarks/reference_parity.py --compare

Two tiny models, built deterministically from seeds (weights from ``init_weights``; their SHA-256 is in the
manifest): ``tiny_flux`` (diffusers ``FluxTransformer2DModel``, the bundled tiny-flux config with one double and one
single block) and ``tiny_block`` (one FLUX single block with ``mlp_ratio=1`` and no rotary embedding, so that its
``proj_out`` input ``cat([attention, gelu(mlp)])`` has two equal segments, the only kind the reference segments).
The reference runs its own FLUX port (``backend/torch/modules/transformer_flux.py``: diffusers' FLUX does not
``fx``-trace), which loads the same state dict; the harness checks that its float outputs equal diffusers' bit for
bit.

Eight configurations per model, as the reference's ablation configs (``config/sd3/dit/abla.yaml``): ``baseline`` (no
pattern search), ``seglinear`` (the segment patterns), ``dualscale`` (``activation_to_linear`` only), ``both`` (all),
each with the default optimizer and with SmoothQuant alpha 0.5; INT8 per-tensor weights and activations, static
max calibration, fake quantization.

Stored in ``--out`` (default ``tests/data/reference_parity``): ``<model>.safetensors`` with the calibration and
evaluation inputs, the float outputs and the reference's output per configuration, and ``manifest.json`` (reference
commit, torch and diffusers versions, the command, the weight seeds and hashes, the reference's segment detection).

How the reference runs on a CPU without its CUDA extensions: ``torch.utils.cpp_extension.load`` is stubbed (FP8 fake
quant falls back to Python, the real-quant kernels are absent), and ``segquant`` is registered as a bare package so
that its ``__init__`` (which JIT-builds CUDA code) is skipped. The reference's package is called ``segquant`` like
ours: a generating process never imports SegQuant; ``--compare`` never imports the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "data" / "reference_parity"
MODELS = ("tiny_flux", "tiny_block")
CONFIGS = ("baseline", "seglinear", "dualscale", "both")
OPTS = ("default", "smooth")
ALPHA = 0.5
TOLERANCE = 1e-5
"""Acceptance: max |ours - reference| <= TOLERANCE * (range of the reference output), per configuration."""

WEIGHT_SEED = {"tiny_flux": 1234, "tiny_block": 4321}
INPUT_SEED = {"tiny_flux": 11, "tiny_block": 22}
CALIB_BATCHES, EVAL_BATCHES, BATCH = 4, 2, 2
TXT, IMG_SIDE = 8, 4  # text tokens; image latent side (IMG_SIDE**2 image tokens)
BLOCK = dict(dim=32, num_attention_heads=2, attention_head_dim=16, mlp_ratio=1.0)


def run_names() -> list[str]:
    """``<config>_<opt>`` for the eight configurations."""
    return [f"{c}_{o}" for o in OPTS for c in CONFIGS]


# ---- models and data, shared by both sides ---------------------------------------------------------------------

def tiny_flux_config() -> dict[str, Any]:
    """The bundled tiny-flux config, shrunk to one double and one single block."""
    config = json.loads((ROOT / "segquant" / "configs" / "tiny-flux.json").read_text())
    config.pop("_class_name")
    config.update(num_layers=1, num_single_layers=1)
    return config


def init_weights(model: nn.Module, seed: int) -> str:
    """Overwrite every parameter from one seeded CPU generator (names in sorted order): Linear-like weights
    ``randn / sqrt(fan_in)``, norm scales ``1 + 0.1 randn``, biases ``0.1 randn``; returns the SHA-256 of the values."""
    generator = torch.Generator().manual_seed(seed)
    digest = hashlib.sha256()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if p.dim() >= 2:
                value = noise / p.shape[1] ** 0.5
            elif name.endswith("bias"):
                value = 0.1 * noise
            else:
                value = 1 + 0.1 * noise
            p.copy_(value)
            digest.update(name.encode())
            digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def _randn(generator: torch.Generator, *shape: int, outliers: int = 0) -> torch.Tensor:
    """Gaussian data with a few outlier channels (x8) in the last dim, so that SmoothQuant has work to do."""
    x = torch.randn(shape, generator=generator)
    if outliers:
        idx = torch.randperm(shape[-1], generator=generator)[:outliers]
        x[..., idx] *= 8
    return x


def flux_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's ``(txt_ids, img_ids)``: zeros for text, (0, row, col) for the image tokens."""
    rows, cols = torch.meshgrid(torch.arange(IMG_SIDE), torch.arange(IMG_SIDE), indexing="ij")
    img = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return torch.zeros(TXT, 3), img


def make_inputs(model: str) -> dict[str, torch.Tensor]:
    """The calibration (``calib<i>.<name>``) and evaluation (``eval<i>.<name>``) inputs of ``model``."""
    generator = torch.Generator().manual_seed(INPUT_SEED[model])
    out: dict[str, torch.Tensor] = {}
    for split, count in (("calib", CALIB_BATCHES), ("eval", EVAL_BATCHES)):
        for i in range(count):
            key = f"{split}{i}."
            if model == "tiny_flux":
                cfg = tiny_flux_config()
                out[key + "hidden_states"] = _randn(generator, BATCH, IMG_SIDE ** 2, cfg["in_channels"], outliers=2)
                out[key + "encoder_hidden_states"] = _randn(generator, BATCH, TXT, cfg["joint_attention_dim"],
                                                            outliers=2)
                out[key + "pooled_projections"] = _randn(generator, BATCH, cfg["pooled_projection_dim"], outliers=2)
                out[key + "timestep"] = torch.rand(BATCH, generator=generator)
                out[key + "guidance"] = 1 + 4 * torch.rand(BATCH, generator=generator)
            else:
                dim = BLOCK["dim"]
                out[key + "encoder_hidden_states"] = _randn(generator, BATCH, TXT, dim, outliers=2)
                out[key + "hidden_states"] = _randn(generator, BATCH, IMG_SIDE ** 2, dim, outliers=2)
                out[key + "temb"] = _randn(generator, BATCH, dim, outliers=2)
    return out


def batches(inputs: dict[str, torch.Tensor], split: str) -> list[dict[str, torch.Tensor]]:
    """The ``split`` (``calib``/``eval``) batches of ``make_inputs`` as keyword dicts."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in inputs.items():
        head, name = key.split(".", 1)
        if head.startswith(split):
            found.setdefault(int(head[len(split):]), {})[name] = value
    return [found[i] for i in sorted(found)]


def diffusers_model(model: str) -> tuple[nn.Module, str]:
    """The diffusers side of ``model`` with its seeded weights, and their hash."""
    import diffusers
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    if model == "tiny_flux":
        module = diffusers.FluxTransformer2DModel.from_config(tiny_flux_config())
    else:
        module = FluxSingleTransformerBlock(**BLOCK)
    digest = init_weights(module, WEIGHT_SEED[model])
    return module.eval(), digest


def diffusers_call(model: str, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One float or quantized call of the diffusers side; inputs are cloned (a call must not change them)."""
    batch = {k: v.clone() for k, v in batch.items()}
    with torch.no_grad():
        if model == "tiny_flux":
            txt_ids, img_ids = flux_ids()
            return module(**batch, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        enc, img = module(**batch)
        return torch.cat([enc, img], dim=1)


def forward_kwargs(model: str, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments of one diffusers-side call (for graph analysis and calibration loops)."""
    if model == "tiny_flux":
        txt_ids, img_ids = flux_ids()
        return dict(batch, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
    return dict(batch)


# ---- the reference side (generation) -------------------------------------------------------------------------

def load_reference(path: Path) -> types.SimpleNamespace:
    """Import the reference from an exported tree at ``path`` without building its CUDA extensions."""
    import torch.utils.cpp_extension as cpp_extension

    if "segquant" in sys.modules and not hasattr(sys.modules["segquant"], "_reference_tree"):
        raise SystemExit("SegQuant is already imported in this process; the reference needs the name 'segquant'")

    def load(name: str, *args: Any, **kwargs: Any) -> Any:
        if "fake_quant" in name:
            raise RuntimeError(f"{name}: no CUDA extensions in the parity harness")
        return types.SimpleNamespace()

    cpp_extension.load = load
    sys.path.insert(0, str(path))
    package = types.ModuleType("segquant")
    package.__path__ = [str(path / "segquant")]
    package._reference_tree = str(path)
    sys.modules["segquant"] = package
    from backend.torch.modules import transformer_flux
    from segquant import config as ref_config
    from segquant.torch.quantization import quantize

    return types.SimpleNamespace(quantize=quantize, config=ref_config, flux=transformer_flux)


def reference_config(ref: types.SimpleNamespace, config: str, opt: str) -> dict[str, Any]:
    """The reference's quantize config of one configuration (as its ``config/sd3/dit/abla.yaml`` rows)."""
    c = ref.config
    patterns = {"baseline": [], "seglinear": c.SegPattern.seg(), "dualscale": [c.SegPattern.ACTIVATION2LINEAR],
                "both": c.SegPattern.all()}[config]
    return {"default": {
        "enable": True, "seglinear": config != "baseline", "search_patterns": patterns, "real_quant": False,
        "opt": {"type": c.Optimum.SMOOTH, "alpha": ALPHA} if opt == "smooth" else {"type": c.Optimum.DEFAULT},
        "calib": {"type": c.Calibrate.AMAX},
        "input_quant": {"type": c.DType.INT8, "axis": None},
        "weight_quant": {"type": c.DType.INT8, "axis": None},
    }}


def reference_model(ref: types.SimpleNamespace, model: str, state: dict[str, torch.Tensor]) -> nn.Module:
    if model == "tiny_flux":
        cfg = tiny_flux_config()
        module = ref.flux.FluxTransformer2DModel(**{k: cfg[k] for k in (
            "patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim",
            "num_attention_heads", "joint_attention_dim", "pooled_projection_dim", "guidance_embeds",
            "axes_dims_rope")})
    else:
        module = ref.flux.FluxSingleTransformerBlock(**BLOCK)
    module.load_state_dict(state)
    return module.eval()


def reference_args(model: str, batch: dict[str, torch.Tensor]) -> tuple:
    """Positional arguments of the reference's port (its calibration loader calls ``model(*args)``)."""
    b = {k: v.clone() for k, v in batch.items()}
    if model == "tiny_flux":
        txt_ids, img_ids = flux_ids()
        return (b["hidden_states"], b["encoder_hidden_states"], b["pooled_projections"], b["timestep"], img_ids,
                txt_ids, b["guidance"])
    return (torch.cat([b["encoder_hidden_states"], b["hidden_states"]], dim=1), b["temb"])


def reference_example(model: str, batch: dict[str, torch.Tensor]) -> tuple:
    """Every positional argument of the port's ``forward`` (its pattern detector makes them ``fx`` concrete args)."""
    extra = (None, None, None, False) if model == "tiny_flux" else (None, None)
    return reference_args(model, batch) + extra


def reference_call(model: str, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = module(*reference_args(model, batch))
    return out[0] if model == "tiny_flux" else out


class _Loader(list):
    """What the reference's ``quantize`` iterates: items whose ``[0]`` is the positional argument tuple."""

    def __init__(self, items: list[tuple]) -> None:
        super().__init__([[args] for args in items])
        self.dataset = items


def detection(ref: types.SimpleNamespace, module: nn.Module, example: tuple) -> dict[str, Any]:
    """The reference's pattern detection on ``module`` (for the manifest: which layers it segments)."""
    from segquant.pattern_detector import SegQuantPatternDetector

    found = SegQuantPatternDetector(module, example_inputs=example,
                                    search_patterns_lst=[p.value for p in ref.config.SegPattern.all()]
                                    ).find_all_patterns()
    return {pattern: (sorted(items) if pattern == "activation_to_linear" else
                      [{k: v for k, v in item.items() if k in ("linear_name", "seg_mode", "chunksizes")}
                       for item in items])
            for pattern, items in found.items()}


def generate(reference: Path, out: Path) -> None:
    ref = load_reference(reference)
    from safetensors.torch import save_file

    manifest: dict[str, Any] = {
        "reference": "https://github.com/OptiSys-ZJU/segquant",
        "reference_commit": _reference_commit(reference),
        "torch": torch.__version__, "diffusers": _version("diffusers"),
        "command": "python benchmarks/reference_parity.py --reference <exported reference tree>",
        "alpha": ALPHA, "tolerance": TOLERANCE, "configs": run_names(), "models": {},
    }
    out.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        start = time.time()
        float_model, digest = diffusers_model(model)
        state = {k: v.detach().clone() for k, v in float_model.state_dict().items()}
        inputs = make_inputs(model)
        calib, evaluation = batches(inputs, "calib"), batches(inputs, "eval")
        tensors = dict(inputs)
        port = reference_model(ref, model, state)
        for i, batch in enumerate(evaluation):
            ours, theirs = diffusers_call(model, float_model, batch), reference_call(model, port, batch)
            if not torch.equal(ours, theirs):
                raise SystemExit(f"{model}: the reference's FLUX port differs from diffusers in float by "
                                 f"{(ours - theirs).abs().max().item():.3g}; the comparison would be meaningless")
            tensors[f"float.eval{i}"] = ours
        found = detection(ref, reference_model(ref, model, state), reference_example(model, calib[0]))
        for name in run_names():
            config, opt = name.split("_")
            module = reference_model(ref, model, state)
            loader = _Loader([reference_args(model, b) for b in calib])
            module = ref.quantize(module, loader, reference_config(ref, config, opt),
                                  example=reference_example(model, calib[0]))
            for i, batch in enumerate(evaluation):
                tensors[f"{name}.eval{i}"] = reference_call(model, module, batch).contiguous()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{model}.safetensors"))
        manifest["models"][model] = {"weight_seed": WEIGHT_SEED[model], "weights_sha256": digest,
                                     "input_seed": INPUT_SEED[model], "detection": found}
        print(f"{model}: {len(run_names())} configurations in {time.time() - start:.1f} s", flush=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {out}")


def _reference_commit(path: Path) -> str:
    """The commit of the exported tree: its REFERENCE_COMMIT file (``git archive`` keeps the commit only in the
    tar's header), else the tree's own git checkout, else 'unknown'."""
    marker = path / "REFERENCE_COMMIT"
    if not marker.is_file() and (path / ".git").exists():
        try:
            return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return marker.read_text().strip() if marker.is_file() else "unknown"


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


# ---- SegQuant's side (comparison; never imports the reference) ------------------------------------------------

KNOWN_DETECTION_DIFFERENCES = {
    "tiny_flux": {
        "time_text_embed.timestep_embedder.linear_1": "the reference traces with its example inputs as fx concrete "
        "arguments, so the timestep's sin/cos embedding becomes a constant and its cat->linear (128 | 128) is never "
        "seen; SegQuant's export-based analysis finds it",
        "time_text_embed.guidance_embedder.linear_1": "as timestep_embedder.linear_1, for the guidance embedding",
    },
}
"""Layers whose reference-mode plan entry differs from what the reference code detects, and why. The comparison
quantizes them as the reference does (unsegmented), so that the numerics are compared on the same plan."""


def detected_layers(detection: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], bool]]:
    """The reference's detection as ``{layer: (in_segments, out_segments, dual_scale)}`` (segmented or dual only)."""
    found: dict[str, list] = {}
    for pattern, items in detection.items():
        if pattern == "activation_to_linear":
            for name in items:
                found.setdefault(name, [(), (), False])[2] = True
            continue
        for item in items:
            entry = found.setdefault(item["linear_name"], [(), (), False])
            if entry[0] or entry[1]:
                continue  # the reference keeps the first pattern that segments a layer
            entry[0 if item["seg_mode"] == "input" else 1] = tuple(item["chunksizes"])
    return {name: (i, o, d) for name, (i, o, d) in found.items()}


def planned_layers(plan: Any) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], bool]]:
    """The same view of a SegQuant plan."""
    return {name: (p.in_segments if len(p.in_segments) > 1 else (),
                   p.out_segments if len(p.out_segments) > 1 else (), p.dual_scale)
            for name, p in plan.layers.items() if p.seg_linear or p.dual_scale}


def our_plan(model: str, module: nn.Module, batch: dict[str, torch.Tensor], detection: dict[str, Any]) -> Any:
    """SegQuant's reference-mode plan of ``model`` (``segquant.reference_mode.analyze``) at ``int8_w8a8``, with the
    KNOWN_DETECTION_DIFFERENCES quantized as the reference does. Raises if any other layer differs."""
    from segquant import reference_mode

    plan = reference_mode.analyze(module, **forward_kwargs(model, batch))
    known = KNOWN_DETECTION_DIFFERENCES.get(model, {})
    ours, theirs = planned_layers(plan), detected_layers(detection)
    differ = sorted(n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n) and n not in known)
    if differ:
        raise AssertionError(f"{model}: reference-mode plan differs from the reference's detection on "
                             + "; ".join(f"{n}: ours {ours.get(n)}, reference {theirs.get(n)}" for n in differ))
    for name in known:
        i, o, d = theirs.get(name, ((), (), False))
        plan = plan.override(name, in_segments=i, out_segments=o, dual_scale=d)
    return plan.with_precision("int8_w8a8")


def run_ours(model: str, config: str, opt: str, module: nn.Module, plan: Any,
             calib: list[dict[str, torch.Tensor]], evaluation: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """SegQuant's reference mode (ModelOpt backend, fake quant) for one configuration: the eval outputs."""
    import segquant
    from segquant import reference_mode

    plan = plan.ablate(seg_linear=config in ("seglinear", "both"), dual_scale=config in ("dualscale", "both"))
    options = reference_mode.reference_options(ALPHA if opt == "smooth" else None)

    def forward_loop(m: nn.Module) -> None:
        for batch in calib:
            diffusers_call(model, m, batch)

    quantized = segquant.get_backend("modelopt").quantize(module, plan, options, forward_loop)
    return [diffusers_call(model, quantized, batch) for batch in evaluation]


def load_stored(out: Path, model: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    manifest = json.loads((out / "manifest.json").read_text())
    return load_file(str(out / f"{model}.safetensors")), manifest


def compare_model(out: Path, model: str) -> dict[str, dict[str, float]]:
    """``{config: {"max_diff", "range", "ratio"}}`` of SegQuant's reference mode against the stored outputs."""
    import copy

    tensors, manifest = load_stored(out, model)
    info = manifest["models"][model]
    float_model, digest = diffusers_model(model)
    if digest != info["weights_sha256"]:
        raise AssertionError(f"{model}: the seeded weights differ from the stored ones (sha256 {digest} != "
                             f"{info['weights_sha256']}): regenerate the data")
    inputs = {k: v for k, v in tensors.items() if k.startswith(("calib", "eval"))}
    calib, evaluation = batches(inputs, "calib"), batches(inputs, "eval")
    for i, batch in enumerate(evaluation):
        if not torch.equal(diffusers_call(model, float_model, batch), tensors[f"float.eval{i}"]):
            raise AssertionError(f"{model}: the float model's output differs from the stored one")
    plan = our_plan(model, float_model, calib[0], info["detection"])
    results = {}
    for name in manifest["configs"]:
        config, opt = name.split("_")
        outputs = run_ours(model, config, opt, copy.deepcopy(float_model), plan, calib, evaluation)
        diff = max((o - tensors[f"{name}.eval{i}"]).abs().max().item() for i, o in enumerate(outputs))
        ref = torch.cat([tensors[f"{name}.eval{i}"].flatten() for i in range(len(evaluation))])
        span = (ref.max() - ref.min()).item()
        results[name] = {"max_diff": diff, "range": span, "ratio": diff / span}
    return results


def compare(out: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Print the per-configuration table (markdown) and return it."""
    manifest = json.loads((out / "manifest.json").read_text())
    results = {model: compare_model(out, model) for model in manifest["models"]}
    print(f"reference commit {manifest['reference_commit']}, tolerance {manifest['tolerance']:g} of the output range\n")
    print("| model | configuration | max abs diff | output range | diff / range | within |")
    print("|---|---|---|---|---|---|")
    for model, rows in results.items():
        for name, r in rows.items():
            ok = "yes" if r["ratio"] <= manifest["tolerance"] else "**no**"
            print(f"| {model} | {name} | {r['max_diff']:.3g} | {r['range']:.3g} | {r['ratio']:.2e} | {ok} |")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", type=Path, help="exported tree of OptiSys-ZJU/segquant (generates the data)")
    parser.add_argument("--compare", action="store_true", help="compare SegQuant's reference mode with stored data")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the stored data lives")
    args = parser.parse_args()
    if args.reference is None and not args.compare:
        parser.error("give --reference PATH (generate) and/or --compare")
    if args.reference is not None:
        generate(args.reference.resolve(), args.out)
        if args.compare:  # a fresh process: the reference holds the name 'segquant' in this one
            subprocess.run([sys.executable, __file__, "--compare", "--out", str(args.out)], check=True)
    elif args.compare:
        compare(args.out)


if __name__ == "__main__":
    main()
