"""Graph analysis: find SegLinear segments and DualScale inputs in a captured graph -> ``SegQuantPlan``.

Walks backwards from every Linear input (``cat``/``stack``/head-merge -> input segments; SiLU, GELU,
GEGLU/SwiGLU gates -> DualScale) and forwards from every Linear output (``chunk``/``split``/``unbind``
on the feature dim -> output segments), through ops that keep the feature (last) dim intact. A Linear
whose output becomes a graph output through layout-only ops is the model's output layer: it stays in high
precision (``AnalysisOptions.keep_output_layer``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

from torch import nn

from .capture import OpGraph, OpNode, capture
from .errors import GraphAnalysisError, SegQuantError
from .plan import LinearPlan, SegQuantPlan

logger = logging.getLogger(__name__)

TRANSPARENT = frozenset({
    "to", "_to_copy", "type_as", "float", "half", "bfloat16", "double", "contiguous", "clone", "dropout",
    "feature_dropout", "alpha_dropout", "alias", "detach", "identity", "lift_fresh_copy", "_to_dtype",
    "to_dtype", "to_dtype_layout", "cpu", "cuda",
})
VIEWS = frozenset({"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
                   "expand", "view_as", "reshape_as", "expand_as"})
PERMUTES = frozenset({"permute", "transpose", "swapaxes", "swapdims", "movedim"})
SPLITS = frozenset({"chunk", "split", "split_with_sizes", "unbind", "unsafe_split", "unsafe_chunk",
                    "split_copy"})
ELEMENTWISE = frozenset({"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"})
ACTIVATIONS = {"silu": "silu", "silu_": "silu", "gelu": "gelu", "gelu_": "gelu"}
LAYOUT_ONLY = TRANSPARENT | VIEWS | PERMUTES | SPLITS | frozenset({"getitem", "index", "slice", "select", "narrow"})
"""Ops that move, cast or select values without combining them (plus single-operand permuting ``einsum``):
a Linear whose result reaches a graph output through these alone is the model's output layer."""
MAX_WALK = 64


@dataclass(frozen=True)
class AnalysisOptions:
    """Options of ``analyze``.

    Args:
        capture: ``"auto"`` (torch.export, eager trace on failure), ``"export"`` or ``"eager"``.
        seg_linear: detect input/output segments.
        dual_scale: detect activation-fed inputs.
        head_segments: treat attention heads merged before a Linear (``attn.to_out.0``) as one input
            segment per head, as the paper's reference code does. Off by default: every attention
            output projection would get one activation scale per head.
        keep_output_layer: the model's output projection stays in high precision, as ModelOpt's diffusers
            recipes and the paper's deployments keep it: a Linear whose result reaches a graph output through
            layout-only ops (reshape, permute, casts, indexing) is planned with ``high_precision=True`` and
            the pattern ``"linear->output"``. Default True.
        nested_segments: segments inside a concatenated input (attention heads merged before a ``cat``, a stack)
            are kept. False: each input of a concatenation is one segment, as the paper's reference code has it
            (``segquant.reference_mode``). Default True.
    """

    capture: str = "auto"
    seg_linear: bool = True
    dual_scale: bool = True
    head_segments: bool = False
    keep_output_layer: bool = True
    nested_segments: bool = True


@dataclass
class _Piece:
    size: int
    activation: str | None = None
    patterns: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)


def _norm(dim: Any, ndim: int) -> int | None:
    if not isinstance(dim, int) or ndim == 0:
        return None
    return dim + ndim if dim < 0 else dim


def _src(node: OpNode) -> OpNode | None:
    """The tensor an op works on: its first argument, positional or keyword."""
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    return first if isinstance(first, OpNode) else None


def _dim_arg(node: OpNode, index: int, default: Any = 0) -> Any:
    """The ``dim`` argument (also spelled ``axis``) at position ``index``."""
    if "axis" in node.kwargs:
        return node.kwargs["axis"]
    return node.arg(index, "dim", default)


def _split_dim(node: OpNode) -> int | None:
    src = _src(node)
    if src is None or src.shape is None:
        return None
    return _norm(_dim_arg(node, 1 if node.op == "unbind" else 2), src.ndim)


def _basic_index(node: OpNode) -> list[tuple] | None:
    """Eager ``tensor[key]`` with basic indexing as one entry per source dim plus ``("new",)`` for None:
    ``("full",)``, ``("int", i)`` or ``("slice", start, stop)``; None for advanced or strided indexing."""
    src = _src(node)
    key = node.arg(1, "key") if len(node.args) > 1 else None
    if src is None or src.shape is None:
        return None
    key = key if isinstance(key, tuple) else (key,)
    if any(isinstance(k, bool) or not (k is None or k is Ellipsis or isinstance(k, (int, slice))) for k in key):
        return None
    real = sum(1 for k in key if k is not None and k is not Ellipsis)
    if real > src.ndim or sum(1 for k in key if k is Ellipsis) > 1:
        return None
    entries: list[tuple] = []
    for k in key:
        if k is Ellipsis:
            entries += [("full",)] * (src.ndim - real)
        elif k is None:
            entries.append(("new",))
        elif isinstance(k, int):
            entries.append(("int", k))
        elif k.step not in (None, 1) or not all(b is None or isinstance(b, int) for b in (k.start, k.stop)):
            return None
        elif k.start in (None, 0) and k.stop is None:
            entries.append(("full",))
        else:
            entries.append(("slice", k.start, k.stop))
    if not any(k is Ellipsis for k in key):
        entries += [("full",)] * (src.ndim - real)
    return entries


def _range(size: int, start: Any, end: Any) -> tuple[int, int] | None:
    """``[start, end)`` of a slice along a dim of ``size``, with negative and open bounds resolved."""
    start = 0 if start is None else start
    end = size if end is None else end
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    start, end = (b + size if b < 0 else b for b in (start, end))
    return max(0, min(start, size)), max(0, min(end, size))


def _split_sizes(node: OpNode) -> list[int] | None:
    """Sizes along the split dim of each output of a chunk/split/unbind op."""
    src, dim = _src(node), _split_dim(node)
    if src is None or dim is None:
        return None
    total = src.shape[dim]
    if node.op == "unbind":
        return [1] * total
    if node.op in ("chunk", "unsafe_chunk"):
        n = node.arg(1, "chunks")
        if not isinstance(n, int) or n <= 0:
            return None
        step = math.ceil(total / n)
        return [min(step, total - i) for i in range(0, total, step)]
    sizes = node.arg(1, "split_size", node.arg(1, "split_sizes"))
    if isinstance(sizes, int):
        return [min(sizes, total - i) for i in range(0, total, sizes)]
    if isinstance(sizes, (list, tuple)) and all(isinstance(s, int) for s in sizes):
        return list(sizes)
    return None


def _permutation(node: OpNode) -> list[int] | None:
    src = _src(node)
    if src is None or src.shape is None:
        return None
    ndim = src.ndim
    if node.op == "permute":
        dims = node.args[1:]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        dims = node.kwargs.get("dims", dims)
        perm = [_norm(d, ndim) for d in dims]
        return perm if len(perm) == ndim and None not in perm else None
    if node.op in ("transpose", "swapaxes", "swapdims"):
        a, b = _norm(node.arg(1, "dim0"), ndim), _norm(node.arg(2, "dim1"), ndim)
        if a is None or b is None:
            return None
        perm = list(range(ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    return None


def _keeps_last_dim(node: OpNode) -> OpNode | None:
    """The node's tensor input if the node leaves every row of the last dim intact, else None."""
    src = _src(node)
    if node.op == "getitem":
        multi = src
        if multi is None or multi.op not in SPLITS:
            return None
        inner = _src(multi)
        dim = _split_dim(multi)
        if inner is None or dim is None or dim == inner.ndim - 1 or multi.op == "unbind":
            return None
        return inner
    if src is None or src.shape is None or node.shape is None or not node.shape or not src.shape:
        return None
    if node.op in TRANSPARENT:
        return src if node.shape == src.shape else None
    if node.shape[-1] != src.shape[-1]:
        return None
    if node.op in VIEWS:
        return src
    if node.op in PERMUTES:
        perm = _permutation(node)
        return src if perm is not None and perm[-1] == src.ndim - 1 else None
    if node.op in ("slice", "select", "narrow"):
        dim = _norm(_dim_arg(node, 1), src.ndim)
        return src if dim is not None and dim != src.ndim - 1 else None
    if node.op == "index":  # eager tensor[key]: basic indexing that leaves the last dim whole
        entries = _basic_index(node)
        if not entries:
            return None
        real = [e for e in entries if e[0] != "new"]
        return src if real[-1] == ("full",) and entries[-1] != ("new",) else None
    return None


def _skip_back(node: OpNode) -> OpNode:
    for _ in range(MAX_WALK):
        prev = _keeps_last_dim(node)
        if prev is None:
            return node
        node = prev
    return node


def _skip_back_views(node: OpNode) -> OpNode:
    """Like ``_skip_back`` but also through reshapes and permutes: for DualScale only the values matter."""
    for _ in range(MAX_WALK):
        prev = _keeps_last_dim(node)
        if prev is None and node.op in VIEWS | PERMUTES and _src(node) is not None:
            prev = _src(node)
        if prev is None:
            return node
        node = prev
    return node


def _activation(node: OpNode) -> str | None:
    act = ACTIVATIONS.get(node.op)
    if act == "gelu" and node.arg(1, "approximate", "none") == "tanh":
        return "gelu_tanh"
    return act


def _glu(node: OpNode) -> str | None:
    """'geglu'/'swiglu' if node is ``x * act(gate)`` with x and gate of the same shape."""
    if node.op not in ("mul", "mul_") or len(node.tensor_args()) != 2:
        return None
    a, b = node.tensor_args()
    if a.shape != b.shape or a.shape != node.shape:
        return None
    for operand in (a, b):
        act = _activation(_skip_back(operand))
        if act is not None:
            return "swiglu" if act == "silu" else "geglu"
    return None


def _merged_heads(node: OpNode) -> tuple[OpNode, int, int] | None:
    """(input, count, size) if node reshapes (..., count, size) into (..., count*size)."""
    src = _src(node)
    if node.op not in VIEWS or src is None or not src.shape or not node.shape:
        return None
    last, inner = node.shape[-1], src.shape[-1]
    if last <= inner or inner == 0 or last % inner:
        return None
    for j in range(src.ndim - 1, -1, -1):
        if math.prod(src.shape[j:]) == last:
            if math.prod(src.shape[:j]) == math.prod(node.shape[:-1]):
                return src, last // inner, inner
            return None
    return None


def _input_pieces(node: OpNode, options: AnalysisOptions, depth: int = 0) -> list[_Piece]:
    """The input segments of the tensor produced by ``node`` (one piece = unsegmented)."""
    source = _skip_back(node)
    size = node.shape[-1] if node.shape else 0
    if depth > 8:
        return [_Piece(size)]
    if options.dual_scale:
        act_source = _skip_back_views(node)
        act = _activation(act_source) or _glu(act_source)
        if act is not None:
            return [_Piece(size, act, ["act->linear"], [act_source.name])]
    if not options.seg_linear:
        return [_Piece(size)]
    if source.op == "cat":
        tensors = source.arg(0, "tensors")
        dim = _norm(_dim_arg(source, 1), source.ndim)
        if isinstance(tensors, (list, tuple)):
            tensors = [t for t in tensors if isinstance(t, OpNode) and t.shape and t.shape[-1] > 0]
        if dim == source.ndim - 1 and isinstance(tensors, list) and len(tensors) > 1:
            pieces = []
            for t in tensors:
                inner = _input_pieces(t, options, depth + 1)
                if not options.nested_segments and len(inner) > 1:
                    inner = [_Piece(sum(p.size for p in inner))]
                for p in inner:
                    if p.activation:
                        p.patterns = ["act->cat->linear"]
                    pieces.append(p)
            for p in pieces:
                p.patterns = ["cat->linear", *p.patterns]
                p.nodes = [source.name, *p.nodes]
            return pieces
    merged = _merged_heads(source)
    if merged is not None:
        inner, count, inner_size = merged
        stack = _skip_back(inner)
        tensors = stack.arg(0, "tensors") if stack.op == "stack" else None
        if (stack.op == "stack" and _norm(_dim_arg(stack, 1), stack.ndim) == stack.ndim - 2
                and isinstance(tensors, (list, tuple)) and len(tensors) == count == inner.shape[-2]):
            pieces = [p for t in tensors for p in _input_pieces(t, options, depth + 1)]
            for p in pieces:
                p.patterns = ["stack->linear", *(["act->cat->linear"] if p.activation else [])]
                p.nodes = [stack.name, *p.nodes]
            return pieces
        if options.head_segments and count > 1:
            return [_Piece(inner_size, None, ["reshape->linear"], [source.name]) for _ in range(count)]
    return [_Piece(size)]


def _is_constant(value: Any) -> bool:
    """True for Python scalars and tensors derived from parameters/buffers only."""
    if not isinstance(value, OpNode):
        return True
    for _ in range(MAX_WALK):
        if value.op == "param":
            return True
        args = value.tensor_args()
        if len(args) != 1:
            return False
        value = args[0]
    return False


class _Frame(NamedTuple):
    """One step of the forward walk: dims ``outer``.. of ``node`` hold the N features, with the outermost
    factor (``n_outer`` values, each a contiguous range of N // n_outer) at ``outer``; ``contiguous`` is
    False once a permute has reordered the dims inside the feature block."""

    node: OpNode
    outer: int
    n_outer: int
    contiguous: bool


@dataclass
class _Boundaries:
    """What the forward walk from one Linear's output found, and the frames it has still to visit."""

    n_out: int
    stack: list[_Frame]
    cuts: set[int] = field(default_factory=set)
    patterns: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def found(self, pattern: str, user: OpNode) -> None:
        self.patterns.append(pattern)
        self.names.append(user.name)


_Handler = Callable[[_Boundaries, _Frame, OpNode], None]
_OUTPUT_HANDLERS: dict[str, _Handler] = {}
"""Op name -> how the forward walk goes through (or cuts at) a user of the Linear's output."""


def _follows(*op_sets: Iterable[str]) -> Callable[[_Handler], _Handler]:
    """Register a handler of the forward walk for every op in ``op_sets``."""
    def register(handler: _Handler) -> _Handler:
        for op in (op for ops in op_sets for op in ops):
            assert op not in _OUTPUT_HANDLERS, f"two output-walk handlers for {op}"
            _OUTPUT_HANDLERS[op] = handler
        return handler
    return register


@_follows(TRANSPARENT)
def _through_transparent(walk: _Boundaries, frame: _Frame, user: OpNode) -> None:
    if user.shape == frame.node.shape and _src(user) is frame.node:
        walk.stack.append(frame._replace(node=user))


@_follows(ELEMENTWISE)
def _through_elementwise(walk: _Boundaries, frame: _Frame, user: OpNode) -> None:
    """``y = x op c`` with a constant ``c`` keeps the features where they were (broadcasting may add dims)."""
    node, outer = frame.node, frame.outer
    if user.shape is None:
        return
    others = [a for a in user.args[:2] if a is not node]
    shift = user.ndim - node.ndim
    if (len(others) == 1 and _is_constant(others[0]) and shift >= 0
            and user.shape[outer + shift:] == node.shape[outer:]):
        walk.stack.append(frame._replace(node=user, outer=outer + shift))


@_follows(VIEWS)
def _through_view(walk: _Boundaries, frame: _Frame, user: OpNode) -> None:
    """A reshape of a contiguous feature block: the first dim where the N features start is the new outer."""
    node = frame.node
    if not (frame.contiguous and _src(user) is node and user.shape):
        return
    lead = math.prod(node.shape[:frame.outer])
    for k in range(user.ndim):
        if (math.prod(user.shape[k:]) == walk.n_out and math.prod(user.shape[:k]) == lead
                and (user.shape[k] > 1 or k == user.ndim - 1)):
            walk.stack.append(_Frame(user, k, user.shape[k], True))
            break


@_follows(PERMUTES)
def _through_permute(walk: _Boundaries, frame: _Frame, user: OpNode) -> None:
    perm = _permutation(user) if _src(user) is frame.node else None
    if perm is not None:
        new_outer = perm.index(frame.outer)
        still = frame.contiguous and perm[new_outer:] == list(range(frame.outer, frame.node.ndim))
        walk.stack.append(_Frame(user, new_outer, frame.n_outer, still))


@_follows(SPLITS)
def _at_split(walk: _Boundaries, frame: _Frame, user: OpNode) -> None:
    """A split on the outer feature dim cuts the output; one on an earlier dim is walked through."""
    if _src(user) is not frame.node:
        return
    dim, sizes = _split_dim(user), _split_sizes(user)
    if dim is None or sizes is None:
        return
    if dim == frame.outer and len(sizes) > 1:
        unit = walk.n_out // frame.n_outer
        offset = 0
        for s in sizes[:-1]:
            offset += s * unit
            walk.cuts.add(offset)
        walk.found({"unbind": "linear->unbind", "chunk": "linear->chunk"}.get(user.op, "linear->split"), user)
    elif dim < frame.outer:
        for item in user.users:
            if item.op == "getitem":
                walk.stack.append(frame._replace(node=item, outer=frame.outer - (user.op == "unbind")))


@_follows(("select", "slice", "narrow", "index"))
def _at_index(walk: _Boundaries, frame: _Frame, user: OpNode) -> None:
    """A slice of the outer feature dim cuts the output at its bounds; indexing other dims is walked through."""
    node, outer = frame.node, frame.outer
    entries = _index_entries(user, node.ndim) if _src(user) is node else None
    if entries is None:
        return
    at = next((e for e in entries if e[0] == outer), None)
    later = [e for e in entries if e[0] is not None and e[0] > outer]
    if at is None or any(e[2] != ("full",) for e in later):
        return
    if at[2] == ("full",):
        if all(e[1] is not None for e in later) and not any(
                e[0] is None and e[1] is not None and e[1] > at[1] for e in entries):
            walk.stack.append(frame._replace(node=user, outer=at[1]))
        return
    size = node.shape[outer]
    bounds = (_range(size, at[2][1], at[2][1] + 1 if at[2][1] != -1 else None)
              if at[2][0] == "int" else _range(size, at[2][1], at[2][2]))
    if bounds is not None:
        unit = walk.n_out // frame.n_outer
        walk.cuts.update(b * unit for b in bounds if 0 < b < size)
        walk.found("linear->split", user)


def _output_boundaries(linear: OpNode) -> tuple[set[int], list[str], list[str]]:
    """Feature offsets at which users of a Linear's output split it, with patterns and node names."""
    n_out = linear.shape[-1]
    walk = _Boundaries(n_out, [_Frame(linear, linear.ndim - 1, n_out, True)])
    seen = 0
    while walk.stack and seen < 4 * MAX_WALK:
        frame = walk.stack.pop()
        seen += 1
        for user in frame.node.users:
            if user.shape is not None and not user.shape and user.op not in SPLITS:
                continue
            handler = _OUTPUT_HANDLERS.get(user.op)
            if handler is not None:
                handler(walk, frame, user)
    return walk.cuts, walk.patterns, walk.names


def _permuting_einsum(node: OpNode, src: OpNode) -> bool:
    """True for ``einsum("nhwpqc->nchpwq", src)``: one operand whose dims are only reordered."""
    equation = node.arg(0, "equation")
    if node.tensor_args() != [src] or not isinstance(equation, str) or equation.count("->") != 1:
        return False
    lhs, rhs = (side.replace(" ", "").replace("...", "") for side in equation.split("->"))
    return "," not in lhs and len(set(lhs)) == len(lhs) and sorted(lhs) == sorted(rhs)


def _moves_values(user: OpNode, node: OpNode) -> bool:
    """True if ``user`` only moves, casts or selects the values of ``node`` (never combines them)."""
    if user.op == "einsum":
        return _permuting_einsum(user, node)
    return user.op in LAYOUT_ONLY and _src(user) is node


def _output_reached(linear: OpNode, outputs: frozenset[OpNode]) -> OpNode | None:
    """The graph output that ``linear``'s result becomes through layout-only ops, or None."""
    stack, seen = [linear], set()
    while stack and len(seen) < 4 * MAX_WALK:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in outputs:
            return node
        stack.extend(user for user in node.users if _moves_values(user, node))
    return None


def _index_entries(node: OpNode, ndim: int) -> list[tuple] | None:
    """``(source dim, output dim, entry)`` for select/slice/narrow/eager-index ops; None if unknown."""
    if node.op == "index":
        entries = _basic_index(node)
    else:
        dim = _norm(_dim_arg(node, 1), ndim)
        if dim is None:
            return None
        if node.op == "select":
            entry = ("int", node.arg(2, "index"))
        elif node.op == "narrow":
            start, length = node.arg(2, "start"), node.arg(3, "length")
            if not isinstance(start, int) or not isinstance(length, int):
                return None
            start = start + node.args[0].shape[dim] if start < 0 else start
            entry = ("slice", start, start + length)
        else:
            if node.arg(4, "step", 1) not in (None, 1):
                return None
            entry = ("slice", node.arg(2, "start"), node.arg(3, "end"))
        entries = [("full",)] * dim + [entry] + [("full",)] * (ndim - dim - 1)
    if entries is None:
        return None
    out, src_dim, out_dim = [], 0, 0
    for e in entries:
        if e[0] == "new":
            out.append((None, out_dim, e))
            out_dim += 1
        elif e[0] == "int":
            out.append((src_dim, None, e))
            src_dim += 1
        else:
            out.append((src_dim, out_dim, e))
            src_dim += 1
            out_dim += 1
    return out


def _sizes_from_cuts(cuts: set[int], total: int) -> tuple[int, ...]:
    bounds = [0, *sorted(c for c in cuts if 0 < c < total), total]
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def _plan_linear(name: str, module: nn.Linear, calls: list[OpNode], options: AnalysisOptions,
                 outputs: frozenset[OpNode] = frozenset()) -> LinearPlan:
    per_call = []
    for call in calls:
        x = call.arg(0, "input")
        pieces = _input_pieces(x, options) if isinstance(x, OpNode) else [_Piece(module.in_features)]
        if sum(p.size for p in pieces) != module.in_features:
            logger.warning("%s: input segments %s do not sum to in_features %d; left unsegmented",
                           name, [p.size for p in pieces], module.in_features)
            pieces = [_Piece(module.in_features)]
        cuts, out_patterns, out_nodes = _output_boundaries(call) if options.seg_linear else (set(), [], [])
        per_call.append((pieces, cuts, out_patterns, out_nodes))
    if not per_call:
        return LinearPlan(module.in_features, module.out_features, name=name)

    first = per_call[0][0]
    key = lambda ps: [(p.size, p.activation) for p in ps]  # noqa: E731
    if any(key(ps) != key(first) for ps, *_ in per_call[1:]):
        logger.warning("%s is called %d times with different input structure; its inputs stay unsegmented",
                       name, len(per_call))
        first = [_Piece(module.in_features)]
    cuts = set().union(*(c for _, c, _, _ in per_call))
    patterns = [pat for p in first for pat in p.patterns] + [pat for *_, ps, _ in per_call for pat in ps]
    nodes = [n for p in first for n in p.nodes] + [n for *_, ns in per_call for n in ns]
    reached = []
    if options.keep_output_layer:
        reached = [out for out in (_output_reached(call, outputs) for call in calls) if out is not None]
    if reached:
        logger.debug("%s is the model's output layer (%s); kept in high precision", name, reached[0].name)
        patterns.append("linear->output")
        nodes += [out.name for out in reached]
    dual = [i for i, p in enumerate(first) if p.activation]
    return LinearPlan(
        in_features=module.in_features,
        out_features=module.out_features,
        in_segments=tuple(p.size for p in first),
        out_segments=_sizes_from_cuts(cuts, module.out_features),
        dual_scale=bool(dual),
        dual_scale_segments=tuple(dual),
        activation=next((first[i].activation for i in dual), None),
        patterns=tuple(dict.fromkeys(patterns)),
        nodes=tuple(dict.fromkeys(nodes)),
        high_precision=bool(reached),
        name=name,
    )


def plan_from_graph(model: nn.Module, graph: OpGraph, options: AnalysisOptions | None = None) -> SegQuantPlan:
    """Build the plan of ``model`` from an already captured graph."""
    options = options or AnalysisOptions()
    outputs = frozenset(graph.outputs)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            calls = graph.linear_calls.get(name, [])
            if not calls:
                logger.debug("%s is not called in the example forward pass; planned as plain", name)
            layers[name] = _plan_linear(name, module, calls, options, outputs)
    plan = SegQuantPlan(layers=layers, model_class=type(model).__name__, capture=graph.capture)
    logger.info("planned %s (graph captured with %s)", plan.summary(), graph.capture)
    return plan


def analyze(model: nn.Module, *example_args: Any, analysis_options: AnalysisOptions | None = None,
            **example_kwargs: Any) -> SegQuantPlan:
    """Analyse ``model``'s computation graph into a ``SegQuantPlan``.

    The model is traced on the example inputs (which may live on the ``meta`` device) with
    ``torch.export.export(strict=False)``, falling back to an eager trace; ``plan.capture`` says
    which path was used. The model is left as it was (parameters, buffers, train/eval mode).

    Example:
        >>> plan = segquant.analyze(transformer, **segquant.example_inputs(transformer))
        >>> print(plan)

    Raises:
        SegQuantError: ``model`` is not an ``nn.Module`` or has no ``nn.Linear``.
        GraphAnalysisError: neither capture path works on the example inputs.
    """
    import torch

    if not isinstance(model, nn.Module):
        raise SegQuantError(f"analyze() expects a torch.nn.Module, got {type(model).__name__}")
    options = analysis_options or AnalysisOptions()
    if not isinstance(options, AnalysisOptions):
        raise SegQuantError(f"analysis_options must be an AnalysisOptions, got {type(options).__name__}")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise SegQuantError(f"{type(model).__name__} has no nn.Linear layer: SegQuant quantizes Linear "
                            "layers only, so there is nothing to plan")
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            graph = capture(model, tuple(example_args), dict(example_kwargs), options.capture)
    finally:
        for m, training in modes.items():
            m.training = training
    if not graph.linear_calls:
        raise GraphAnalysisError(f"the captured graph of {type(model).__name__} calls none of its "
                                 "nn.Linear layers; check the example inputs")
    return plan_from_graph(model, graph, options)
