"""Example denoiser inputs for the diffusers models SegQuant knows, on the model's device and dtype.

Only shapes matter for graph analysis, so sizes are small: a few latent tokens and text tokens.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .errors import SegQuantError

_BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {}


def _register(*names: str):
    def deco(fn):
        for name in names:
            _BUILDERS[name] = fn
        return fn
    return deco


def supported_models() -> list[str]:
    """Class names for which ``example_inputs`` can build inputs."""
    return sorted(_BUILDERS)


def _place(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)
    return torch.device("cpu"), torch.float32


def example_inputs(model: nn.Module, batch_size: int = 1, text_tokens: int = 8) -> dict[str, Any]:
    """Keyword arguments for one forward call of a known diffusers denoiser.

    Example:
        >>> plan = segquant.analyze(model, **example_inputs(model))

    Raises:
        SegQuantError: the model class is not one of ``supported_models()``.
    """
    name = type(model).__name__
    if name not in _BUILDERS:
        raise SegQuantError(f"no example inputs for {name}; supported: {', '.join(supported_models())}. "
                            "Call segquant.analyze(model, *args, **kwargs) with your own inputs")
    if batch_size < 1 or text_tokens < 1:
        raise SegQuantError(f"batch_size and text_tokens must be >= 1, got {batch_size}, {text_tokens}")
    device, dtype = _place(model)
    cfg = model.config

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    def steps() -> torch.Tensor:
        return torch.full((batch_size,), 500.0, device=device, dtype=dtype)

    kwargs = _BUILDERS[name](cfg, batch_size, text_tokens, rand, steps, device)
    kwargs["return_dict"] = False
    return kwargs


@_register("FluxTransformer2DModel")
def _flux(cfg, b, t, rand, steps, device):
    tokens = 16
    out = dict(hidden_states=rand(b, tokens, cfg.in_channels),
               encoder_hidden_states=rand(b, t, cfg.joint_attention_dim),
               pooled_projections=rand(b, cfg.pooled_projection_dim),
               timestep=steps() / 1000,
               img_ids=torch.zeros(tokens, 3, device=device),
               txt_ids=torch.zeros(t, 3, device=device))
    if cfg.guidance_embeds:
        out["guidance"] = torch.full((b,), 3.5, device=device)
    return out


def _square(cfg, b, rand, side: int | None = None):
    side = side or 2 * cfg.patch_size * 2
    return rand(b, cfg.in_channels, side, side)


@_register("SD3Transformer2DModel")
def _sd3(cfg, b, t, rand, steps, device):
    return dict(hidden_states=_square(cfg, b, rand),
                encoder_hidden_states=rand(b, t, cfg.joint_attention_dim),
                pooled_projections=rand(b, cfg.pooled_projection_dim),
                timestep=steps())


@_register("UNet2DConditionModel")
def _unet(cfg, b, t, rand, steps, device):
    side = 2 ** len(cfg.block_out_channels)
    cross = cfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    out = dict(sample=rand(b, cfg.in_channels, side, side), timestep=steps(),
               encoder_hidden_states=rand(b, t, cross))
    if cfg.addition_embed_type == "text_time":
        text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        out["added_cond_kwargs"] = {"text_embeds": rand(b, text), "time_ids": rand(b, 6)}
    return out


@_register("PixArtTransformer2DModel")
def _pixart(cfg, b, t, rand, steps, device):
    out = dict(hidden_states=_square(cfg, b, rand), encoder_hidden_states=rand(b, t, cfg.caption_channels),
               timestep=steps(), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if cfg.use_additional_conditions:
        out["added_cond_kwargs"] = {"resolution": rand(b, 2), "aspect_ratio": rand(b, 1)}
    return out


@_register("DiTTransformer2DModel")
def _dit(cfg, b, t, rand, steps, device):
    return dict(hidden_states=_square(cfg, b, rand), timestep=steps().long(),
                class_labels=torch.zeros(b, dtype=torch.long, device=device))


@_register("SanaTransformer2DModel")
def _sana(cfg, b, t, rand, steps, device):
    out = dict(hidden_states=_square(cfg, b, rand), encoder_hidden_states=rand(b, t, cfg.caption_channels),
               timestep=steps())
    if cfg.guidance_embeds:
        out["guidance"] = torch.full((b,), 3.5, device=device)
    return out
