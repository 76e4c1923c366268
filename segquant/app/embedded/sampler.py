"""Rectified-flow sampling with Euler steps from fixed noise, so full-precision and quantized runs of the
embedded models start from identical noise and can be compared image by image."""

from __future__ import annotations

import torch

from segquant.distributed import is_distributed, shard
from segquant.errors import SegQuantError

from ..console import Progress
from ..parallel import gather_ordered
from .models import IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, Denoiser


def fixed_noise(num: int, seed: int) -> torch.Tensor:
    """(num, 1, 32, 32) standard normal noise drawn on the CPU from ``seed`` (identical on every device)."""
    return torch.randn(num, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def sample_labels(num: int) -> torch.Tensor:
    """Balanced class labels 0, 1, ..., 9, 0, 1, ..."""
    return torch.arange(num) % NUM_CLASSES


@torch.inference_mode()
def sample(denoiser: Denoiser, labels: torch.Tensor, *, seed: int = 0, steps: int = 20,
           guidance_scale: float = 1.0, batch_size: int = 64, progress: bool = True,
           desc: str = "sampling") -> torch.Tensor:
    """Images (N, 1, 32, 32) in [-1, 1] for class ``labels`` (N,), integrating dx/dt = v from t=1 (noise of
    ``seed``) to t=0 in ``steps`` Euler steps. ``guidance_scale`` > 1 adds classifier-free guidance. In a
    process group (``--num-gpus``) each rank samples its share of the batches (smaller batches when there are too
    few for every rank: the images can then differ from one process's in the last bits) and every rank returns
    all images."""
    if labels.ndim != 1 or labels.numel() == 0:
        raise SegQuantError(f"labels must be a non-empty 1-d tensor of class ids, got shape {tuple(labels.shape)}")
    if int(labels.min()) < 0 or int(labels.max()) > NULL_CLASS:
        raise SegQuantError(f"labels must lie in 0..{NULL_CLASS}, got {int(labels.min())}..{int(labels.max())}")
    if steps < 1:
        raise SegQuantError(f"steps must be >= 1, got {steps}")
    device = next(denoiser.model.parameters()).device
    noise = fixed_noise(labels.numel(), seed)
    times = torch.linspace(1.0, 0.0, steps + 1)
    out = {}
    if is_distributed():  # every rank gets a batch (calibration statistics need data on each rank to merge)
        batch_size = max(1, min(batch_size, -(-labels.numel() // torch.distributed.get_world_size())))
    starts = shard(range(0, labels.numel(), batch_size))  # under --num-gpus: this rank's batches
    with Progress(desc, total=len(starts) * steps, unit="step", enabled=progress) as bar:
        for start in starts:
            x = noise[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            for t, t_next in zip(times[:-1], times[1:]):
                tt = torch.full((x.shape[0],), float(t), device=device)
                v = denoiser.velocity(x, tt, y)
                if guidance_scale != 1.0:
                    v_null = denoiser.velocity(x, tt, torch.full_like(y, NULL_CLASS))
                    v = v_null + guidance_scale * (v - v_null)
                x = x + (t_next - t) * v
                bar.update(1)
            out[start] = x.clamp(-1, 1).cpu()
    return torch.cat(gather_ordered(out))  # every rank gets every image, in order
