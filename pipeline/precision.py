"""`train.precision` as torch sees it: the dtype of images and of autocast's matrix products.

bf16 is `torch.autocast` (convolutions and matrix products in bf16; norms, losses, master weights
and optimizer states in fp32), not DeepSpeed's bf16 mode (see pipeline/distributed/engines.py).
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def autocast(device_type: str, precision: str) -> torch.autocast:
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
