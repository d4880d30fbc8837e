"""Images as files: [-1, 1] tensors to uint8 pixels, grids tiled into one image, PNG and GIF.
A leaf utility: training, sampling and evaluation all write images through it."""

from __future__ import annotations

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


GAP = 2  # pixels of white between a grid's tiles, so that neighbouring images do not run together


def tile(images: torch.Tensor, *, gap: int = 0) -> torch.Tensor:
    """(rows, cols, C, H, W) -> one image (C, rows H + (rows - 1) gap, cols W + (cols - 1) gap),
    tiles `gap` white pixels apart."""
    rows, cols, channels, height, width = images.shape
    if gap:
        images = torch.nn.functional.pad(images, (0, gap, 0, gap), value=1.0)
    grid = images.permute(2, 0, 3, 1, 4).reshape(channels, rows * (height + gap), cols * (width + gap))
    return grid[:, : grid.shape[1] - gap, : grid.shape[2] - gap]


def label_rows(pixels: torch.Tensor, labels: list[str], tile_height: int, gap: int):
    """A PIL image of `pixels` (H, W, C) with each row's label written in a white margin on its left."""
    from PIL import Image, ImageDraw

    image = _pil(pixels).convert("RGB")
    draw = ImageDraw.Draw(image)
    margin = max(int(draw.textlength(label)) for label in labels) + 6
    labelled = Image.new("RGB", (image.width + margin, image.height), "white")
    labelled.paste(image, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    for row, label in enumerate(labels):
        top = row * (tile_height + gap) + max(tile_height // 2 - 6, 0)
        draw.text((margin - 3, top), label, fill="black", anchor="ra")
    return labelled


def save_png(images: torch.Tensor, path: Path, *, row_labels: list[str] | None = None) -> None:
    """A grid (rows, cols, C, H, W), its tiles GAP pixels apart and each row labelled if
    `row_labels` are given, or one image (C, H, W), in [-1, 1], as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if images.dim() != 5:
        _pil(to_pixels(images)).save(path)
        return
    pixels = to_pixels(tile(images, gap=GAP))
    if row_labels is None:
        _pil(pixels).save(path)
    else:
        label_rows(pixels, row_labels, images.shape[-2], GAP).save(path)


def _columns(count: int) -> int:
    """Columns of a near-square layout of `count` tiles that leaves no tile empty: the smallest
    divisor of `count` not below its square root (10 tiles: 2 rows of 5; a prime count: one row)."""
    return min(d for d in range(1, count + 1) if count % d == 0 and d * d >= count)


def save_gif(images: torch.Tensor, path: Path, *, frame_ms: int = 100) -> None:
    """An interpolation (rows, steps, C, H, W) as an animated GIF: frame j shows step j of every
    row, tiled into a near-square grid with no empty tile; it plays forwards then backwards, so it
    loops without a jump."""
    cols = _columns(images.shape[0])
    frames = [_pil(to_pixels(tile(images[:, j].unflatten(0, (-1, cols)), gap=GAP))) for j in range(images.shape[1])]
    frames += frames[-2:0:-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
