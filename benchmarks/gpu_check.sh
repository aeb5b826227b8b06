#!/usr/bin/env bash
# One-shot GPU check: the full-size MolmoE table on one H100/H200 in under 8 minutes, from a fresh machine.
#
#   bash benchmarks/gpu_check.sh [ORIGINAL_DIR]    # GPU: full shapes, random weights built on the GPU
#   bash benchmarks/gpu_check.sh --dry-run         # CPU, tiny shapes, one repeat: checks the plumbing
#
# ORIGINAL_DIR (optional): a folder with the original HF remote code of MolmoE-1B-0924 (config_molmoe.py,
# modeling_molmoe.py), timed beside ours by benchmarks/peers.py. Results: every step's JSON and the
# table (gpu_check.json, gpu_check.md) under $OUT if set, else ./gpu_check_out. Nothing is downloaded:
# the package runs from this working tree (PYTHONPATH); torch, transformers, safetensors, tokenizers,
# numpy, tqdm and pillow must be installed. Each step has its own time limit; a step that fails or runs
# out of time leaves its rows out of the table and the script exits 1 after printing what it has.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
DRY=0
ORIGINAL=""
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check: unknown option $arg (expected --dry-run or ORIGINAL_DIR)" >&2; exit 2 ;;
        *) ORIGINAL=$arg ;;
    esac
done
if [[ -n $ORIGINAL && ! -f $ORIGINAL/modeling_molmoe.py ]]; then
    echo "gpu_check: $ORIGINAL has no modeling_molmoe.py (expected the original MolmoE remote code there)" >&2
    exit 2
fi
RESULTS=${OUT:-$PWD/gpu_check_out}
mkdir -p "$RESULTS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$SECONDS

# "Install": the package from this tree, its dependencies checked (the GPU machine may be offline).
if ! "$PY" -c "import torch, transformers, safetensors, tokenizers, numpy, tqdm, PIL, lmms_adaptive.core.runtime"; then
    echo "gpu_check: $PY lacks a dependency above; install torch transformers safetensors tokenizers numpy tqdm pillow" >&2
    exit 2
fi
if ((DRY)); then
    SIZE=tiny DEVICE=cpu BLOCKS=6,8 FULL_BLOCKS=8 REPEATS=1 REQUESTS=2 NEW=3
    LIMITS=(300 300 300 300) # seconds: knobs, graphs, controller, peers
else
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA GPU visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')," \
            "$(command -v nvidia-smi >/dev/null && nvidia-smi -L | head -1 || echo 'no nvidia-smi'));" \
            "run it on a GPU machine, or with --dry-run" >&2
        exit 2
    fi
    SIZE=full DEVICE=cuda BLOCKS=12,16 FULL_BLOCKS=16 REPEATS=3 REQUESTS=10 NEW=32
    LIMITS=(120 150 60 90) # 7 minutes at most, with room for the checks above and the table
    # the original loads our checkpoint from disk (~1 minute more): 8 minutes at most
    [[ -n $ORIGINAL ]] && LIMITS=(120 120 60 180)
    nvidia-smi -L || true
fi

failed=0
step() { # name, time limit (s), command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s, at $((SECONDS - start))s)"
    timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    if ((rc != 0)); then
        echo "gpu_check: step $name failed (exit $rc$( ((rc == 124)) && echo ', out of time'))" >&2
        failed=1
    fi
}

B="$ROOT/benchmarks"
PEER_ARGS=()
[[ -n $ORIGINAL ]] && PEER_ARGS=(--original "$ORIGINAL")
COMMON=(--size "$SIZE" --device "$DEVICE" --image 1280x720)
step knobs "${LIMITS[0]}" "$PY" "$B/knob_latency.py" "${COMMON[@]}" --tiers 12 --top-k 4,8 --blocks "$BLOCKS" \
    --repeats "$REPEATS" --new-tokens "$NEW" --json "$RESULTS/knobs.json"
# Eager vs graphs: the compiled decode, where this tree's knob_latency.py offers it.
if ((!DRY)) && "$PY" "$B/knob_latency.py" --help | grep -q -- "--compile"; then
    step graphs "${LIMITS[1]}" "$PY" "$B/knob_latency.py" "${COMMON[@]}" --tiers 12 --top-k 4,8 --blocks "$FULL_BLOCKS" \
        --compile --repeats "$REPEATS" --new-tokens "$NEW" --json "$RESULTS/graphs.json"
fi
step controller "${LIMITS[2]}" "$PY" "$B/controller_overhead.py" "${COMMON[@]}" --requests "$REQUESTS" --new-tokens 8 \
    --json "$RESULTS/controller.json"
step peers "${LIMITS[3]}" "$PY" "$B/peers.py" --size "$SIZE" --device "$DEVICE" --image 1280x720 --top-k 8,4 --repeats "$REPEATS" \
    --new-tokens "$NEW" "${PEER_ARGS[@]}" --json "$RESULTS/peers.json"
"$PY" "$B/gpu_table.py" "$RESULTS" || failed=1
echo "gpu_check: $((SECONDS - start))s in all; results in $RESULTS"
exit $failed
