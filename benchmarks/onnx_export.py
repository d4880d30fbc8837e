"""`export --onnx` of shipped specs with random weights: seconds to export, file size, and the
largest difference between onnxruntime's images (CPU) and torch's for the same inputs, beside
torch's own float32 error (against float64) for scale.

    python benchmarks/onnx_export.py [SPEC ...]     (default: demo dcgan_demo)

Each spec's generator is built with random weights (normal init; attention's gain set to 0.5 so
that attention counts), written as RUN/export/ the way a finished run writes it, and exported with
2 standing-statistics passes of 4 (their number does not change the graph). The export time is
the export alone: torch.export, the conversion to ONNX, its optimization and saving.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.eval.onnx_export import OnnxRequest, export_onnx
from pipeline.eval.sampling import load_generator, sample_latents
from pipeline.graph import build_network
from pipeline.runs import Run
from pipeline.spec import load_spec

BATCH = 4  # not the batch exported at (2)


def random_export(spec_name: str, root: Path) -> Path:
    torch.manual_seed(0)
    loaded = load_spec(spec_name, ["generator.init=normal"])
    net = build_network(loaded, "generator")
    with torch.no_grad():
        for key, p in net.named_parameters():
            if key.endswith("gamma"):
                p.fill_(0.5)
    return Run(root).write_export({"generator": net}, loaded.spec.resolved())


@torch.no_grad()
def measure(name: str, tmp: Path) -> str:
    import onnxruntime

    gen = load_generator(random_export(name, tmp / name))
    out = tmp / f"{name}.onnx"
    record = export_onnx(gen, out, OnnxRequest(standing_passes=2, batch_size=4))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = torch.Generator().manual_seed(1)
    z = sample_latents(BATCH, gen.z_dim, None, generator=rng)
    y = torch.randint(gen.spec.data.num_classes or 1, (BATCH,), generator=rng)
    feeds = {"z": z.numpy(), "y": y.numpy()}
    got = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    labels = y if record["conditional"] else None
    want = gen.module(z, labels).numpy()
    exact = copy.deepcopy(gen.module).double()(z.double(), labels).numpy()
    params = sum(p.numel() for p in gen.module.parameters())
    return (
        f"| {name} | {params / 1e6:.2f}M | {record['bytes'] / 1e6:.1f} | {record['export_seconds']:.1f} "
        f"| {np.abs(got - want).max():.1e} | {np.abs(want - exact).max():.1e} | {np.abs(got - exact).max():.1e} |"
    )


def main(specs: list[str]) -> None:
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, batch {BATCH}")
    print("| spec | G params | .onnx MB | export s | max abs ONNX - torch | torch fp32 - fp64 | ONNX - fp64 |")
    print("|---|---|---|---|---|---|---|")
    for name in specs:
        with tempfile.TemporaryDirectory() as tmp:
            print(measure(name, Path(tmp)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["demo", "dcgan_demo"])
