"""`train.precision` as torch sees it: the dtype of images and of autocast's matrix products.

bf16 is `torch.autocast` (convolutions and matrix products in bf16; norms, losses, master weights
and optimizer states in fp32), not DeepSpeed's bf16 mode (see pipeline/distributed/engines.py).
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(device_type: str, precision: str) -> torch.autocast:
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """`x` promoted from half precision (bf16/fp16, e.g. logits under autocast) to float32, so
    that losses and reductions over many values keep their digits; float32 and float64 stay as
    they are (float64 comparisons with reference code stay exact)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
