"""Calibration helpers shared by the backends: running per-segment, per-sign activation ranges."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .distributed import merge_observers
from .errors import SegQuantError
from .numerics import ActivationStats, reduce_segments, shifted_ranges, smooth_input, smoothing_factors
from .options import DEFAULT_SCALE_FORM
from .plan import LinearPlan

logger = logging.getLogger(__name__)


class SegmentAmaxObserver:
    """Accumulates, per input channel of one Linear, the max of |x|, of x+ and of |x-| over batches, and
    reduces them to the plan's input segments (``stats()``) or keeps them per channel (SmoothQuant).

    Example:
        >>> obs = SegmentAmaxObserver(plan["single_transformer_blocks.0.proj_out"])
        >>> for x in batches: obs.update(x)
        >>> stats = obs.stats()  # ActivationStats for segquant.numerics.reference_linear
    """

    def __init__(self, layer: LinearPlan | None = None, *, segments: Sequence[int] | None = None,
                 name: str = "", shift: str | None = None, shift_segments: Sequence[int] = ()) -> None:
        if (layer is None) == (segments is None):
            raise SegQuantError("SegmentAmaxObserver needs exactly one of a LinearPlan or segments")
        self.segments = tuple(layer.in_segments if layer is not None else segments)
        self.shift = layer.shift if layer is not None else shift
        self.shift_segments = tuple(layer.shift_segments if layer is not None else shift_segments)
        if self.shift is not None and not self.shift_segments:
            self.shift_segments = tuple(range(len(self.segments)))
        self.name = name or (layer.name if layer is not None else "") or "<layer>"
        self.batches = 0
        self.rows = 0
        self.ndim = 0
        self.channels: ActivationStats | None = None  # per-channel (K,) maxima
        self.first_row: Tensor | None = None  # to tell data that never varies (degenerate calibration)
        self.varies = False

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
        flat = x.detach().float().reshape(-1, x.shape[-1])
        new = ActivationStats(flat.abs().amax(0), flat.clamp(min=0).amax(0), (-flat).clamp(min=0).amax(0))
        if self.channels is not None:
            old = self.channels
            new = ActivationStats(torch.maximum(old.amax, new.amax), torch.maximum(old.pos_amax, new.pos_amax),
                                  torch.maximum(old.neg_amax, new.neg_amax))
        self.channels = new
        if flat.shape[0]:
            self.first_row = flat[0].clone() if self.first_row is None else self.first_row
            self.varies = self.varies or bool((flat != self.first_row).any())
        self.batches += 1
        self.rows += flat.shape[0]
        self.ndim = x.dim()

    def channel_stats(self) -> ActivationStats:
        """Per-channel ``(K,)`` ranges. Raises ``SegQuantError`` if no batch was seen."""
        if self.channels is None:
            raise SegQuantError(f"{self.name}: no calibration data reached this layer; run the forward "
                                "loop over at least one batch that uses it")
        return self.channels

    def stats(self, scale: Tensor | None = None, form: str = DEFAULT_SCALE_FORM) -> ActivationStats:
        """Per-segment ranges, of ``x * scale`` when a positive per-channel ``scale`` is given (smoothing; ``x /
        scale`` in the ``reciprocal`` form); with a shift, the ranges of the smoothed ``x - c`` and the centres
        ``c`` (``segquant.numerics.shifted_ranges``)."""
        ch = self.channel_stats()
        if scale is not None and form != DEFAULT_SCALE_FORM:
            ch = ActivationStats(*(smooth_input(t, scale.to(t.device), form) for t in (ch.amax, ch.pos_amax,
                                                                                          ch.neg_amax)))
        else:
            scale = torch.ones_like(ch.amax) if scale is None else scale.to(ch.amax.device).float()
            ch = ActivationStats(ch.amax * scale, ch.pos_amax * scale, ch.neg_amax * scale)
        if self.shift is not None:
            ch = shifted_ranges(ch, self.segments, self.shift_segments, self.shift)
        per_segment = (reduce_segments(t, self.segments) for t in (ch.amax, ch.pos_amax, ch.neg_amax))
        return ActivationStats(*per_segment, center=ch.center)


def layer_alpha(layer: LinearPlan | None, alpha: float | None) -> float | None:
    """The SmoothQuant alpha of ``layer``: its own (an alpha search's) when the plan sets one, else ``alpha``."""
    return alpha if layer is None or layer.smoothquant_alpha is None else layer.smoothquant_alpha


def static_calibration(observer: SegmentAmaxObserver, weight: Tensor, alpha: float | None,
                       form: str = DEFAULT_SCALE_FORM) -> tuple[ActivationStats, Tensor | None]:
    """What a static layer needs from calibration: per-segment ranges of the (smoothed) input and the
    SmoothQuant factors (``None`` without smoothing). Both backends quantize from exactly this.

    Args:
        observer: the layer's observer after the calibration batches.
        weight: ``(N, K)`` float weight of the layer (SmoothQuant balances against it).
        alpha: SmoothQuant alpha, or None.
        form: ``step`` (factors multiply the input) or ``reciprocal`` (divisors, the reference code's).
            Per-segment smoothing: ``segment_calibration``.
    """
    if alpha is None:
        return observer.stats(), None
    smooth = smoothing_factors(weight, observer.channel_stats().amax, alpha, form)
    return observer.stats(smooth, form), smooth


def segment_calibration(observer: SegmentAmaxObserver, weight: Tensor, layer: LinearPlan, alpha: float,
                        form: str = DEFAULT_SCALE_FORM) -> tuple[Tensor, list[ActivationStats]]:
    """Per-segment SmoothQuant factors ``(len(out_segments), K)`` and, per output segment, the per-input-segment
    ranges of its smoothed input (what ``per_segment_linear`` takes), from a layer's calibration.

    Each row ``b`` balances the calibrated per-channel input maximum against the maximum of weight rows ``b``
    (``segquant.numerics.smoothing_factors``); the ranges are the per-channel maxima smoothed the same way (exact:
    smoothing by a positive factor is monotonic, so the maximum of the smoothed values is the smoothed maximum).

    Raises:
        SegQuantError: the observer saw no data, or the layer has an activation shift.
    """
    if observer.shift is not None:
        raise SegQuantError(f"{observer.name}: per-segment smoothing has no activation shift; drop the shift from "
                            "the plan (plan.ablate(shift=False)) or use smoothing='per_layer'")
    ch = observer.channel_stats()
    factors, stats = [], []
    for w_b in weight.detach().float().split(list(layer.out_segments), dim=0):
        d = smoothing_factors(w_b, ch.amax, alpha, form)
        factors.append(d)
        smoothed = [smooth_input(t, d, form) for t in (ch.amax, ch.pos_amax, ch.neg_amax)]
        stats.append(ActivationStats(*(reduce_segments(t, layer.in_segments) for t in smoothed)))
    return torch.stack(factors), stats


def check_calibration(observers: Mapping[str, SegmentAmaxObserver], keep_degenerate: bool = False) -> list[str]:
    """Check that calibration can give every layer a usable scale; both backends call this before they change
    any layer.

    Refused: layers that calibration never reached, layers whose range is zero on an input segment (a zero
    scale: the layer would output nothing but its bias), and calibration data without variation (at least half
    the layers saw the same input vector in every row, e.g. all-zero latents and prompts: the ranges say nothing
    about real inputs; a single constant input such as a fixed guidance embedding is normal).

    Args:
        observers: layer name -> its observer after the calibration batches.
        keep_degenerate: return the unreached and zero-range layers (to be kept in high precision) instead of
            raising; data without variation is refused either way.

    Inside a ``torch.distributed`` process group (calibration sharded over ranks), the observers are first merged
    across the ranks (``segquant.distributed.merge_observers``, exact), so every rank checks and quantizes from
    what one process would have seen over all the shards.

    Returns:
        The layers to keep in high precision (empty unless ``keep_degenerate``).

    Raises:
        SegQuantError: naming the layers, with what to do.
    """
    merge_observers(observers)
    unreached = [name for name, obs in observers.items() if obs.batches == 0]
    zero = {}
    for name, obs in observers.items():
        if obs.batches:
            amax = obs.stats().amax
            if (amax <= 0).any():
                zero[name] = [i for i, a in enumerate(amax.tolist()) if a <= 0]
    if unreached and not keep_degenerate:
        raise SegQuantError(f"calibration reached no data for {len(unreached)} layer(s), e.g. "
                            f"{', '.join(unreached[:3])}: run the model on calibration inputs between prepare and "
                            "convert (or pass a forward_loop that uses them), or keep them in high precision "
                            "(keep_degenerate, --keep-degenerate-layers); nothing was converted")
    if zero and not keep_degenerate:
        shown = "; ".join(f"{n} (input segment {', '.join(map(str, s))})" for n, s in list(zero.items())[:3])
        raise SegQuantError(f"calibration saw only zeros in {len(zero)} layer(s): {shown}. Check the calibration "
                            "data (all zeros?), or keep these layers in high precision (the recipe's skip, or "
                            "keep_degenerate / --keep-degenerate-layers); nothing was converted")
    constant = [name for name, obs in observers.items() if obs.rows > 1 and not obs.varies]
    if constant and len(constant) >= len(observers) / 2:  # one constant input (a fixed guidance) is normal
        raise SegQuantError(f"calibration data without variation: {len(constant)} of {len(observers)} layers (e.g. "
                            f"{', '.join(constant[:3])}) saw the same input vector in every row. Calibrate on "
                            "real samples (images, prompts, timesteps), not constant or all-zero inputs; nothing "
                            "was converted")
    kept = unreached + list(zero)
    if kept:
        logger.warning("keeping %d layer(s) in high precision: calibration never reached %d and saw only zeros on "
                       "an input segment of %d (e.g. %s)", len(kept), len(unreached), len(zero), ", ".join(kept[:3]))
    return kept
