"""All-or-nothing changes to a model: ``model_transaction(model)`` undoes whatever a failed quantization did.

Quantizing rewrites modules in place: ModelOpt swaps classes and adds quantizer children, torchao replaces
weights, observers add hooks. A snapshot of every module (its class, its attribute dict with the parameter,
buffer, child and hook tables copied, and each parameter's and buffer's data) is cheap: it holds references,
not copies of the weights. Restoring it puts every module back as it was, bit for bit, provided the weights
were replaced (``module.weight = ...``, ``param.data = ...``) rather than written in place, which is how
SegQuant's backends change them. An in-place write is detected where torch's version counter sees it and makes
the restore raise instead of leaving a half-restored model unnoticed.

Example:
    >>> with model_transaction(model):
    ...     quantize_layers(model)          # raises half-way: model is as it was before the ``with``
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from torch import Tensor, nn

from .errors import SegQuantError

_TABLES = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_forward_hooks",
           "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
           "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
           "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
"""Attribute tables of ``nn.Module`` that quantization edits in place (copied, not referenced)."""


@dataclass
class _TensorState:
    tensor: Tensor
    data: Tensor
    version: int


@dataclass
class _ModuleState:
    module: nn.Module
    cls: type
    attrs: dict[str, Any]


class ModelSnapshot:
    """The state of every module and tensor reachable from ``model``, by reference."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise SegQuantError(f"expected an nn.Module, got {type(model).__name__}")
        self.modules: list[_ModuleState] = []
        self.tensors: list[_TensorState] = []
        seen: set[int] = set()
        for module in model.modules():
            self.modules.append(_ModuleState(module, type(module), _with_tables_copied(module.__dict__)))
            for tensor in (*module._parameters.values(), *module._buffers.values()):
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    self.tensors.append(_TensorState(tensor, tensor.data, tensor._version))

    def restore(self) -> None:
        """Put every module and tensor back as it was at the snapshot.

        Raises:
            SegQuantError: a tensor was written in place (its values cannot be recovered from references).
        """
        for state in self.modules:
            module = state.module
            if type(module) is not state.cls:
                module.__class__ = state.cls
            module.__dict__.clear()
            module.__dict__.update(_with_tables_copied(state.attrs))
        changed = []
        for state in self.tensors:
            if state.tensor._version != state.version:
                changed.append(state)
            elif not _same_storage(state.tensor.data, state.data):
                state.tensor.data = state.data
        if changed:
            raise SegQuantError(f"{len(changed)} tensor(s) of the model were written in place during a failed step; "
                                "the model could not be restored and must be reloaded")

    def unchanged(self, model: nn.Module) -> bool:
        """True if ``model`` has exactly the modules, classes, tables and tensors of the snapshot (for tests)."""
        modules = list(model.modules())
        if [s.module for s in self.modules] != modules:
            return False
        for state in self.modules:
            if type(state.module) is not state.cls or state.module.__dict__.keys() != state.attrs.keys():
                return False
            if any(_table_items(state.module.__dict__.get(t)) != _table_items(state.attrs.get(t)) for t in _TABLES):
                return False
        return all(s.tensor._version == s.version and _same_storage(s.tensor.data, s.data) for s in self.tensors)


def _with_tables_copied(attrs: dict[str, Any]) -> dict[str, Any]:
    """A module's attribute dict with its parameter, buffer, child and hook tables copied (the rest by reference)."""
    return {k: (type(v)(v) if k in _TABLES else v) for k, v in attrs.items()}


def _table_items(table: Any) -> Any:
    if table is None:
        return None
    if isinstance(table, set):
        return sorted(table)
    return [(k, id(v)) for k, v in table.items()]


def _same_storage(a: Tensor, b: Tensor) -> bool:
    """True if ``a`` and ``b`` view the same memory the same way (tensor subclasses without storage, such as
    torchao's, are compared by their metadata only: SegQuant replaces them, it never writes into them)."""
    if (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device) or type(a) is not type(b):
        return False
    try:
        return a.data_ptr() == b.data_ptr() and a.stride() == b.stride()
    except RuntimeError:
        return True


@contextlib.contextmanager
def model_transaction(model: nn.Module) -> Iterator[ModelSnapshot]:
    """Run the ``with`` body; if it raises (Ctrl-C included), restore ``model`` to its state at entry and
    re-raise."""
    snapshot = ModelSnapshot(model)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise
