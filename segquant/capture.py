"""Capture a model's computation graph as a small op graph that graph analysis walks.

Two capture paths produce the same ``OpGraph``: ``torch.export.export(strict=False)`` (works on the
``meta`` device, so full-size models need no weights) and, when export fails, an eager trace of one
forward pass under a ``TorchFunctionMode`` that records which op produced every tensor.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.export.graph_signature import OutputKind, TensorArgument
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .errors import GraphAnalysisError

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class OpNode:
    """One op of a captured graph.

    Args:
        name: unique node name (the FX node name on the export path).
        op: canonical op name: ``"linear"``, ``"cat"``, ``"chunk"``, ``"getitem"``, ``"param"``,
            ``"input"`` ... (aten op names without overload; dunder methods lose their underscores).
        args: positional arguments; tensors are ``OpNode``s, containers keep their nesting.
        kwargs: keyword arguments, likewise.
        shape: the output shape, or None for ops returning several tensors or non-tensors.
        module: for ``linear`` ops, the name of the ``nn.Linear`` that made the call; for ``param``
            nodes, the parameter or buffer name.
        callers: names of the modules executing when the op ran, innermost first.
    """

    name: str
    op: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    shape: tuple[int, ...] | None = None
    module: str | None = None
    callers: tuple[str, ...] = ()
    users: list["OpNode"] = field(default_factory=list, repr=False)

    @property
    def ndim(self) -> int:
        return len(self.shape) if self.shape is not None else 0

    def tensor_args(self) -> list["OpNode"]:
        return [a for a in _flatten(self.args) if isinstance(a, OpNode)] + \
               [a for a in _flatten(tuple(self.kwargs.values())) if isinstance(a, OpNode)]

    def arg(self, index: int, key: str, default: Any = None) -> Any:
        """Argument by position or keyword (aten and torch functions share positions)."""
        if key in self.kwargs:
            return self.kwargs[key]
        return self.args[index] if len(self.args) > index else default

    def __repr__(self) -> str:
        return f"OpNode({self.name}: {self.op} {self.shape})"


@dataclass
class OpGraph:
    """Nodes in execution order, how they were captured, where each Linear is called, and the nodes whose
    tensors the model returns (``outputs``, in the order of the flattened return value)."""

    nodes: list[OpNode]
    capture: str
    linear_calls: dict[str, list[OpNode]]
    outputs: list[OpNode] = field(default_factory=list)


def _flatten(values: Iterable[Any]) -> Iterable[Any]:
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        else:
            yield v


def _link_users(nodes: list[OpNode]) -> None:
    for node in nodes:
        for arg in node.tensor_args():
            if node not in arg.users:
                arg.users.append(node)


def _canonical(name: str) -> str:
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith("r") and name[1:] in ("add", "sub", "mul", "truediv"):
            name = name[1:]
    return _ALIASES.get(name, name)


_ALIASES = {"truediv": "div", "getitem": "index", "concat": "cat", "concatenate": "cat",
            "multiply": "mul", "subtract": "sub", "divide": "div", "true_divide": "div"}


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _collect_linear_calls(nodes: list[OpNode], linears: dict[str, nn.Linear]) -> dict[str, list[OpNode]]:
    """Map each linear op to the nn.Linear that ran it: the innermost Linear among the op's callers
    (right for tied and parametrized weights), else the module that owns the weight parameter."""
    calls: dict[str, list[OpNode]] = {}
    for node in nodes:
        if node.op != "linear":
            continue
        owner = next((name for name in node.callers if name in linears), None)
        if owner is not None:
            node.module = owner
            calls.setdefault(owner, []).append(node)
            continue
        weight = node.arg(1, "weight")
        while isinstance(weight, OpNode) and weight.op != "param" and weight.tensor_args():
            weight = weight.tensor_args()[0]  # casts of the weight, e.g. under autocast
        if isinstance(weight, OpNode) and weight.op == "param" and weight.module:
            fqn = weight.module.rsplit(".", 1)[0] if "." in weight.module else ""
            if fqn in linears:
                node.module = fqn
                calls.setdefault(fqn, []).append(node)
                continue
        logger.debug("linear op %s does not use an nn.Linear weight; ignored", node.name)
    return calls


# ---- torch.export path ------------------------------------------------------------------------------

def _shape_of(val: Any) -> tuple[int, ...] | None:
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except (TypeError, ValueError):  # symbolic sizes
            return None
    return None


def capture_export(model: nn.Module, args: tuple, kwargs: dict) -> OpGraph:
    """Capture with ``torch.export.export(strict=False)``. Raises whatever export raises."""
    exported = torch.export.export(model, args, kwargs, strict=False)
    signature = exported.graph_signature
    param_of = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    by_fx: dict[Any, OpNode] = {}
    nodes: list[OpNode] = []

    def convert(value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            return by_fx[value]
        if isinstance(value, (list, tuple)):
            return type(value)(convert(v) for v in value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    for fx_node in exported.graph.nodes:
        if fx_node.op == "placeholder":
            node = OpNode(fx_node.name, "param" if fx_node.name in param_of else "input",
                          shape=_shape_of(fx_node.meta.get("val")), module=param_of.get(fx_node.name))
        elif fx_node.op == "call_function":
            target = fx_node.target
            if target is operator.getitem:
                op = "getitem"
            else:
                op = getattr(target, "_opname", None) or getattr(target, "__name__", str(target))
                op = _ALIASES.get(op, op) if op != "getitem" else op
            stack = fx_node.meta.get("nn_module_stack") or {}
            callers = tuple(path for path, _ in reversed(list(stack.values())) if isinstance(path, str))
            node = OpNode(fx_node.name, op, convert(tuple(fx_node.args)), convert(dict(fx_node.kwargs)),
                          shape=_shape_of(fx_node.meta.get("val")), callers=callers)
        else:
            continue
        by_fx[fx_node] = node
        nodes.append(node)
    _link_users(nodes)
    by_name = {node.name: node for node in nodes}
    outputs = [by_name[spec.arg.name] for spec in signature.output_specs
               if spec.kind == OutputKind.USER_OUTPUT and isinstance(spec.arg, TensorArgument)
               and spec.arg.name in by_name]
    return OpGraph(nodes, "export", _collect_linear_calls(nodes, _linear_modules(model)), outputs)


# ---- eager path -------------------------------------------------------------------------------------

class _Recorder(TorchFunctionMode):
    """Records, for every tensor a torch function returns, the op that produced it."""

    def __init__(self, params: dict[int, str]):
        super().__init__()
        self.params = params
        self.nodes: list[OpNode] = []
        self.by_id: dict[int, OpNode] = {}
        self.keep: list[Any] = []  # keeps tensors alive so that ids stay unique
        self.callers: list[str] = []  # names of the nn.Linear modules now running, outermost first

    def _node_for(self, tensor: torch.Tensor) -> OpNode:
        node = self.by_id.get(id(tensor))
        if node is None:
            pname = self.params.get(id(tensor))
            node = OpNode(f"{'p' if pname else 'arg'}_{len(self.nodes)}", "param" if pname else "input",
                          shape=tuple(tensor.shape), module=pname)
            self._register(tensor, node)
        return node

    def _register(self, tensor: torch.Tensor, node: OpNode) -> None:
        self.by_id[id(tensor)] = node
        self.keep.append(tensor)
        self.nodes.append(node)

    def _convert(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self._node_for(value)
        if isinstance(value, (list, tuple)):
            return type(value)(self._convert(v) for v in value) if not hasattr(value, "_fields") else value
        return value

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _canonical(getattr(func, "__name__", str(func)))
        if name in ("get", "set", "size", "dim", "numel", "item", "tolist") or not (
                isinstance(out, torch.Tensor) or
                (isinstance(out, (list, tuple)) and out and all(isinstance(o, torch.Tensor) for o in out))):
            return out
        node = OpNode(f"{name}_{len(self.nodes)}", name, self._convert(tuple(args)),
                      {k: self._convert(v) for k, v in kwargs.items()}, callers=tuple(reversed(self.callers)))
        if isinstance(out, torch.Tensor):
            node.shape = tuple(out.shape)
            self._register(out, node)
        else:
            self.nodes.append(node)
            self.keep.append(out)
            for i, item in enumerate(out):
                self._register(item, OpNode(f"getitem_{len(self.nodes)}", "getitem", (node, i),
                                            shape=tuple(item.shape)))
        return out


def capture_eager(model: nn.Module, args: tuple, kwargs: dict) -> OpGraph:
    """Capture by running one forward pass and recording every torch function call."""
    params = {id(t): n for n, t in model.named_parameters()}
    params.update({id(t): n for n, t in model.named_buffers()})
    recorder = _Recorder(params)
    handles = []

    def enter(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            recorder.callers.append(name)
        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        recorder.callers.pop()

    for name, module in _linear_modules(model).items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with recorder:
            result = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    nodes = recorder.nodes
    _link_users(nodes)
    outputs = [recorder.by_id[id(t)] for t in pytree.tree_leaves(result)
               if isinstance(t, torch.Tensor) and id(t) in recorder.by_id]
    return OpGraph(nodes, "eager", _collect_linear_calls(nodes, _linear_modules(model)), outputs)


def capture(model: nn.Module, args: tuple, kwargs: dict, method: str = "auto") -> OpGraph:
    """Capture with ``torch.export`` and fall back to the eager trace when export fails.

    Args:
        method: ``"auto"`` (export, then eager), ``"export"`` or ``"eager"``.
    Raises:
        GraphAnalysisError: if no path works; the message carries each path's error.
    """
    if method not in ("auto", "export", "eager"):
        raise GraphAnalysisError(f"unknown capture method {method!r}; use 'auto', 'export' or 'eager'")
    errors: list[str] = []
    cls = type(model).__name__
    if method in ("auto", "export"):
        try:
            graph = capture_export(model, args, kwargs)
            logger.info("captured %s with torch.export (%d ops)", cls, len(graph.nodes))
            return graph
        except Exception as e:  # noqa: BLE001 - any export failure sends us to the eager path
            errors.append(f"torch.export failed: {type(e).__name__}: {_first_line(e)}")
            if method == "auto":
                logger.warning("torch.export of %s failed (%s); falling back to an eager trace",
                               cls, _first_line(e))
    if method in ("auto", "eager"):
        try:
            graph = capture_eager(model, args, kwargs)
            logger.info("captured %s with an eager trace (%d ops)", cls, len(graph.nodes))
            return graph
        except Exception as e:  # noqa: BLE001
            errors.append(f"eager trace failed: {type(e).__name__}: {_first_line(e)}")
    raise GraphAnalysisError(
        f"could not capture the graph of {cls}: " + "; ".join(errors) +
        ". Check that the example inputs match the model's forward() signature and shapes")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
