"""The embedded MNIST models: a class-conditional FLUX transformer, a class-conditional UNet and a small
classifier used as a feature network.

The denoisers are plain diffusers models (``from_pretrained`` loads them); the class condition enters as
"text": a learned table gives each class a few text tokens and a pooled vector, like a text encoder would.
Index 10 is the empty class used for label dropout (classifier-free guidance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from segquant.errors import SegQuantError

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES
IMAGE_SIZE = 32
"""MNIST's 28x28 digits, zero-padded to 32x32 and scaled to [-1, 1]."""

FLUX_CONFIG = dict(
    patch_size=1, in_channels=4, num_layers=3, num_single_layers=5, attention_head_dim=72,
    num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=[8, 32, 32],
    guidance_embeds=False)
"""A FluxTransformer2DModel over 2x2-packed 32x32 images (256 image tokens of 4 channels)."""

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=1,
    attention_head_dim=(2, 4, 6), cross_attention_dim=64, norm_num_groups=16, use_linear_projection=True)
"""An SDXL-style UNet2DConditionModel (linear-projection transformer blocks, GEGLU feed-forward,
cross-attention to the class tokens)."""

TEXT_TOKENS = 4


class ClassConditioner(nn.Module):
    """Class label -> (text tokens, pooled vector): the embedded models' "text encoder"."""

    def __init__(self, dim: int = 64, tokens: int = TEXT_TOKENS, pooled_dim: int = 64):
        super().__init__()
        self.dim, self.tokens = dim, tokens
        self.token_table = nn.Embedding(NUM_CLASSES + 1, tokens * dim)
        self.pooled_table = nn.Embedding(NUM_CLASSES + 1, pooled_dim)
        nn.init.normal_(self.token_table.weight, std=1.0)
        nn.init.normal_(self.pooled_table.weight, std=1.0)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.token_table(labels).view(labels.shape[0], self.tokens, self.dim)
        return tokens, self.pooled_table(labels)


class MnistClassifier(nn.Module):
    """A small CNN for 32x32 digits in [-1, 1]. ``features`` (128-d, before the last layer) is the
    feature space of the feature-FID."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, 32, 32) -> (B, 256, 4): FLUX's 2x2 patch packing."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    b, n, c4 = tokens.shape
    h = w = size // 2
    x = tokens.view(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, size, size)


def _image_ids(size: int = IMAGE_SIZE) -> torch.Tensor:
    h = w = size // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.view(h * w, 3)


@dataclass
class Denoiser:
    """A denoiser + its class conditioner, predicting the rectified-flow velocity ``noise - image``.

    ``model`` is the diffusers module that gets quantized; the conditioner stays in full precision, as a text
    encoder would.
    """

    model: nn.Module
    conditioner: ClassConditioner
    family: str  # "flux" or "unet"

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, 32, 32) at time t (B,) in [0, 1] (1 = noise); labels (B,) in 0..10."""
        dtype = next(self.model.parameters()).dtype
        out = self.model(**self.model_kwargs(x, t, labels, dtype), return_dict=False)[0].float()
        return unpack(out) if self.family == "flux" else out

    def model_kwargs(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Keyword inputs of ``model`` for images x (B, 1, 32, 32) at times t (B,) in [0, 1] of class ``labels``."""
        tokens, pooled = self.conditioner(labels)
        if self.family == "flux":
            return dict(hidden_states=pack(x).to(dtype), encoder_hidden_states=tokens.to(dtype),
                        pooled_projections=pooled.to(dtype), timestep=t.to(dtype), img_ids=_image_ids().to(x.device),
                        txt_ids=torch.zeros(TEXT_TOKENS, 3, device=x.device))
        return dict(sample=x.to(dtype), timestep=t.to(dtype) * 1000, encoder_hidden_states=tokens.to(dtype))

    def example_inputs(self, batch: int = 2) -> dict[str, torch.Tensor]:
        """Keyword inputs of ``model`` for one call (for ``segquant.analyze``)."""
        device = next(self.model.parameters()).device
        labels = torch.arange(batch, device=device) % NUM_CLASSES
        x = torch.randn(batch, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)).to(device)
        return self.model_kwargs(x, torch.full((batch,), 0.5, device=device), labels)


def build_denoiser(family: str) -> Denoiser:
    """A freshly initialised embedded denoiser of ``family`` ("flux" or "unet")."""
    try:
        from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    except ImportError:
        raise SegQuantError("the embedded models need diffusers: pip install 'segquant[diffusers]'") from None
    if family == "flux":
        model = FluxTransformer2DModel.from_config(FLUX_CONFIG)
        return Denoiser(model, ClassConditioner(FLUX_CONFIG["joint_attention_dim"], TEXT_TOKENS,
                                                FLUX_CONFIG["pooled_projection_dim"]), family)
    if family == "unet":
        model = UNet2DConditionModel.from_config(UNET_CONFIG)
        return Denoiser(model, ClassConditioner(UNET_CONFIG["cross_attention_dim"]), family)
    raise SegQuantError(f"unknown embedded model family {family!r}; expected 'flux' or 'unet'")


def timestep_density_sample(batch: int, generator: torch.Generator | None = None,
                            device: torch.device | str = "cpu") -> torch.Tensor:
    """Training times from a logit-normal(0, 1) density, as in SD3's rectified-flow training."""
    z = torch.randn(batch, generator=generator, device=device)
    return torch.sigmoid(z)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
