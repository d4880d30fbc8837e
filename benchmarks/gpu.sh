#!/usr/bin/env bash
# Every GPU measurement in one run, most important first, within a time budget (the device tool
# lends about 10 minutes a call):
#
#   benchmarks/gpu.sh [--dry-run] [--budget SECONDS] [--only STAGE,...] [--out DIR]
#
# Stages, in order (--only picks some; a stage that would not fit the time left is skipped and
# listed as such in the summary):
#   install    pip install the project: from wheels in $WHEELS (default wheels/) when present
#   smoke      `train` the demo for 20 steps on the GPU (real shards through DALI if it imports,
#              else synthetic data)
#   eager      `profile` biggan_deep_256, bf16, eager, batch 64, 128 and 256 (synthetic data)
#   fused      eager, batch 128, with fused Adam (train.g_opt.fused, train.d_opt.fused)
#   cold       the same compiled (regional), batch 128, with an empty inductor cache
#   warm       again with the cache `cold` filled: cold versus warm compile seconds
#   whole      compiled whole-graph, batch 128
#   graphs     compiled with CUDA graphs (compile.mode=reduce-overhead), batch 128
#   reference  the authors' BigGAN-PyTorch iteration beside ours (needs $REFERENCE, a checkout)
#   loader     the DALI GPU loader alone on real shards (`profile --model none`; needs DALI and
#              $SHARDS, a shard directory)
#
# Each profile writes OUT/STAGE/profile/report.json and report.md; OUT/summary.md gathers images/s,
# MFU, compile seconds and peak memory of them all. --dry-run runs every stage on the CPU at toy
# size (tiny_biggan_deep, batches 2-8, one step, tracing-only compilation), to check the script
# before device time is spent on it.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
BUDGET=540
ONLY=""
OUT="benchmarks/results/gpu-$(date +%F)"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --budget) BUDGET="$2"; shift ;;
        --only) ONLY="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        *) echo "usage: benchmarks/gpu.sh [--dry-run] [--budget SECONDS] [--only STAGE,...] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
if [ "$DRY" = 1 ]; then
    OUT="${OUT%/}-dry-run"
fi
mkdir -p "$OUT"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python

if [ "$DRY" = 1 ]; then
    export DS_ACCELERATOR=cpu
    SPEC=tiny_biggan_deep
    BATCHES="2 4 8"
    BATCH=4
    STEPS="--steps 1 --warmup 1 --trace-steps 1"
    DEVICE=(device=cpu)
    COMPILE=(compile.enabled=true compile.backend=aot_eager)
    SHARDS="${SHARDS:-shards/demo}"
else
    SPEC=biggan_deep_256
    BATCHES="64 128 256"
    BATCH=128
    STEPS="--steps 8 --warmup 3 --trace-steps 2"
    DEVICE=()
    COMPILE=(compile.enabled=true)
fi
COMMON=(train.precision=bf16 "${DEVICE[@]}")
SUMMARY=()
START=$SECONDS

# a stage runs when picked (--only) and when its estimate fits the time left; $1 name, $2 seconds
want() {
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$1,"* ]]; then
        return 1
    fi
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$DRY" = 0 ] && [ "$2" -gt "$left" ]; then
        SUMMARY+=("| $1 | skipped: needs about $2 s, $left s left | | | | |")
        return 1
    fi
    echo "== $1 ($((SECONDS - START)) s in)"
}

# `profile` into OUT/NAME; the rest of the arguments are overrides and options
profile() {
    local name="$1"; shift
    local log="$OUT/$name.log"
    if "$PY" -m pipeline profile "spec=$SPEC" "run.dir=$OUT/$name" "${COMMON[@]}" "$@" >"$log" 2>&1; then
        echo "   $(tail -n 1 "$log")"
    else
        echo "   failed, see $log: $(tail -n 2 "$log" | head -c 400)"
        SUMMARY+=("| $name | failed: see $log | | | | |")
    fi
}

if want install 120; then
    WHEELS="${WHEELS:-wheels}"
    if [ "$DRY" = 1 ]; then
        echo "   (dry run: the checkout's environment is used)"
    elif [ -d "$WHEELS" ]; then
        "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" -e . >"$OUT/install.log" 2>&1 || {
            echo "   install failed, see $OUT/install.log"; exit 1; }
    else
        "$PY" -m pip install --quiet --no-deps -e . >"$OUT/install.log" 2>&1 || {
            echo "   install failed, see $OUT/install.log"; exit 1; }
    fi
    "$PY" - >"$OUT/environment.txt" 2>&1 <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
try:
    import nvidia.dali as dali
    print("dali", dali.__version__)
except ImportError:
    print("dali: not installed")
EOF
    cat "$OUT/environment.txt"
fi

if want smoke 60; then
    DATA=(data.synthetic=true data.shards=null)
    if "$PY" -c "import nvidia.dali" 2>/dev/null; then
        DATA=()
    fi
    "$PY" -m pipeline train spec=demo "run.dir=$OUT/smoke" train.max_steps=20 train.log_every=10 eval.every=null \
        "${DATA[@]}" "${DEVICE[@]}" >"$OUT/smoke.log" 2>&1 && echo "   trained 20 steps" || {
        echo "   failed, see $OUT/smoke.log"; SUMMARY+=("| smoke | failed: see $OUT/smoke.log | | | | |"); }
fi

if want eager 150; then
    for b in $BATCHES; do
        profile "eager_$b" "train.batch_size=$b" $STEPS --data synthetic
    done
fi

if want fused 60; then
    profile "fused_$BATCH" "train.batch_size=$BATCH" train.g_opt.fused=true train.d_opt.fused=true $STEPS --data synthetic
fi

CACHE="$OUT/inductor-cache"
if want cold 360; then
    rm -rf "$CACHE"
    TORCHINDUCTOR_CACHE_DIR="$CACHE" profile "cold_$BATCH" "train.batch_size=$BATCH" "${COMPILE[@]}" $STEPS --data synthetic
fi
if want warm 90; then
    TORCHINDUCTOR_CACHE_DIR="$CACHE" profile "warm_$BATCH" "train.batch_size=$BATCH" "${COMPILE[@]}" $STEPS --data synthetic
fi
if want whole 360; then
    profile "whole_$BATCH" "train.batch_size=$BATCH" "${COMPILE[@]}" compile.scope=whole $STEPS --data synthetic
fi
if want graphs 360; then
    if [ "$DRY" = 1 ]; then
        GRAPHS=()  # CUDA graphs need a GPU: the dry run checks the stage's plumbing only
    else
        GRAPHS=(compile.mode=reduce-overhead)
    fi
    profile "graphs_$BATCH" "train.batch_size=$BATCH" "${COMPILE[@]}" "${GRAPHS[@]}" $STEPS --data synthetic
fi

if want reference 120; then
    if [ -n "${REFERENCE:-}" ] && [ -d "$REFERENCE" ]; then
        "$PY" benchmarks/train.py "spec=$SPEC" "train.batch_size=$BATCH" "${COMMON[@]}" --modes eager \
            --reference "$REFERENCE" --steps 3 --warmup 1 --json "$OUT/reference.json" >"$OUT/reference.log" 2>&1 \
            && tail -n 4 "$OUT/reference.log" || echo "   failed, see $OUT/reference.log"
    else
        echo "   skipped: set REFERENCE to a checkout of ajbrock/BigGAN-PyTorch"
        SUMMARY+=("| reference | skipped: REFERENCE not set | | | | |")
    fi
fi

if want loader 90; then
    if [ -n "${SHARDS:-}" ] && "$PY" -c "import nvidia.dali" 2>/dev/null; then
        profile loader "train.batch_size=$BATCH" "data.shards=$SHARDS" --model none --steps 20 --warmup 3
    else
        echo "   skipped: needs nvidia-dali and SHARDS (a shard directory)"
        SUMMARY+=("| loader | skipped: needs nvidia-dali and SHARDS | | | | |")
    fi
fi

# the summary: one line per profile written
{
    echo "# GPU measurements ($(date +%F), $(head -n 2 "$OUT/environment.txt" 2>/dev/null | tr '\n' ' '))"
    echo
    echo "| run | images/s | s per step | MFU | compile s | peak memory GiB |"
    echo "|---|---:|---:|---:|---:|---:|"
    for report in "$OUT"/*/profile/report.json; do
        [ -f "$report" ] || continue
        "$PY" - "$report" <<'EOF'
import json, sys
from pathlib import Path
path = Path(sys.argv[1])
r = json.loads(path.read_text())
name = path.parent.parent.name
if "iteration_s" not in r:  # the loader alone
    print(f"| {name} | {r['loader_images_per_s']:,.0f} (loader alone) | | | | |")
else:
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "?"
    compile_s = f"{r['compile_s']:.0f}" if r.get("compile_s") is not None else ""
    memory = max(r["peak_memory_bytes_per_rank"]) / 2**30
    print(f"| {name} | {r['images_per_s']:,.1f} | {r['iteration_s']:.3f} | {mfu} | {compile_s} | {memory:.1f} |")
EOF
    done
    printf '%s\n' "${SUMMARY[@]}"
} >"$OUT/summary.md"
cat "$OUT/summary.md"
echo "($((SECONDS - START)) s)"
