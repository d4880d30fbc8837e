"""The FID Inception-v3, written here: TensorFlow's Inception graph of 2015-12-05 (the network
TTUR's FID, the original Inception Score and KID were computed with) in torch, reading the weights
file torch-fidelity distributes, `weights-inception-2015-12-05-6726825d.pth`.

Nothing here imports torch-fidelity or torchvision. What carries over from elsewhere are facts,
each checked against its source:

- the graph's structure: the stem, the eleven mixed blocks with their branches, widths, kernels,
  strides and padding, and the three places it departs from torchvision's Inception-v3 (1008
  classes; average pools that do not count padding, as TensorFlow's SAME pooling; a max pool in
  the last block's pool branch), as torch-fidelity 0.4.0 describes them in
  `torch_fidelity/feature_extractor_inceptionv3.py`;
- the weights file's format: a state dict whose key names and shapes are those of
  `FeatureExtractorInceptionV3` there (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch5x5_1.bn.running_var`,
  `fc.weight` ...); `num_batches_tracked` entries may be present or not;
- the input: a bilinear resize to 299x299 as TensorFlow 1.x's `ResizeBilinear` (align_corners
  false, no half-pixel centres: `tensorflow/core/kernels/resize_bilinear_op.cc`, `compute_interpolation_weights`
  and `compute_lerp`), then (x - 128) / 128;
- the outputs: pool3, the 2048 averaged features of the last block (FID, KID), and the logits
  without the final layer's bias, which the original Inception Score used (IS).

`tests/eval/test_inception.py` checks that this network gives the same features and logits as
torch-fidelity's `FeatureExtractorInceptionV3` on the same weights file, bit for bit on CPU.

The file is read with `safe_files.read_torch` (weights only: reading it runs no code), and every
key, shape and value is checked before the network is built; a wrong file is a user error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import SpecError, user_error
from pipeline.safe_files import sha256

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
# The official file's sha256. torch-fidelity does not publish it; its file name carries the first
# 8 hex digits (torch hub's naming convention, `6726825d`), and the full digest is recorded, for
# both torch-fidelity's file and pytorch-fid's identical `pt_inception-2015-12-05-6726825d.pth`
# (95,628,359 bytes), by several projects that check it before use, e.g. genforce/genforce
# (commit de3e0171, metrics/inception.py, `_MODEL_URL_SHA256['tf_inception_v3']`).
OFFICIAL_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INPUT_SIZE = 299
NUM_FEATURES, NUM_CLASSES = 2048, 1008
HINT = (
    f"give torch-fidelity's {WEIGHTS_FILE} (download it once from {WEIGHTS_URL}) as inception:PATH; "
    "other Inception weights do not give FID numbers comparable with published ones"
)

# How a convolution pads, in the graph's own words: SAME keeps the size (stride 1), VALID pads nothing.
SAME, VALID = "SAME", "VALID"
# Pools, by what they do. TensorFlow's SAME average pool averages only the pixels inside the image.
POOLS = {
    "avg_3x3_same": lambda x: F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False),
    "max_3x3_same": lambda x: F.max_pool2d(x, kernel_size=3, stride=1, padding=1),
    "max_3x3_stride2": lambda x: F.max_pool2d(x, kernel_size=3, stride=2),
}


class ConvBN(nn.Module):
    """Convolution without bias, batch normalization (eps 0.001, TensorFlow's) and ReLU: the
    graph's unit, stored as `NAME.conv.weight` and `NAME.bn.*`."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int], stride: int, pad: str):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = (kh // 2, kw // 2) if pad == SAME else (0, 0)
        self.conv = nn.Conv2d(in_channels, out_channels, (kh, kw), stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


# A conv: (name, in_channels, out_channels, kernel, stride, padding).
Conv = tuple[str, int, int, int | tuple[int, int], int, str]
# A branch of a mixed block: steps in turn, each a conv's name, a pool's name, or a tuple of conv
# names that all read the same input and whose outputs are concatenated (the last blocks' splits).
Branch = Sequence[str | tuple[str, ...]]


class Mixed(nn.Module):
    """A mixed block: branches read the same input, their outputs are concatenated in order."""

    def __init__(self, convs: Sequence[Conv], branches: Sequence[Branch]):
        super().__init__()
        for name, *args in convs:
            self.add_module(name, ConvBN(*args))  # type: ignore[arg-type]
        self.branches = [list(branch) for branch in branches]

    def _step(self, step: str | tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
        if isinstance(step, tuple):
            return torch.cat([self.get_submodule(name)(x) for name in step], 1)
        return POOLS[step](x) if step in POOLS else self.get_submodule(step)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for branch in self.branches:
            y = x
            for step in branch:
                y = self._step(step, y)
            outputs.append(y)
        return torch.cat(outputs, 1)


def _block_35(c: int, pool_channels: int) -> Mixed:
    """Mixed_5b..5d, at 35x35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1."""
    return Mixed(
        [
            ("branch1x1", c, 64, 1, 1, SAME),
            ("branch5x5_1", c, 48, 1, 1, SAME),
            ("branch5x5_2", 48, 64, 5, 1, SAME),
            ("branch3x3dbl_1", c, 64, 1, 1, SAME),
            ("branch3x3dbl_2", 64, 96, 3, 1, SAME),
            ("branch3x3dbl_3", 96, 96, 3, 1, SAME),
            ("branch_pool", c, pool_channels, 1, 1, SAME),
        ],
        [
            ["branch1x1"],
            ["branch5x5_1", "branch5x5_2"],
            ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
            ["avg_3x3_same", "branch_pool"],
        ],
    )


def _reduce_35_to_17(c: int) -> Mixed:
    """Mixed_6a: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""
    return Mixed(
        [
            ("branch3x3", c, 384, 3, 2, VALID),
            ("branch3x3dbl_1", c, 64, 1, 1, SAME),
            ("branch3x3dbl_2", 64, 96, 3, 1, SAME),
            ("branch3x3dbl_3", 96, 96, 3, 2, VALID),
        ],
        [["branch3x3"], ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], ["max_3x3_stride2"]],
    )


def _block_17(c7: int) -> Mixed:
    """Mixed_6b..6e, at 17x17, 7x7 convolutions factored into 1x7 and 7x1."""
    return Mixed(
        [
            ("branch1x1", 768, 192, 1, 1, SAME),
            ("branch7x7_1", 768, c7, 1, 1, SAME),
            ("branch7x7_2", c7, c7, (1, 7), 1, SAME),
            ("branch7x7_3", c7, 192, (7, 1), 1, SAME),
            ("branch7x7dbl_1", 768, c7, 1, 1, SAME),
            ("branch7x7dbl_2", c7, c7, (7, 1), 1, SAME),
            ("branch7x7dbl_3", c7, c7, (1, 7), 1, SAME),
            ("branch7x7dbl_4", c7, c7, (7, 1), 1, SAME),
            ("branch7x7dbl_5", c7, 192, (1, 7), 1, SAME),
            ("branch_pool", 768, 192, 1, 1, SAME),
        ],
        [
            ["branch1x1"],
            ["branch7x7_1", "branch7x7_2", "branch7x7_3"],
            ["branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5"],
            ["avg_3x3_same", "branch_pool"],
        ],
    )


def _reduce_17_to_8() -> Mixed:
    """Mixed_7a: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""
    return Mixed(
        [
            ("branch3x3_1", 768, 192, 1, 1, SAME),
            ("branch3x3_2", 192, 320, 3, 2, VALID),
            ("branch7x7x3_1", 768, 192, 1, 1, SAME),
            ("branch7x7x3_2", 192, 192, (1, 7), 1, SAME),
            ("branch7x7x3_3", 192, 192, (7, 1), 1, SAME),
            ("branch7x7x3_4", 192, 192, 3, 2, VALID),
        ],
        [
            ["branch3x3_1", "branch3x3_2"],
            ["branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
            ["max_3x3_stride2"],
        ],
    )


def _block_8(c: int, pool: str) -> Mixed:
    """Mixed_7b and 7c, at 8x8, with 1x3 and 3x1 splits; 7c pools with a max (the graph's own quirk)."""
    return Mixed(
        [
            ("branch1x1", c, 320, 1, 1, SAME),
            ("branch3x3_1", c, 384, 1, 1, SAME),
            ("branch3x3_2a", 384, 384, (1, 3), 1, SAME),
            ("branch3x3_2b", 384, 384, (3, 1), 1, SAME),
            ("branch3x3dbl_1", c, 448, 1, 1, SAME),
            ("branch3x3dbl_2", 448, 384, 3, 1, SAME),
            ("branch3x3dbl_3a", 384, 384, (1, 3), 1, SAME),
            ("branch3x3dbl_3b", 384, 384, (3, 1), 1, SAME),
            ("branch_pool", c, 192, 1, 1, SAME),
        ],
        [
            ["branch1x1"],
            ["branch3x3_1", ("branch3x3_2a", "branch3x3_2b")],
            ["branch3x3dbl_1", "branch3x3dbl_2", ("branch3x3dbl_3a", "branch3x3dbl_3b")],
            [pool, "branch_pool"],
        ],
    )


# The stem, in order: convs by name, and pools.
STEM: list[Conv | str] = [
    ("Conv2d_1a_3x3", 3, 32, 3, 2, VALID),  # 299 -> 149
    ("Conv2d_2a_3x3", 32, 32, 3, 1, VALID),  # -> 147
    ("Conv2d_2b_3x3", 32, 64, 3, 1, SAME),
    "max_3x3_stride2",  # -> 73
    ("Conv2d_3b_1x1", 64, 80, 1, 1, VALID),
    ("Conv2d_4a_3x3", 80, 192, 3, 1, VALID),  # -> 71
    "max_3x3_stride2",  # -> 35
]


class FIDInceptionV3(nn.Module):
    """uint8 images (N, 3, H, W), any size -> (pool3 features (N, 2048), unbiased logits (N, 1008)), float32."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = [step if isinstance(step, str) else step[0] for step in STEM]
        for step in STEM:
            if not isinstance(step, str):
                self.add_module(step[0], ConvBN(*step[1:]))
        blocks = {
            "Mixed_5b": _block_35(192, 32),
            "Mixed_5c": _block_35(256, 64),
            "Mixed_5d": _block_35(288, 64),
            "Mixed_6a": _reduce_35_to_17(288),
            "Mixed_6b": _block_17(128),
            "Mixed_6c": _block_17(160),
            "Mixed_6d": _block_17(160),
            "Mixed_6e": _block_17(192),
            "Mixed_7a": _reduce_17_to_8(),
            "Mixed_7b": _block_8(1280, "avg_3x3_same"),
            "Mixed_7c": _block_8(2048, "max_3x3_same"),
        }
        for name, block in blocks.items():
            self.add_module(name, block)
        self.blocks = list(blocks)
        self.fc = nn.Linear(NUM_FEATURES, NUM_CLASSES)  # its bias is stored, and unused: IS takes unbiased logits

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = resize_bilinear_tf1(images.float(), INPUT_SIZE)
        x = (x - 128) / 128  # the graph multiplies by 1/128, a power of two: the same bits
        for step in self.stem:
            x = POOLS[step](x) if step in POOLS else self.get_submodule(step)(x)
        for name in self.blocks:
            x = self.get_submodule(name)(x)
        features = F.adaptive_avg_pool2d(x, 1).flatten(1)  # pool3: the average over the last 8x8
        return features, torch.mm(features, self.fc.weight.t())


def _source_pixels(
    in_size: int, out_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output pixel, TensorFlow 1.x's two source pixels and the weight of the second.
    TensorFlow computes in float32: scale = in / out, source = out_index * scale."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    source = torch.arange(out_size, dtype=torch.float32, device=device) * scale.to(device)
    lower = source.floor()
    upper = source.ceil().clamp(max=in_size - 1)
    return lower.long(), upper.long(), source - lower


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (N, C, H, W) -> (N, C, size, size) as TensorFlow 1.x's ResizeBilinear with
    align_corners=False: no antialiasing, output pixel i reads input i * in/out (no half-pixel
    offset), interpolated across the columns first, then the rows."""
    y_lo, y_hi, y_w = _source_pixels(x.shape[-2], size, x.device)
    x_lo, x_hi, x_w = _source_pixels(x.shape[-1], size, x.device)
    top, bottom = x.index_select(2, y_lo), x.index_select(2, y_hi)
    top = top.index_select(3, x_lo) + (top.index_select(3, x_hi) - top.index_select(3, x_lo)) * x_w
    bottom = bottom.index_select(3, x_lo) + (bottom.index_select(3, x_hi) - bottom.index_select(3, x_lo)) * x_w
    return top + (bottom - top) * y_w.view(-1, 1)


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """The weights file's keys and shapes: this network's state dict (built on the meta device: no memory)."""
    with torch.device("meta"):
        net = FIDInceptionV3()
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _refuse(path: Path, what: str, problem: str) -> SpecError:
    return user_error(f"not the FID Inception weights: {problem}", path=what, file=str(path), hint=HINT)


def _few(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_weights(path: str | os.PathLike, *, what: str = "features") -> dict[str, torch.Tensor]:
    """The state dict in PATH, read without running code and checked key by key, shape by shape;
    a file that is not torch-fidelity's FID Inception weights is a user error that says why."""
    from pipeline.safe_files import read_torch

    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise _refuse(path, what, "the file is empty")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < size and head[8:9] == b"{":
        raise _refuse(path, what, "it is a safetensors file, and the weights are torch-fidelity's .pth state dict")
    try:
        state = read_torch(path, map_location="cpu")
    except SpecError as exc:
        raise _refuse(path, what, f"it cannot be read as torch weights ({exc.issues[0].message})") from None
    if not isinstance(state, dict):
        raise _refuse(path, what, f"it holds a {type(state).__name__}, not a state dict (tensors by name)")
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise _refuse(path, what, f"{_few(not_tensors)} hold(s) no tensor")
    expected = expected_shapes()
    optional = {k for k in expected if k.endswith(".num_batches_tracked")}
    missing = [k for k in expected if k not in state and k not in optional]
    unknown = [k for k in state if k not in expected]
    if missing:
        raise _refuse(
            path, what, f"{len(missing)} of its {len(expected) - len(optional)} tensors are missing: {_few(missing)}"
        )
    if unknown:
        raise _refuse(path, what, f"it holds {len(unknown)} tensor(s) the network has no place for: {_few(unknown)}")
    misshaped = [
        f"{k} is {tuple(v.shape)}, not {expected[k]}" for k, v in state.items() if tuple(v.shape) != expected[k]
    ]
    if misshaped:
        raise _refuse(path, what, _few(misshaped))
    not_float = [k for k, v in state.items() if k not in optional and not v.is_floating_point()]
    if not_float:
        raise _refuse(path, what, f"{_few(not_float)} hold(s) {state[not_float[0]].dtype}, not floats")
    non_finite = [k for k, v in state.items() if k not in optional and not torch.isfinite(v).all()]
    if non_finite:
        raise _refuse(path, what, f"{_few(non_finite)} hold(s) NaN or infinite values")
    return state


def load_fid_inception(path: str | os.PathLike, *, what: str = "features") -> tuple[FIDInceptionV3, str]:
    """The FID Inception-v3 with the weights in PATH (checked by `read_weights`), and the file's sha256."""
    state = read_weights(path, what=what)
    with torch.device("meta"):
        net = FIDInceptionV3()
    net = net.to_empty(device="cpu")
    for name, buffer in net.named_buffers():
        if name.endswith(".num_batches_tracked") and name not in state:
            state[name] = torch.zeros_like(buffer, device="cpu")  # unused in eval mode
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False), sha256(path)
