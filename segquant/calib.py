"""Calibration helpers shared by the backends: running per-segment, per-sign activation ranges."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .errors import SegQuantError
from .numerics import ActivationStats, activation_stats
from .plan import LinearPlan


class SegmentAmaxObserver:
    """Accumulates, per input segment of one Linear, the max of |x|, of x+ and of |x-| over batches.

    Example:
        >>> obs = SegmentAmaxObserver(plan["single_transformer_blocks.0.proj_out"])
        >>> for x in batches: obs.update(x)
        >>> stats = obs.stats()  # ActivationStats for segquant.numerics.reference_linear
    """

    def __init__(self, layer: LinearPlan | None = None, *, segments: Sequence[int] | None = None,
                 name: str = "") -> None:
        if (layer is None) == (segments is None):
            raise SegQuantError("SegmentAmaxObserver needs exactly one of a LinearPlan or segments")
        self.segments = tuple(layer.in_segments if layer is not None else segments)
        self.name = name or (layer.name if layer is not None else "") or "<layer>"
        self.batches = 0
        self._stats: ActivationStats | None = None

    def update(self, x: Tensor) -> None:
        """Fold one batch of inputs ``(..., K)`` into the running ranges.

        Raises:
            SegQuantError: on a wrong last dim or NaN/Inf values, naming the layer.
        """
        if x.shape[-1] != sum(self.segments):
            raise SegQuantError(f"{self.name}: calibration input has last dim {x.shape[-1]}, the plan's "
                                f"segments {list(self.segments)} sum to {sum(self.segments)}")
        if not torch.isfinite(x).all():
            raise SegQuantError(f"{self.name}: calibration input contains NaN or Inf (batch "
                                f"{self.batches}); check the model's dtype and the calibration data")
        new = activation_stats(x, self.segments)
        if self._stats is None:
            self._stats = new
        else:
            old = self._stats
            self._stats = ActivationStats(torch.maximum(old.amax, new.amax), torch.maximum(old.pos_amax, new.pos_amax),
                                          torch.maximum(old.neg_amax, new.neg_amax))
        self.batches += 1

    def stats(self) -> ActivationStats:
        """The accumulated ranges. Raises ``SegQuantError`` if no batch was seen."""
        if self._stats is None:
            raise SegQuantError(f"{self.name}: no calibration data reached this layer; run the forward "
                                "loop over at least one batch that uses it")
        return self._stats
