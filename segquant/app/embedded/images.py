"""Image grids as PNG (Pillow, which comes with matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from segquant.errors import SegQuantError


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [-1, 1] -> (N, H, W) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]


def grid(rows: Sequence[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """One uint8 (H, W) mosaic: each entry of ``rows`` (N, 1, h, w) in [-1, 1] is one row of images."""
    if not rows:
        raise SegQuantError("grid needs at least one row of images")
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    canvas = torch.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad), 255, dtype=torch.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(to_uint8(row)):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[top:top + h, left:left + w] = img
    return canvas


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, scale: int = 2) -> None:
    """Save (N, 1, H, W) images in [-1, 1] as a PNG with ``nrow`` images per row, enlarged ``scale`` times."""
    rows = [images[i:i + nrow] for i in range(0, images.shape[0], nrow)]
    save_png(grid(rows), path, scale)


def save_png(mosaic: torch.Tensor, path: str | Path, scale: int = 2) -> None:
    try:
        from PIL import Image
    except ImportError:
        raise SegQuantError("writing PNG images needs Pillow: pip install pillow") from None
    Image.fromarray(mosaic.numpy()).resize((mosaic.shape[1] * scale, mosaic.shape[0] * scale),
                                           Image.NEAREST).save(path)
