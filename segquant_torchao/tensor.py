"""``SegQuantTensor``: a SegQuant layer's quantized weight as a torchao tensor subclass.

It follows torchao's ``TorchAOBaseTensor`` pattern (``Float8Tensor``, ``Int8Tensor``): plain tensors named by
``tensor_data_names`` (codes, per-row weight scales, the calibrated activation scales, SmoothQuant factors),
attributes named by ``tensor_attribute_names`` (the layer's ``SegLinearSpec`` and the logical dtype), and
``implements`` for ``F.linear``. Because the layer stays an ``nn.Linear`` whose ``weight`` is this tensor,
everything torchao and diffusers do with quantized weights works on it: ``state_dict`` /
``load_state_dict(assign=True)``, diffusers ``save_pretrained`` (safetensors, flattened by torchao's
safetensors support, where the class is registered) and ``from_pretrained`` of the pre-quantized folder,
``.to(device)``, ``.to(dtype)`` / ``.half()`` (the codes stay; the logical dtype, in which the layer computes
its output, changes) and ``torch.compile(fullgraph=True)``.

Codes are stored ``(N, K)`` row-major, zero-padded for the kernels; split-K layers keep their input
segments side by side along K, each padded on its own (``SegLinearSpec.code_bounds``). With per-segment
SmoothQuant (``SegLinearSpec.tiled``) the output segments are blocks of rows, each padded on its own
(``SegLinearSpec.row_bounds``): block ``b`` is its own smoothed split-K sub-GEMM, the blocks' outputs concatenated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchao.utils import TorchAOBaseTensor

from segquant import LinearPlan, SegQuantError

from .forward import seg_linear
from .kernels import kernel_multiple
from .options import SegQuantOptions

aten = torch.ops.aten


def _forward_digest() -> str:
    """A digest of the modules that turn ``F.linear`` on a SegQuant weight into kernels, and of
    ``segquant.numerics``, whose ranges they read. The graph torch.compile caches is traced through them, but its
    cache key holds only the graph that calls ``F.linear`` and this tensor's hash: without the digest, a new
    version of this code would reuse graphs compiled by an older one."""
    from segquant import numerics  # the formats' ranges and the scale rules the traced code reads

    digest = hashlib.blake2b(digest_size=8)
    here = Path(__file__).parent
    for path in (here / "forward.py", here / "kernels.py", here / "triton_gemm.py", here / "tensor.py",
                 Path(numerics.__file__)):
        try:
            digest.update(path.read_bytes())
        except OSError:  # sources not on disk (a zipped install): the installed version stands in for them
            digest.update(_installed_version().encode())
    return digest.hexdigest()


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("segquant")
    except PackageNotFoundError:
        return "unknown"


FORWARD_DIGEST = _forward_digest()


def _ints(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class SegLinearSpec:
    """What a SegQuant layer computes; plain, hashable data so that ``torch.compile`` treats it as constant
    and torchao's safetensors support stores it as JSON. ``name`` is for messages only: it takes no part in
    equality, so that ``torch.compile``'s guards on the weight's metadata hold across the repeated blocks of a
    model (one compiled block serves all, as with diffusers' ``compile_repeated_blocks``)."""

    name: str = field(compare=False, repr=False)
    in_features: int
    out_features: int
    in_segments: tuple[int, ...]
    out_segments: tuple[int, ...]
    dual_segments: tuple[int, ...]
    options: SegQuantOptions = SegQuantOptions()
    shift: str | None = None
    shift_segments: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for key in ("in_segments", "out_segments", "dual_segments", "shift_segments"):  # JSON gives lists back
            object.__setattr__(self, key, _ints(getattr(self, key)))
        if isinstance(self.options, dict):
            object.__setattr__(self, "options", SegQuantOptions(**self.options))

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        """``(lo, hi)`` of each input segment in the layer's input."""
        edges = [0]
        for size in self.in_segments:
            edges.append(edges[-1] + size)
        return tuple(zip(edges, edges[1:]))

    @property
    def folded(self) -> bool:
        return self.options.activation == "static" and self.options.realisation == "folded"

    @property
    def code_bounds(self) -> tuple[tuple[int, int], ...]:
        """``(lo, hi)`` of each input segment's codes in ``qdata`` (split-K: each segment padded on its own)."""
        multiple = kernel_multiple(self.options.precision)
        if self.folded:
            return ((0, -(-self.in_features // multiple) * multiple),)
        edges = [0]
        for size in self.in_segments:
            edges.append(edges[-1] + -(-size // multiple) * multiple)
        return tuple(zip(edges, edges[1:]))

    @property
    def smoothed(self) -> bool:
        return self.options.smoothquant_alpha is not None

    @property
    def tiled(self) -> bool:
        """Per-segment SmoothQuant (``SegQuantOptions.smoothing``): each output segment is a block with its own
        factors, activation scales and one weight scale per input segment (per row and input segment)."""
        return self.smoothed and self.options.smoothing == "per_segment"

    @property
    def blocks(self) -> tuple[int, ...]:
        """The row count of each block: the output segments when ``tiled``, else the whole layer."""
        return self.out_segments if self.tiled else (self.out_features,)

    @property
    def row_bounds(self) -> tuple[tuple[int, int], ...]:
        """``(lo, hi)`` of each block's rows in ``qdata`` (each block padded on its own for the kernel)."""
        multiple = kernel_multiple(self.options.precision)
        edges = [0]
        for size in self.blocks:
            edges.append(edges[-1] + -(-size // multiple) * multiple)
        return tuple(zip(edges, edges[1:]))

    def layer(self) -> LinearPlan:
        return LinearPlan(self.in_features, self.out_features, self.in_segments, self.out_segments,
                          dual_scale=bool(self.dual_segments), dual_scale_segments=self.dual_segments,
                          shift=self.shift, shift_segments=self.shift_segments, name=self.name)


class SegQuantTensor(TorchAOBaseTensor):
    """The quantized weight of one SegQuant Linear (logical shape ``(out_features, in_features)``).

    Tensor data:
        qdata: ``(N_pad, K_pad)`` fp8 e4m3 or int8 weight codes.
        weight_scale: ``(1, N_pad)`` float32 per-row weight scales, or ``(1, 1)`` for a weight with one scale
            (``linear.tensorwise``); per-segment SmoothQuant (``spec.tiled``): ``(S, N_pad)``, row ``i`` the
            scales of input segment ``i``.
        act_scale, neg_scale: static split-K: per input segment, the activation scale (``s+`` on DualScale
            segments) and, with DualScale, the negative-side scale ``s-``; ``(B, S)`` when tiled (one row per block).
        smooth: SmoothQuant factors ``(K,)`` multiplied into the input (split-K and dynamic); ``(B, K)`` when tiled.
        col_scale: static folded: the ``(K,)`` input divisor (segment scales and SmoothQuant folded in); with
            DualScale also neg_ratio (``s- / s+`` per segment) and dual_mask (the DualScale columns).
        col_inv: ``1 / col_scale``, what the folded layer multiplies its input by (derived from ``col_scale`` when
            not given): ``(1,)`` where every column has the same divisor. A multiplication by one value lets the
            kernel that produces the input quantize it without a division and a per-column load per element
            (benchmarks/results/quantize_epilogue.md); the product is within one float32 rounding of ``x / col_scale``,
            so the codes are the dividing ones except at rounding ties (0-2 in a million, one step apart).
        center: the activation shift ``(K,)``, subtracted where the input is quantized: from ``x * smooth``
            (split-K, dynamic) or, in code units, from ``x / col_scale`` (folded). The layer's bias holds
            ``b + gemm_weight() @ center`` (``linear.convert_linear``).
    Only what the realisation reads is stored: each inner tensor is a graph input and a guard under compile.
    Attributes:
        spec: the layer's ``SegLinearSpec``.
        dtype: the logical (output) dtype.
    """

    tensor_data_names = ["qdata", "weight_scale"]
    tensor_attribute_names = ["spec", "dtype"]
    optional_tensor_data_names = ["act_scale", "neg_scale", "neg_ratio", "smooth", "col_scale", "dual_mask", "center",
                                  "col_inv"]

    def __new__(cls, qdata: Tensor, weight_scale: Tensor, spec: SegLinearSpec, dtype: torch.dtype,
                act_scale: Tensor | None = None, neg_scale: Tensor | None = None, neg_ratio: Tensor | None = None,
                smooth: Tensor | None = None, col_scale: Tensor | None = None, dual_mask: Tensor | None = None,
                center: Tensor | None = None, col_inv: Tensor | None = None):
        shape = (spec.out_features, spec.in_features)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device,
                                                   requires_grad=False)

    def __init__(self, qdata: Tensor, weight_scale: Tensor, spec: SegLinearSpec, dtype: torch.dtype,
                 act_scale: Tensor | None = None, neg_scale: Tensor | None = None, neg_ratio: Tensor | None = None,
                 smooth: Tensor | None = None, col_scale: Tensor | None = None,
                 dual_mask: Tensor | None = None, center: Tensor | None = None, col_inv: Tensor | None = None) -> None:
        super().__init__()
        self.qdata, self.weight_scale = qdata, weight_scale
        self.spec = spec if isinstance(spec, SegLinearSpec) else SegLinearSpec(**spec)
        self.act_scale, self.neg_scale, self.neg_ratio = act_scale, neg_scale, neg_ratio
        self.smooth, self.col_scale, self.dual_mask, self.center = smooth, col_scale, dual_mask, center
        if col_scale is not None and col_inv is None:  # weights saved before col_inv was stored
            col_inv = column_multiplier(col_scale, self.spec)
        self.col_inv = col_inv

    def __repr__(self) -> str:
        s = self.spec
        return (f"SegQuantTensor({s.options.precision}, activation={s.options.activation}, "
                f"realisation={s.options.realisation}, smoothing={s.options.smoothing}, "
                f"in_segments={list(s.in_segments)}, out_segments={list(s.out_segments)}, "
                f"dual={list(s.dual_segments)}, shift={s.shift}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"device={self.device})")

    def _stable_hash_for_caching(self) -> str:
        """What AOT autograd's cache keys on: the spec, the logical dtype, the inner tensors' metadata and the
        source of the code that computes the layer (``FORWARD_DIGEST``)."""
        names, _ = self.__tensor_flatten__()
        inner = [f"{n}:{tuple(getattr(self, n).shape)}:{getattr(self, n).dtype}:{getattr(self, n).stride()}"
                 for n in names]
        text = "|".join([repr(self.spec), str(self.dtype), str(self.device.type), FORWARD_DIGEST, *inner])
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def segment_codes(self, i: int, block: int = 0) -> Tensor:
        """The ``(N_pad, K_i_pad)`` codes of input segment ``i`` (a view); when tiled, those of ``block``'s rows."""
        lo, hi = self.spec.code_bounds[i]
        if not self.spec.tiled:
            return self.qdata[:, lo:hi]
        top, bottom = self.spec.row_bounds[block]
        return self.qdata[top:bottom, lo:hi]

    def segment_weight_scale(self, i: int, block: int = 0) -> Tensor:
        """The weight scales the GEMM of input segment ``i`` (of ``block``, when tiled) takes: ``(1, rows)``, or
        ``(1, 1)`` for a one-scale weight or a per-tensor tile whose GEMM takes a scalar (``linear.tensorwise``'s
        rule: not DualScale, not the Triton kernels)."""
        s = self.spec
        if not s.tiled:
            return self.weight_scale
        top, bottom = s.row_bounds[block]
        if s.options.weight_granularity == "per_tensor" and i not in s.dual_segments and s.options.kernel == "naive":
            bottom = top + 1  # the tile's rows share one scale
        return self.weight_scale[i:i + 1, top:bottom]

    def block_scales(self, block: int = 0) -> tuple[Tensor | None, Tensor | None]:
        """``(act_scale, neg_scale)`` per input segment of ``block`` (static split-K; None where not stored)."""
        if not self.spec.tiled:
            return self.act_scale, self.neg_scale
        return self.act_scale[block], None if self.neg_scale is None else self.neg_scale[block]

    def row_scales(self) -> Tensor:
        """The ``(N,)`` weight scale of every output row (a one-scale weight's scale repeated).

        Raises:
            SegQuantError: the weight is tiled (a scale per row and input segment: ``segment_weight_scale``).
        """
        n = self.spec.out_features
        if self.spec.tiled:
            raise SegQuantError(f"{self.spec.name}: per-segment SmoothQuant has one weight scale per row and input "
                                "segment; read them with segment_weight_scale")
        scales = self.weight_scale.reshape(-1)
        return scales.expand(n) if scales.numel() == 1 else scales[:n]

    def gemm_weight(self) -> Tensor:
        """The ``(N, K)`` float32 weight the GEMM multiplies the quantized input with: codes times weight scales,
        in the smoothed (split-K; when tiled, each block's rows in its own) or folded input space. ``W_hat`` of the
        shift's bias ``b + W_hat c``."""
        s = self.spec
        if s.folded:
            return self.qdata[:s.out_features, :s.in_features].float() * self.row_scales().reshape(-1, 1).float()
        blocks = []
        for b, rows in enumerate(s.blocks):
            parts = []
            for i, (lo, hi) in enumerate(s.bounds):
                scale = self.segment_weight_scale(i, b).reshape(-1).float()
                scale = scale.expand(rows) if scale.numel() == 1 else scale[:rows]
                parts.append(self.segment_codes(i, b)[:rows, :hi - lo].float() * scale[:, None])
            blocks.append(torch.cat(parts, dim=1))
        return torch.cat(blocks, dim=0)

    def dequantize(self, output_dtype: torch.dtype | None = None) -> Tensor:
        """The float weight these codes stand for (what the layer multiplies, undoing folding and smoothing)."""
        s = self.spec
        w = self.gemm_weight()
        if s.folded:
            w = w / self.col_scale.float()
        elif s.tiled:
            w = w * torch.repeat_interleave(self.smooth.float(), torch.tensor(s.blocks, device=w.device), dim=0)
        elif self.smooth is not None:
            w = w * self.smooth.float()
        return w.to(output_dtype or self.dtype)


def uniform_columns(spec: SegLinearSpec) -> bool:
    """Whether a folded layer divides every input column by the same value: one input segment and no SmoothQuant
    (``segquant.numerics.fold_activation_scales``). Decided by the spec, never by the values, so that the shape of
    ``col_inv`` is the same for every calibration and every repeated block (one compiled graph serves all)."""
    return len(spec.in_segments) == 1 and not spec.smoothed


def column_multiplier(col_scale: Tensor, spec: SegLinearSpec) -> Tensor:
    """``1 / col_scale`` in float32: ``(1,)`` when ``uniform_columns(spec)``, else ``(K,)``."""
    inv = 1.0 / col_scale.float().reshape(-1)
    return inv[:1].clone() if uniform_columns(spec) else inv


implements = SegQuantTensor.implements
implements_torch_function = SegQuantTensor.implements_torch_function


@implements(aten.linear.default)
@implements_torch_function(torch.nn.functional.linear)
def _(func, types, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return seg_linear(x, weight, bias)


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    """``.to(device)`` moves every tensor; ``.to(dtype)`` changes the logical dtype and keeps codes and scales."""
    self = args[0]
    to = self._get_to_kwargs(*args[1:], **kwargs)
    device, dtype = to["device"], to.get("dtype", self.dtype)
    if not dtype.is_floating_point or dtype.itemsize == 1:
        raise SegQuantError(f"{self.spec.name}: a SegQuant weight computes in float32, float16 or bfloat16; "
                            f"it cannot become {dtype} (its codes are already {self.qdata.dtype})")
    moved = {name: getattr(self, name) for name in self.tensor_data_names + self.optional_tensor_data_names}
    moved = {k: (v.to(device, non_blocking=to.get("non_blocking", False)) if v is not None else None)
             for k, v in moved.items()}
    return SegQuantTensor(spec=self.spec, dtype=dtype, **moved)


def register_safetensors() -> None:
    """Let torchao's safetensors support (used by diffusers ``save_pretrained``/``from_pretrained``) store and
    rebuild ``SegQuantTensor``: its name and attribute classes join torchao's allow-lists."""
    try:
        from torchao.prototype.safetensors import safetensors_utils as st
    except ImportError:  # pragma: no cover - torchao without safetensors support
        return
    for cls in (SegQuantTensor, SegLinearSpec, SegQuantOptions):
        st.ALLOWED_CLASSES.setdefault(cls.__name__, cls)
    if SegQuantTensor.__name__ not in st.ALLOWED_TENSORS_SUBCLASSES:
        st.ALLOWED_TENSORS_SUBCLASSES.append(SegQuantTensor.__name__)

