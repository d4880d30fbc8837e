"""`export`: a trained generator written for other runtimes (ONNX, through pipeline.eval.onnx_export)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_export(ns) -> int:
    import torch

    from pipeline.eval.onnx_export import CHECK_TOLERANCE, LABELS, LATENT, OnnxRequest, check_destination, export_onnx
    from pipeline.eval.sampling import load_generator

    out = Path(ns.onnx)
    check_destination(out, ns.force)  # before the generator is loaded: the cheap refusal first
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")  # of the standing statistics
    gen = load_generator(ns.source, device=device)
    record = export_onnx(
        gen,
        out,
        OnnxRequest(
            truncation=ns.truncation,
            mode=ns.truncation_mode,
            standing_passes=ns.standing_stats,
            batch_size=ns.batch_size,
            seed=ns.seed,
            force=ns.force,
        ),
    )
    if ns.json:
        print(json.dumps(record, indent=2))
        return 0
    z_dim = record["inputs"][LATENT][1]
    labels = f", {LABELS} int64 [N] in 0 .. {gen.num_classes - 1}" if record["conditional"] else " (unconditional)"
    image = "x".join(map(str, record["output"]["image"][1:]))
    trunc = record["truncation"]
    at = "none" if trunc is None else f"{trunc['value']} ({trunc['mode']}): draw z so too, the model takes it as given"
    print(f"{gen.source} -> {out} ({record['bytes'] / 1e6:.1f} MB, exported in {record['export_seconds']:.1f} s)")
    print(f"  inputs: {LATENT} float32 [N, {z_dim}]{labels}; output: image float32 [N, {image}] in [-1, 1]")
    print(f"  standing statistics: {record['standing_stats']} passes at truncation {at}")
    if record["max_abs_diff"] is None:
        print("  not checked: onnxruntime is not installed")
    else:
        diff, n = record["max_abs_diff"], record["check_batch"]
        print(f"  onnxruntime (CPU) against torch, batch {n}: max |diff| {diff:.2e}")
        if diff > CHECK_TOLERANCE:
            print(
                f"warning: the ONNX model's images differ from torch's by up to {diff:.2e} (more than "
                f"{CHECK_TOLERANCE:g}); check them before relying on the model",
                file=sys.stderr,
            )
    return 0
