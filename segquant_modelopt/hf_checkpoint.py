"""HF checkpoints of ModelOpt-quantized SegQuant denoisers that tell the truth, and their loader.

ModelOpt's ``export_hf_checkpoint`` reads a SegQuant model's quantizers as if ModelOpt had made them: it labels a
static per-segment FP8 model ``FP8_PER_CHANNEL_PER_TOKEN``, writes per-channel input amax vectors as
``input_scale`` and drops DualScale's negative scales. ``export_hf_checkpoint`` here writes what the standard
formats can express in their standard form and says what they cannot:

- ``diffusion_pytorch_model.safetensors`` in ModelOpt's unified layout: each quantized Linear's ``weight`` holds
  its codes (``int8`` or ``float8_e4m3fn``) with ``weight_scale`` (one per output row: output segments are
  per-channel weight scales; a scalar for ``FP8``), ``input_scale`` (one per tensor) and ``pre_quant_scale``
  (SmoothQuant factors, or input segments folded as ``smooth / a_s``) where the layer's format has them. Layers
  kept in high precision are written as they are and listed in ``exclude_modules``.
- ``config.json``'s ``quantization_config`` (``quant_method: modelopt``) names each layer's standard
  ``quant_algo`` (``W8A8_SQ_PER_CHANNEL``, ``FP8``, ``FP8_PER_CHANNEL_PER_TOKEN``): one for the whole model when
  all layers share it, else ``MIXED_PRECISION`` with ``quantized_layers``, where a layer that needs what only
  SegQuant expresses is labelled ``SEGQUANT`` so that no standard runtime loads it as something else.
- Its ``segquant`` section (``SECTION_VERSION``) describes every quantized layer (segments, DualScale segments,
  activation kind, realisation, smoothing) and lists under ``needs`` what a layer uses beyond its standard form:
  ``input_segments`` (split-K per-segment activation scales), ``dual_scale``, ``output_segments`` and
  ``pre_quant_scale`` (FP8 has one weight scale and no pre-quant scale), ``format`` (formats no ModelOpt
  ``quant_algo`` names, e.g. INT4 per-channel weights with INT8 per-token activations) and ``shift`` (an
  activation shift: the input is quantized as ``x - c``).
- ``segquant.safetensors``: the calibrated ranges the SegQuant runtime quantizes with (per input segment: amax,
  positive and negative amax), the SmoothQuant factors and a shifted layer's ``(K,)`` centres ``input_center``
  (of the smoothed input), so that ``load_hf_checkpoint`` rebuilds a model whose outputs equal the fake-quant
  model's bit for bit. A shifted layer's ``bias`` is its own ``b``: the runtime feeds ``Q(x - c) + c`` to the GEMM
  (a deployment folds ``W_hat c`` into the bias, as ``segquant_modelopt.export`` does in ONNX).

``strict=True`` refuses a model with any layer that needs SegQuant, naming the layers, before writing anything.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from segquant import SegQuantError
from segquant.numerics import ActivationStats, QuantFormat, fake_quant_input, get_format, quantize, scale_from_amax

from .quantizer import format_of, is_marked

SECTION_VERSION = 2
READABLE_SECTION_VERSIONS = (1, 2)
"""Version 2 adds the activation shift (``shift``, ``shift_segments``, ``<layer>.input_center``); version 1
sections, which have none, are read as well. A loader of version 1 refuses a version 2 checkpoint by its version."""
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SEGQUANT_FILE = "segquant.safetensors"
SEGQUANT_ALGO = "SEGQUANT"
"""The ``quant_algo`` of a layer that only the SegQuant runtime (``load_hf_checkpoint``) runs as quantized."""

NEEDS = {
    "input_segments": "per-segment activation scales applied split-K (standard formats have one input scale)",
    "dual_scale": "separate positive and negative activation scales",
    "output_segments": "one weight scale per output segment where the format has one per tensor (FP8)",
    "pre_quant_scale": "SmoothQuant factors or folded input segments, which the FP8 format has no place for",
    "format": "weight/activation formats no ModelOpt quant_algo names",
    "shift": "an activation shift: the input is quantized as x - c (input_center) and W c joins the bias",
}
"""What each ``needs`` entry of the ``segquant`` section means."""


@dataclass
class LayerExport:
    """How one quantized Linear is written.

    Args:
        name: module name.
        weight_format / act_format: ``segquant.numerics`` format names (``act_format`` empty: weight only).
        activations: ``static`` (calibrated per segment), ``dynamic_per_token`` or ``none``.
        in_segments / out_segments / dual_scale_segments: as in the plan.
        realisation: ``split_k`` or ``folded`` (static activations only).
        smoothed: whether the layer has SmoothQuant factors.
        shift / shift_segments: the activation shift (``per_tensor``/``per_channel``) and its input segments; None
            and empty without one.
        standard: the ModelOpt ``quant_algo`` of the layer, None when it needs SegQuant.
        needs: keys of ``NEEDS`` that the layer uses beyond ``standard`` form.
    """

    name: str
    weight_format: str
    act_format: str
    activations: str
    in_segments: list[int]
    out_segments: list[int]
    dual_scale_segments: list[int]
    realisation: str
    smoothed: bool
    shift: str | None = None
    shift_segments: list[int] = field(default_factory=list)
    standard: str | None = None
    needs: list[str] = field(default_factory=list)

    def section(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("name", "standard")}
        out["quant_algo"] = self.standard or SEGQUANT_ALGO
        return out


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear layers with an enabled ModelOpt quantizer; every one must be a SegQuant layer."""
    layers, foreign = {}, []
    for name, module in model.named_modules():
        quantizers = [getattr(module, q, None) for q in ("weight_quantizer", "input_quantizer")]
        enabled = [q for q in quantizers if q is not None and getattr(q, "is_enabled", False)]
        if not enabled:
            continue
        if not isinstance(module, nn.Linear) or not all(is_marked(q) for q in enabled):
            foreign.append(name)
        else:
            layers[name] = module
    if foreign:
        raise SegQuantError(f"{foreign[0]} ({len(foreign)} layers) was quantized by ModelOpt, not by the segquant "
                            "algorithm; export models without SegQuant layers with "
                            "modelopt.torch.export.export_hf_checkpoint")
    if not layers:
        raise SegQuantError(f"{type(model).__name__} has no SegQuant-quantized layer; quantize it with "
                            "mtq.quantize(model, SEGQUANT_CFG, forward_loop) first")
    return layers


def _standard_algo(layer: LayerExport, weight_one_scale: bool, has_pre_quant_scale: bool) -> tuple[str | None, list[str]]:
    needs = []
    if layer.dual_scale_segments:
        needs.append("dual_scale")
    if len(layer.in_segments) > 1 and layer.realisation != "folded":
        needs.append("input_segments")
    if layer.shift is not None:
        needs.append("shift")
    w, a, kind = layer.weight_format, layer.act_format, layer.activations
    if (w, a, kind) == ("int8", "int8", "static"):
        algo = "W8A8_SQ_PER_CHANNEL"
    elif (w, kind) == ("int8", "none"):
        algo = "W8A16"
    elif (w, a, kind) == ("fp8_e4m3", "fp8_e4m3", "static"):
        algo = "FP8"
        if not weight_one_scale:
            needs.append("output_segments")
        if has_pre_quant_scale:
            needs.append("pre_quant_scale")
    elif (w, a, kind) == ("fp8_e4m3", "fp8_e4m3", "dynamic_per_token"):
        algo = "FP8_PER_CHANNEL_PER_TOKEN"
    else:
        algo = None
        needs.append("format")
    return (None if needs else algo), needs


def describe(model: nn.Module) -> dict[str, LayerExport]:
    """How ``export_hf_checkpoint`` writes each quantized Linear of a ModelOpt SegQuant model.

    Raises:
        SegQuantError: a layer quantized by ModelOpt's own algorithms, or no SegQuant layer at all.
    """
    out = {}
    for name, module in _quantized_layers(model).items():
        wq, iq = module.weight_quantizer, module.input_quantizer
        w_fmt, a_fmt = format_of(wq), format_of(iq) if iq.is_enabled else None
        role = getattr(iq, "_segquant_role", None) if iq.is_enabled else None
        activations = {"input": "static", "dynamic": "dynamic_per_token", None: "none"}[role]
        segments = list(getattr(iq, "_segquant_segments", [module.in_features]))
        layer = LayerExport(name, w_fmt.name, a_fmt.name if a_fmt else "", activations, segments,
                            list(getattr(wq, "_segquant_out_segments", [module.out_features])),
                            list(getattr(iq, "_segquant_dual_segments", [])) if role else [],
                            "folded" if getattr(iq, "_segquant_folded", False) else "split_k",
                            role is not None and "_segquant_smooth" in iq._buffers)
        if role is not None and iq.shift_center is not None:
            layer.shift = getattr(iq, "_segquant_shift", None) or "per_channel"  # a centre per channel, at least
            layer.shift_segments = list(getattr(iq, "_segquant_shift_segments", None) or range(len(segments)))
        scale = _weight_scale(module)
        layer.standard, layer.needs = _standard_algo(layer, bool((scale == scale.flatten()[0]).all()),
                                                     _pre_quant_scale(module) is not None)
        out[name] = layer
    return out


def _weight_scale(module: nn.Module) -> Tensor:
    """``(N, 1)`` float32: the weight quantizer's scale per output row (its fake quantization's own)."""
    wq = module.weight_quantizer
    return scale_from_amax(wq._amax, format_of(wq)).expand(module.out_features, 1)


def _pre_quant_scale(module: nn.Module) -> Tensor | None:
    iq = module.input_quantizer
    return iq.pre_quant_scale if iq.is_enabled and iq.pre_quant_scale is not None else None


def _codes(module: nn.Module, scale: Tensor, fmt: QuantFormat) -> Tensor:
    codes = quantize(module.weight.detach(), scale, fmt)
    return codes.to(torch.float8_e4m3fn) if fmt.is_float else codes.to(torch.int8)


def _layer_tensors(name: str, module: nn.Module, layer: LayerExport) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(standard tensors, SegQuant tensors) of one quantized layer."""
    fmt = get_format(layer.weight_format)
    scale = _weight_scale(module)
    standard = {f"{name}.weight": _codes(module, scale, fmt)}
    one_scale = layer.standard == "FP8"
    standard[f"{name}.weight_scale"] = scale.flatten()[0].clone() if one_scale else scale.flatten().clone()
    if module.bias is not None:
        standard[f"{name}.bias"] = module.bias.detach().clone()
    iq, extra = module.input_quantizer, {}
    if layer.activations == "static" and layer.standard is not None:
        standard[f"{name}.input_scale"] = scale_from_amax(iq._amax.detach().reshape(()), layer.act_format)
        pqs = _pre_quant_scale(module)
        if pqs is not None:
            standard[f"{name}.pre_quant_scale"] = pqs.detach().clone()
    if layer.activations != "none" and iq.segquant_stats() is not None:  # static ranges; a dynamic shift's too
        for key in ("amax", "pos", "neg"):
            extra[f"{name}.input_{key}"] = iq._buffers[f"_segquant_seg_{key}"].detach().float().clone()
    if layer.shift is not None:
        extra[f"{name}.input_center"] = iq.shift_center.detach().float().clone()
    if layer.smoothed:
        extra[f"{name}.smooth"] = iq._segquant_smooth.detach().clone()
    return standard, extra


def _quantization_config(layers: dict[str, LayerExport], excluded: list[str], dtype: torch.dtype) -> dict[str, Any]:
    import modelopt

    import segquant

    algos = {layer.standard or SEGQUANT_ALGO for layer in layers.values()}
    config: dict[str, Any] = {"quant_method": "modelopt",
                              "producer": {"name": "segquant", "version": segquant.__version__,
                                           "modelopt_version": modelopt.__version__},
                              "kv_cache_quant_algo": None, "exclude_modules": sorted(excluded)}
    if len(algos) == 1 and SEGQUANT_ALGO not in algos:
        config["quant_algo"] = algos.pop()
    else:
        config["quant_algo"] = "MIXED_PRECISION"
        config["quantized_layers"] = {n: {"quant_algo": layer.standard or SEGQUANT_ALGO} for n, layer in layers.items()}
    config["segquant"] = {
        "version": SECTION_VERSION, "tensors": SEGQUANT_FILE, "needs": NEEDS, "dtype": str(dtype).removeprefix("torch."),
        "layers_needing_segquant": sorted(n for n, layer in layers.items() if layer.needs),
        "layers": {n: layer.section() for n, layer in layers.items()},
    }
    return config


def _excluded(model: nn.Module, quantized: dict[str, LayerExport]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]


def _dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the one its unquantized tensors are written in)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _plain_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters and persistent buffers without ModelOpt's quantizer state."""
    return {k: v.detach() for k, v in model.state_dict().items()
            if "_quantizer." not in k}


def _check_standard_only(layers: dict[str, LayerExport]) -> None:
    special = [n for n, layer in layers.items() if layer.needs]
    if special:
        why = sorted({need for n in special for need in layers[n].needs})
        named = ", ".join(f"{n} ({'+'.join(layers[n].needs)})" for n in special[:5])
        raise SegQuantError(f"strict export: {len(special)} layers need SegQuant beyond the standard ModelOpt formats "
                            f"({', '.join(why)}): {named}{' ...' if len(special) > 5 else ''}; "
                            "quantize with realisation='folded' and dual_scale=False for a standard-only checkpoint, "
                            "or export with strict=False")


def export_hf_checkpoint(model: nn.Module, export_dir: str | Path, *, strict: bool = False) -> Path:
    """Write a ModelOpt SegQuant denoiser as an HF checkpoint folder (see the module docstring for the layout).

    Example:
        >>> model = mtq.quantize(transformer, SEGQUANT_CFG, forward_loop)
        >>> export_hf_checkpoint(model, "flux-segquant-int8")
        >>> again = load_hf_checkpoint("flux-segquant-int8")

    Args:
        model: a diffusers model (``ModelMixin``: it has a ``config``) quantized with the ``segquant`` algorithm.
        export_dir: a folder that does not exist yet or is empty; written completely or not at all.
        strict: refuse layers that need SegQuant (split-K input segments, DualScale, ...) instead of recording
            them in the ``segquant`` section: the checkpoint is then standard ModelOpt form only.
    Returns:
        ``export_dir``.
    Raises:
        SegQuantError: not a SegQuant model, not a diffusers model, a non-empty ``export_dir``, or (strict) the
            layers that need SegQuant.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "save_config"):
        raise SegQuantError("export_hf_checkpoint needs a diffusers model (the denoiser, e.g. pipe.transformer), "
                            f"got {type(model).__name__}")
    layers = describe(model)
    if strict:
        _check_standard_only(layers)
    export_dir = Path(export_dir)
    if export_dir.exists() and (not export_dir.is_dir() or any(export_dir.iterdir())):
        raise SegQuantError(f"{export_dir} exists and is not an empty folder; give a new folder")
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    standard = _plain_state(model)
    extra: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        std, seg = _layer_tensors(name, modules[name], layer)
        standard.update(std)
        extra.update(seg)
    _write_folder(model, export_dir, _quantization_config(layers, _excluded(model, layers), _dtype_of(model)),
                  standard, extra)
    return export_dir


def _write_folder(model: nn.Module, export_dir: Path, quantization_config: dict[str, Any],
                  standard: dict[str, Tensor], extra: dict[str, Tensor]) -> None:
    """Write the folder in a hidden sibling and rename it into place: complete or not at all."""
    from safetensors.torch import save_file

    stage = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.", dir=export_dir.parent))
    try:
        model.save_config(stage)
        config_path = stage / "config.json"
        config = json.loads(config_path.read_text())
        config["quantization_config"] = quantization_config
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous().cpu() for k, v in standard.items()}, str(stage / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        save_file({k: v.contiguous().cpu() for k, v in extra.items()}, str(stage / SEGQUANT_FILE),
                  metadata={"format": "pt"})
        if export_dir.exists():
            export_dir.rmdir()
        stage.rename(export_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


class SegQuantCheckpointLinear(nn.Linear):
    """A Linear run as the SegQuant fake-quant model runs it: its weight is the dequantized checkpoint weight and
    its input is quantized per segment (``segquant.numerics.quantize_input_segment``) from the stored ranges."""

    def __init__(self, in_features: int, out_features: int, bias: bool, layer: LayerExport,
                 tensors: dict[str, Tensor], device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.layer = layer
        self.act_format = get_format(layer.act_format) if layer.act_format else None
        for key in ("input_amax", "input_pos", "input_neg", "input_center", "smooth"):
            if key in tensors:
                self.register_buffer(key, tensors[key], persistent=False)

    def quantize_input(self, x: Tensor) -> Tensor:
        layer = self.layer
        if layer.activations == "none" or x.numel() == 0:
            return x
        stats = None
        if layer.activations == "static" or layer.shift is not None:
            stats = ActivationStats(self.input_amax, self.input_pos, self.input_neg,
                                    self.input_center if layer.shift is not None else None)
        return fake_quant_input(x, self.act_format, layer.in_segments, layer.dual_scale_segments, stats,
                                self.smooth if layer.smoothed else None, layer.realisation == "folded",
                                per_token=layer.activations == "dynamic_per_token")

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        layer = self.layer
        shift = f", shift={layer.shift} {layer.shift_segments}" if layer.shift is not None else ""
        return (f"{super().extra_repr()}, {layer.weight_format}/{layer.act_format or '-'} {layer.activations}, "
                f"in_segments={layer.in_segments}, dual_scale={layer.dual_scale_segments}{shift}")


def read_quantization_config(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model config without quantization_config, quantization_config)`` of an exported folder.

    Raises:
        SegQuantError: no config.json, or one without a SegQuant ``quantization_config`` of a known version.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise SegQuantError(f"{folder}: no config.json; pass a folder written by export_hf_checkpoint")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SegQuantError(f"{path}: not valid JSON ({e})") from None
    quant = config.pop("quantization_config", None) if isinstance(config, dict) else None
    section = quant.get("segquant") if isinstance(quant, dict) else None
    if not isinstance(section, dict):
        raise SegQuantError(f"{path}: no quantization_config with a segquant section; not written by "
                            "segquant_modelopt.export_hf_checkpoint")
    if section.get("version") not in READABLE_SECTION_VERSIONS:
        raise SegQuantError(f"{path}: segquant section version {section.get('version')!r}; this segquant reads "
                            f"versions {', '.join(map(str, READABLE_SECTION_VERSIONS))}")
    return config, quant


def _dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    scale = scale.float()
    return (codes.float() * (scale[:, None] if scale.dim() == 1 else scale)).to(dtype)


def _check_layer_tensors(folder: Path, layer: LayerExport, tensors: dict[str, Tensor], in_features: int) -> None:
    """The ``segquant.safetensors`` tensors that a layer's section entry says it quantizes with are there, shaped for
    it: per-segment ranges (static), centres (shift), SmoothQuant factors (smoothed)."""
    wanted = {}
    if layer.activations == "static" or layer.shift is not None:
        wanted.update({f"input_{key}": (len(layer.in_segments),) for key in ("amax", "pos", "neg")})
    if layer.shift is not None:
        wanted["input_center"] = (in_features,)
    if layer.smoothed:
        wanted["smooth"] = (in_features,)
    for key, shape in wanted.items():
        if key not in tensors:
            raise SegQuantError(f"{folder}: layer {layer.name} needs {SEGQUANT_FILE} tensor {layer.name}.{key}, "
                                "which is missing; the checkpoint is incomplete or was edited, export it again")
        if tuple(tensors[key].shape) != shape:
            raise SegQuantError(f"{folder}: {SEGQUANT_FILE} tensor {layer.name}.{key} has shape "
                                f"{tuple(tensors[key].shape)}, layer {layer.name} needs {shape}; export it again")


def load_hf_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the quantized denoiser from a folder written by ``export_hf_checkpoint``.

    Every quantized Linear becomes a ``SegQuantCheckpointLinear`` (dequantized weight, per-segment input
    quantization): the outputs equal those of the exported fake-quant model bit for bit, on the same device and
    dtype. diffusers, safetensors and accelerate are needed; ModelOpt is not.

    Raises:
        SegQuantError: the folder is not a SegQuant checkpoint, or its tensors do not match its config.
    """
    import diffusers
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    folder = Path(folder)
    config, quant = read_quantization_config(folder)
    section = quant["segquant"]
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if cls is None:
        raise SegQuantError(f"{folder}: {config.get('_class_name')!r} is not a diffusers model class")
    for name in (WEIGHTS_FILE, section.get("tensors", SEGQUANT_FILE)):
        if not (folder / name).is_file():
            raise SegQuantError(f"{folder}: {name} is missing; the export is incomplete")
    state = load_file(str(folder / WEIGHTS_FILE))
    extra = load_file(str(folder / section.get("tensors", SEGQUANT_FILE)))
    with init_empty_weights():
        model = cls.from_config(config)
    dtype = getattr(torch, str(section.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise SegQuantError(f"{folder}: unknown dtype {section.get('dtype')!r} in the segquant section")
    for name, entry in section["layers"].items():
        fields = {k: v for k, v in entry.items() if k != "quant_algo"}
        layer = LayerExport(name, standard=None if entry["quant_algo"] == SEGQUANT_ALGO else entry["quant_algo"],
                            **fields)
        try:
            codes, scale = state.pop(f"{name}.weight"), state.pop(f"{name}.weight_scale")
            old = model.get_submodule(name)
        except (KeyError, AttributeError) as e:
            raise SegQuantError(f"{folder}: layer {name} of the segquant section has no {e} in the checkpoint") from None
        for key in ("input_scale", "pre_quant_scale"):
            state.pop(f"{name}.{key}", None)
        tensors = {k.rsplit(".", 1)[1]: v for k, v in extra.items() if k.rsplit(".", 1)[0] == name}
        _check_layer_tensors(folder, layer, tensors, old.in_features)
        new = SegQuantCheckpointLinear(old.in_features, old.out_features, old.bias is not None, layer, tensors,
                                       device="meta", dtype=dtype)
        model.set_submodule(name, new)
        state[f"{name}.weight"] = _dequantize(codes, scale, dtype)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise SegQuantError(f"{folder}: the weights do not match {cls.__name__}'s config: "
                            f"{str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def _has_segquant_layers(model: Any) -> bool:
    modules = model.modules() if isinstance(model, nn.Module) else \
        (m for c in getattr(model, "components", {}).values() if isinstance(c, nn.Module) for m in c.modules())
    return any(is_marked(q) for m in modules for q in (getattr(m, "weight_quantizer", None),
                                                        getattr(m, "input_quantizer", None)) if q is not None)


def guard_modelopt_export() -> None:
    """Make ModelOpt's ``export_hf_checkpoint`` refuse SegQuant models (before it changes anything) instead of
    writing a checkpoint whose ``quant_algo`` and scales misdescribe them. Both of its paths (diffusers and
    transformers) go through these module-level functions, whichever way the caller imported the public one."""
    from modelopt.torch.export import unified_export_hf as hf

    def refusing(original):
        if getattr(original, "_segquant_guard", False):
            return original

        def export(model: Any, *args: Any, **kwargs: Any) -> Any:
            if _has_segquant_layers(model):
                raise SegQuantError("ModelOpt's export_hf_checkpoint cannot describe SegQuant layers (per-segment "
                                    "and DualScale scales); use segquant_modelopt.export_hf_checkpoint(model, "
                                    "export_dir), and load it back with segquant_modelopt.load_hf_checkpoint")
            return original(model, *args, **kwargs)

        export._segquant_guard = True
        return export

    for name in ("_export_diffusers_checkpoint", "_export_transformers_checkpoint"):
        if hasattr(hf, name):
            setattr(hf, name, refusing(getattr(hf, name)))
