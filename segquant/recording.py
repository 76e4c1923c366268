"""One way to see what the Linear layers of a model receive: ``record_linears``, a context manager.

Calibration observers, the cost model, per-layer SQNR, the tests and the benchmarks all use it, so that
"hook every Linear's input" exists once.

Example:
    >>> with record_linears(model, outputs=True) as rec:
    ...     model(**batch)
    >>> rec.inputs["transformer_blocks.0.ff.net.2"][0].shape
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from torch import Tensor, nn


@dataclass
class LinearRecording:
    """What ``record_linears`` saw: per layer name, one tensor per call (detached)."""

    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)

    def first(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Per layer, its first call's ``(input, output)`` (output None when outputs were not recorded)."""
        return {n: (xs[0], self.outputs.get(n, [None])[0]) for n, xs in self.inputs.items() if xs}


def _linear_modules(model: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Module]:
    wanted = None if names is None else set(names)
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and (wanted is None or n in wanted)}


@contextlib.contextmanager
def record_linears(model: nn.Module, names: Iterable[str] | None = None, *, outputs: bool = False,
                   keep: bool = True, on_input: Callable[[str, Tensor], None] | None = None,
                   transform: Callable[[Tensor], Tensor] | None = None) -> Iterator[LinearRecording]:
    """Record the inputs (and optionally outputs) of ``model``'s ``nn.Linear`` layers while inside.

    Args:
        model: any module; every ``nn.Linear`` below it (subclasses included) is watched.
        names: only these layer names (``named_modules()`` names); default all.
        outputs: record outputs too.
        keep: store what is seen in the recording (False: only call ``on_input``, e.g. an observer).
        on_input: ``on_input(name, x)`` for every call, before the layer runs.
        transform: applied to each stored tensor (e.g. subsample rows, move to CPU); default ``detach``.
    Yields:
        the ``LinearRecording`` being filled. Hooks are removed on exit, also on error.
    """
    recording = LinearRecording()
    store = transform or (lambda t: t.detach())
    handles = []

    def pre_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if on_input is not None:
                on_input(name, x)
            if keep:
                recording.inputs.setdefault(name, []).append(store(x))
        return hook

    def post_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            recording.outputs.setdefault(name, []).append(store(out))
        return hook

    try:
        for name, module in _linear_modules(model, names).items():
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            if outputs and keep:
                handles.append(module.register_forward_hook(post_hook(name)))
        yield recording
    finally:
        for handle in handles:
            handle.remove()
