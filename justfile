# Recipes take `spec=NAME` (a spec in specs/ or a path) and dotted `key=value` overrides as
# positional arguments, e.g. `just validate spec=biggan_deep_256 data.resolution=128`.

set positional-arguments

# The pipeline's recipes `exec` python, so its exit status reaches just unchanged (a shell in between
# turns a Ctrl-C that python handled into its own death by SIGINT), and print no exit message of
# just's: the pipeline prints its own errors, and a Ctrl-C exits quietly with status 130.

python := if path_exists(".venv/bin/python") == "true" { ".venv/bin/python" } else { "python3" }

# list the recipes
default:
    @just --list

# train (or resume) a run: just train [spec=NAME] [key=value ...] [procs=N | gpus=N]; default: the demo
[no-exit-message]
train *args:
    @exec {{python}} -m pipeline train "$@"

# check a spec and report shapes, parameters and FLOPs per node (no weights are allocated); gpus=N: memory per rank
[no-exit-message]
validate *args:
    @exec {{python}} -m pipeline validate "$@"

# sample a trained generator: just sample RUN_OR_WEIGHTS [--classes 0,3,7] [--num N] [--truncation T] [--interpolate latent|class] [--gif]
[no-exit-message]
sample *args:
    @exec {{python}} -m pipeline sample "$@"

# convert published weights into an export directory: just import-weights FORMAT PATH --spec NAME --out DIR [key=value ...]
[no-exit-message]
import-weights *args:
    @exec {{python}} -m pipeline import-weights "$@"

# write the JSON Schema of specs to spec.schema.json (editors complete and check spec YAML with it); --stdout prints it; --markdown FILE: the readable reference (docs/spec-reference.md)
[no-exit-message]
schema *args:
    @exec {{python}} -m pipeline schema "$@"

# run the test suite (CPU; GPU-only tests skip themselves)
test *args:
    @DS_ACCELERATOR=cpu {{python}} -m pytest -q "$@"

# the unit tests alone, in under 2 minutes: neither `slow` nor `integration` (trains, compiles, starts processes; tests/conftest.py)
test-fast *args:
    @DS_ACCELERATOR=cpu {{python}} -m pytest -q -m "not slow and not integration" "$@"

# lint, format and type check (ruff and mypy, configured in pyproject.toml); `just lint --fix` fixes what ruff can
lint *args:
    @{{python}} -m ruff check "$@" .
    @{{python}} -m ruff format --check .
    @{{python}} -m mypy

# time `validate` of the largest shipped spec (recorded in BENCHMARKS.md)
bench-validate spec="spec=biggan_deep_512":
    @{{python}} benchmarks/validate.py "{{spec}}"

# write the embedded demo shards (scikit-learn's handwritten digits at 32x32) to shards/demo
[no-exit-message]
demo-data *args:
    @exec {{python}} -m pipeline demo-data "$@"

# turn an image folder into WebDataset shards: just shards build SRC OUT [--resolution 256]; also check, index
[no-exit-message]
shards *args:
    @exec {{python}} -m pipeline shards "$@"

# seconds from `train` to its first logged step (the demo, shards present); --checkout DIR compares checkouts
bench-first-step *args:
    @{{python}} benchmarks/first_step.py "$@"

# `shards build` on a generated ImageNet-like folder (20,000 JPEGs, cached) beside a webdataset + PIL baseline
bench-shards *args:
    @{{python}} benchmarks/shards.py "$@"

# every GPU measurement in one run within a time budget (benchmarks/gpu.sh --dry-run: on the CPU, toy sizes)
bench-gpu *args:
    @bash benchmarks/gpu.sh "$@"

# the failure detectors: alarms on healthy demo runs, and a provoked collapse (D's lr 25x) rolled back
bench-failures *args:
    @{{python}} benchmarks/failures.py "$@"

# images/s of the DALI pipeline against a webdataset + PIL DataLoader on the same shards
bench-data *args:
    @{{python}} benchmarks/data.py "$@"

# time training iterations of a spec, eager and compiled (default: biggan_deep_128 at ch 32, batch 4)
bench-train *args:
    @{{python}} benchmarks/train.py "$@"

# where a training step's time goes: just profile spec=NAME [key=value ...] [--steps N] [--data synthetic] [procs=2]
[no-exit-message]
profile *args:
    @exec {{python}} -m pipeline profile "$@"

# FID / KID / IS / class accuracy of a run: just eval runs/demo [--truncation 0.25,0.5,1,none] [--features inception:PATH]
[no-exit-message]
eval *args:
    @exec {{python}} -m pipeline eval "$@"

# a trained generator as an ONNX model: just export RUN_OR_WEIGHTS --onnx OUT [--truncation T] [--standing-stats N] [--force]
[no-exit-message]
export *args:
    @exec {{python}} -m pipeline export "$@"

# seconds to export shipped specs (random weights) to ONNX, and onnxruntime's images against torch's
bench-onnx *args:
    @{{python}} benchmarks/onnx_export.py "$@"
