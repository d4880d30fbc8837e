"""One entry point: `python -m pipeline <command> [spec=NAME | SPEC] [key=value ...]`.

User errors (bad specs, bad overrides, missing files) print what is wrong, where and how to fix
it, and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.commands.data import cmd_demo_data, cmd_shards_build, cmd_shards_check, cmd_shards_index
from pipeline.commands.export import cmd_export
from pipeline.commands.results import cmd_eval, cmd_sample
from pipeline.commands.run import cmd_profile, cmd_train
from pipeline.commands.specs import SCHEMA_FILE, cmd_schema, cmd_validate
from pipeline.commands.weights import cmd_import_weights
from pipeline.data import DEMO_DOMAIN_SHARDS, DEMO_SHARDS
from pipeline.errors import SpecError


def add_drawing_options(p: argparse.ArgumentParser, *, standing_stats: str) -> None:
    """How `sample`, `eval` and `export` draw from a generator: the truncation's mode, the standing
    BatchNorm statistics (`standing_stats` says what they are for the command) and the batch."""
    from pipeline.eval.protocol import STANDING_STATS_BATCH, STANDING_STATS_PASSES

    p.add_argument(
        "--truncation-mode",
        choices=("truncate", "scale"),
        default="truncate",
        help="truncate: redraw values beyond the threshold (the BigGAN paper); scale: multiply the "
        "standard deviation (BigGAN-PyTorch's code). Default truncate",
    )
    p.add_argument(
        "--standing-stats",
        type=int,
        metavar="N",
        help=f"{standing_stats} (default: the spec's eval.standing_stats, {STANDING_STATS_PASSES} unless the spec "
        "says otherwise)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=STANDING_STATS_BATCH,
        help=f"images per forward pass, and per standing-statistics pass (default {STANDING_STATS_BATCH})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    # DeepSpeed's launcher passes --local_rank=N before the command; the rank is read from the
    # environment it also sets (LOCAL_RANK), so the flag is accepted and not used
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a spec; report shapes, parameters and FLOPs (no weights allocated)")
    p.add_argument(
        "args",
        nargs="*",
        metavar="SPEC|key=value",
        help="spec=NAME or a path, then overrides; gpus=N or procs=N (and nodes=N): check the batch split "
        "over that many ranks and estimate memory per rank",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="memory per device, e.g. 80GiB: estimate memory per rank and the largest batch per rank that fits "
        "(default with gpus=N: 80GiB, an H100's)",
    )
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("train", help="train (or resume) the run a spec describes; default: the demo")
    p.add_argument(
        "args",
        nargs="*",
        metavar="SPEC|key=value",
        help="spec=NAME (default demo), overrides, procs=N (CPU ranks) or gpus=N, device=cpu|cuda",
    )
    p.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="memory per GPU, e.g. 80GiB, for the warning given before gpus=N trains a batch split that would not "
        "fit (default: what nvidia-smi reports, else 80GiB)",
    )
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("profile", help="time training steps of a spec: images/s, phases, FLOPs, MFU, a trace")
    p.add_argument(
        "args",
        nargs="*",
        metavar="SPEC|key=value",
        help="spec=NAME (default demo), overrides, procs=N (CPU ranks) or gpus=N, device=cpu|cuda",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included (default 3)")
    p.add_argument(
        "--data",
        choices=("real", "synthetic"),
        default="real",
        help="synthetic: random tensors on the device instead of the loader",
    )
    p.add_argument("--model", choices=("full", "none"), default="full", help="none: time the loader alone")
    p.add_argument("--trace-steps", type=int, default=2, help="steps traced by torch.profiler (default 2)")
    p.set_defaults(func=cmd_profile)
    shards = sub.add_parser("shards", help="write, check and index WebDataset shards").add_subparsers(
        dest="shards_command", required=True
    )
    p = shards.add_parser("build", help="turn an image folder (one sub-folder per class, or a CSV) into shards")
    p.add_argument("src", help="ImageNet-style folder: one sub-folder per class (or any folder with --csv)")
    p.add_argument("out", help="directory to write shards, index files and manifest.json to")
    p.add_argument("--csv", help="CSV of path,label (paths relative to SRC) instead of class sub-folders")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--resolution", type=int, help="downscale so the shorter side is this many pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default 0)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")
    p.add_argument("--overwrite", action="store_true", help="replace shards of a different earlier build in OUT")
    p.set_defaults(func=cmd_shards_build)
    p = shards.add_parser("check", help="read every sample back through DALI and compare with the manifest")
    p.add_argument("dir", help="a directory written by shards build")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_shards_check)
    p = shards.add_parser("index", help="write missing DALI index files (.idx) beside .tar shards")
    p.add_argument("dir")
    p.set_defaults(func=cmd_shards_index)
    p = sub.add_parser(
        "demo-data",
        help="write the embedded demo shards (scikit-learn's digits at 32x32) and the two-domain digits "
        "(image-to-image demo), and train the demo classifier beside each",
    )
    p.add_argument("--out", default=DEMO_SHARDS, help=f"output directory (default {DEMO_SHARDS})")
    p.add_argument(
        "--domains-out",
        default=DEMO_DOMAIN_SHARDS,
        help=f"output directory of the two domains, as a/ and b/ (default {DEMO_DOMAIN_SHARDS})",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild the shards and retrain the classifier even if complete ones are there",
    )
    p.set_defaults(func=cmd_demo_data)
    # sample and eval: what is not given follows the protocol of the run's own spec (`eval:`)
    p = sub.add_parser("sample", help="write sample grids, per-image PNGs and interpolations of a trained generator")
    p.add_argument(
        "source",
        metavar="RUN_OR_WEIGHTS",
        help="a run directory (its latest checkpoint; the EMA when there is one), a checkpoint, an "
        "export directory or a generator.safetensors file",
    )
    p.add_argument(
        "--classes", help="class numbers, e.g. 0,3,7, or all (default: all classes, up to 10 spread over the range)"
    )
    p.add_argument("--num", type=int, default=8, help="images per class (default 8)")
    p.add_argument("--truncation", type=float, help="truncation threshold (or scale); default: none, z ~ N(0, 1)")
    add_drawing_options(p, standing_stats="forward passes of standing BatchNorm statistics before sampling; 0: off")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents (default 0)")
    p.add_argument("--out", help="output directory (default RUN/samples/sample-TIME-seedS, or beside the weights)")
    p.add_argument(
        "--interpolate",
        choices=("latent", "class"),
        help="also write an interpolation strip: latent (slerp, one row per class) or class (the "
        "class embedding from one --classes entry to the next, --num rows)",
    )
    p.add_argument("--steps", type=int, default=8, help="interpolation steps (default 8)")
    p.add_argument("--gif", action="store_true", help="also write the interpolation as an animated GIF")
    p.add_argument(
        "--input",
        metavar="SHARDS",
        help="image-to-image runs: translate the first --num images of these shards (default: each domain's own)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("eval", help="FID, KID, IS and class accuracy of a run's generator (or exported weights)")
    p.add_argument("source", help="a run directory, an export directory or a generator.safetensors file")
    p.add_argument(
        "--num",
        type=int,
        help="generated images, classes balanced (default: the spec's eval.num_samples, 1000 unless the "
        "spec says otherwise; published FIDs use 50,000)",
    )
    p.add_argument(
        "--truncation",
        help="threshold, or a sweep: 0.25,0.5,1,none (default: the spec's eval.truncation, none unless the "
        "spec says otherwise)",
    )
    add_drawing_options(p, standing_stats="passes of standing BatchNorm statistics; 0: off")
    p.add_argument(
        "--features",
        help="demo (the classifier beside the shards), demo:PATH or inception:PATH (the FID Inception "
        "weights file; nothing is downloaded). Default: the spec's eval.features, demo unless it says otherwise",
    )
    p.add_argument("--shards", help="real data to compare with (default: the spec's data.shards)")
    p.add_argument(
        "--real-stats",
        metavar="NPZ",
        help="published statistics of the real data instead of --shards: an .npz with mu and sigma (TTUR, "
        "BigGAN-PyTorch, clean-fid), of the --features network's features; FID only, KID needs real features",
    )
    p.add_argument("--seed", type=int, help="seed of the latents (default: the spec's seed, as in training)")
    p.add_argument("--device", choices=("cpu", "cuda"))
    p.add_argument("--out", help="directory for the JSON and plot (default RUN/eval)")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser(
        "export", help="write a trained generator as an ONNX model: latent (and class) in, image in [-1, 1] out"
    )
    p.add_argument(
        "source",
        metavar="RUN_OR_WEIGHTS",
        help="a run directory (its latest checkpoint; the EMA when there is one), a checkpoint, an "
        "export directory or a generator.safetensors file",
    )
    p.add_argument("--onnx", metavar="OUT", required=True, help="the ONNX file to write (its directory must exist)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--truncation",
        type=float,
        help="the truncation the model will be sampled at: the standing statistics are measured there and "
        "it is recorded in the model; the model takes z as given (draw it truncated). Default: none",
    )
    add_drawing_options(
        p, standing_stats="passes of standing BatchNorm statistics frozen into the model; 0: the running statistics"
    )
    p.add_argument("--seed", type=int, default=0, help="the statistics use seed + 1, as `sample --seed` does")
    p.add_argument("--device", choices=("cpu", "cuda"), help="for the standing statistics (default: cuda if available)")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser(
        "import-weights", help="convert published weights (BigGAN-PyTorch, ...) into an export directory of a spec"
    )
    p.add_argument("format", help="biggan-pytorch (G.pth, G_ema.pth, D.pth) or pretrained-biggan (pytorch_model.bin)")
    p.add_argument("path", help="the folder holding the format's files, or one of them")
    p.add_argument("--spec", required=True, help="the spec the weights belong to (a name in specs/ or a path)")
    p.add_argument("--out", required=True, help="the export directory to write (new or empty)")
    p.add_argument("args", nargs="*", metavar="key=value", help="overrides of the spec")
    p.set_defaults(func=cmd_import_weights)
    p = sub.add_parser(
        "schema", help="write the JSON Schema of specs (for editor completion), or the spec reference in Markdown"
    )
    p.add_argument(
        "output", nargs="?", metavar="FILE", help=f"file to write (default {SCHEMA_FILE}); - prints it instead"
    )
    p.add_argument("-o", "--output", dest="output_option", metavar="FILE", help="the same as FILE")
    p.add_argument("--stdout", action="store_true", help="print the JSON Schema instead of writing a file")
    p.add_argument(
        "--markdown",
        metavar="FILE",
        help="write the spec reference (every section, field, type, default and description; methods and "
        "block kinds) as Markdown to FILE, e.g. docs/spec-reference.md; the JSON only if asked for as well",
    )
    p.set_defaults(func=cmd_schema)
    return parser


def print_refusal(exc: SpecError) -> None:
    """Print a user error once per run: under a launcher, every rank refuses the same spec, so
    ranks other than 0 stay silent about errors found before the ranks connected; after that an
    error may concern one rank alone (its shards), and each rank says its own, prefixed."""
    from pipeline.train.preflight import rank_from_environment, world_size_from_environment

    prefix = ""
    if world_size_from_environment() > 1:
        import torch.distributed

        if not torch.distributed.is_initialized():
            if rank_from_environment() != 0:
                return
        else:
            prefix = f"rank {rank_from_environment()}: "
    n = len(exc.issues)
    print(f"{prefix}error: {n} problem{'s' if n != 1 else ''} found", file=sys.stderr)
    for issue in exc.issues:
        print("  " + issue.format().replace("\n", "\n  "), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # spec words may follow options (`profile --steps 5 spec=x`): argparse leaves them over
    ns, extra = parser.parse_known_args(argv)
    if extra and hasattr(ns, "args") and not any(a.startswith("-") for a in extra):
        ns.args += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(ns, "output_option", None):
        ns.output = ns.output_option
    try:
        code = ns.func(ns)
        sys.stdout.flush()  # a broken pipe shows here, not in the flush at exit
        return code
    except BrokenPipeError:
        # the reader of our output went away (`schema --stdout | head`): no traceback, and no second
        # error when Python flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a process the signal ended
    except SpecError as exc:
        print_refusal(exc)
        return 2
    except KeyboardInterrupt as exc:  # train's own says which checkpoint it wrote
        print(str(exc) or "interrupted", file=sys.stderr)
        return 130
