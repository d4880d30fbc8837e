"""Images as files: [-1, 1] tensors to uint8 pixels, grids tiled into one image, PNG and GIF.
A leaf utility: training, sampling and evaluation all write images through it."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 0..255, quantized as a saved PNG would be: real and generated images alike."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (..., C, H, W) -> uint8 (..., H, W, C)."""
    return to_uint8(images).movedim(-3, -1)


def _pil(pixels: torch.Tensor):
    from PIL import Image

    array = pixels.numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def tile(images: torch.Tensor) -> torch.Tensor:
    """(rows, cols, C, H, W) -> one image (C, rows H, cols W)."""
    rows, cols, channels, height, width = images.shape
    return images.permute(2, 0, 3, 1, 4).reshape(channels, rows * height, cols * width)


def save_png(images: torch.Tensor, path: Path) -> None:
    """A grid (rows, cols, C, H, W) or one image (C, H, W) in [-1, 1] as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil(to_pixels(tile(images) if images.dim() == 5 else images)).save(path)


def save_gif(images: torch.Tensor, path: Path, *, frame_ms: int = 100) -> None:
    """An interpolation (rows, steps, C, H, W) as an animated GIF: frame j shows step j of every
    row, tiled into a near-square grid; it plays forwards then backwards, so it loops without a jump."""
    rows = images.shape[0]
    cols = math.ceil(math.sqrt(rows))
    padded = torch.cat([images, images.new_full((cols * math.ceil(rows / cols) - rows, *images.shape[1:]), -1.0)])
    frames = [_pil(to_pixels(tile(padded[:, j].unflatten(0, (-1, cols))))) for j in range(images.shape[1])]
    frames += frames[-2:0:-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
