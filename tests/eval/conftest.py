"""Fixtures of the evaluation tests: torch-fidelity as the reference the FID Inception and the
scores are checked against, and a weights file in its format with random values."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from pipeline.eval.inception import expected_shapes


@pytest.fixture(scope="session")
def torch_fidelity():
    """torch-fidelity 0.4.0 (a dev dependency installed with --no-deps, see .ci/run), importable.

    It imports torchvision at package import (`torch_fidelity.datasets` imports CIFAR10/STL10/
    CIFAR100 and transforms; the CLIP/VGG/DINOv2 extractors import it too), and torchvision is not
    installed (it would pull its own torch). Its Inception extractor and its metrics never use
    torchvision, so a minimal stand-in module satisfies those imports, for the tests only, and is
    removed again afterwards together with torch_fidelity itself."""
    if importlib.util.find_spec("torch_fidelity") is None:
        pytest.skip("torch-fidelity is not installed: pip install --no-deps torch-fidelity==0.4.0")
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("a real torchvision is installed: these tests expect the stand-in")
    names = ["torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional"]
    names.append("torchvision.models")
    stand_ins = {name: types.ModuleType(name) for name in names}
    for name, module in stand_ins.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(stand_ins[parent], child, module)
    for dataset in ("CIFAR10", "CIFAR100", "STL10"):
        setattr(stand_ins["torchvision.datasets"], dataset, type(dataset, (), {}))
    sys.modules.update(stand_ins)
    try:
        import torch_fidelity as module

        assert module.__version__ == "0.4.0", f"the reference is torch-fidelity 0.4.0, not {module.__version__}"
        yield module
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "torch_fidelity")]:
            del sys.modules[name]


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The FID Inception's state dict with random values that keep its outputs finite and O(1):
    He-scaled convolutions, batch norms near the identity (running variance 1)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_shapes().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state[key] = torch.ones(shape)
        elif key.endswith(("running_mean", "bn.bias", "fc.bias")):
            state[key] = 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith("bn.weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:  # conv and fc weights
            state[key] = torch.randn(shape, generator=gen) * (2 / math.prod(shape[1:])) ** 0.5
    return state


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory) -> Path:
    """A weights file in torch-fidelity's exact format (its key names and shapes, a plain state
    dict saved by torch.save) holding random values: 95 MB, written once per session."""
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(random_inception_state(), path)
    return path
