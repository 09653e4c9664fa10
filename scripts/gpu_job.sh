#!/usr/bin/env bash
# One whole training experiment in one call of a lent GPU machine (the `device` tool: 15 minutes of H200 time per
# task, a bare Python 3.12 + torch there, no network, results only through $OUT: at most 8 files of 16 MiB).
#
#   bash scripts/gpu_job.sh prepare                  # HERE: wheels the machine lacks -> .whl/, ../shared/data -> .device-data/
#   bash scripts/gpu_job.sh run RECIPE SECONDS [key.path=value ...]   # THERE (carry .whl and .device-data), e.g.
#        device run: bash scripts/gpu_job.sh run configs/train/sam3d_default.yaml 420
#
# `run`: installs the wheels, times 30 steps of the recipe to size the run so that it ends (cosine schedule done)
# within SECONDS of training, trains, exports float16 weights, evaluates them on the held-out volumes (center
# protocol, 5 clicks, random walker beside), and leaves in $OUT: the weights split into <16 MiB parts
# (`cat $OUT/model.part.* > model.safetensors`), model.yaml, logs.tar.gz (metrics, validation, recipe, summary)
# and eval_<set>.md. Locally (no $OUT) it writes into runs/gpu_job/out; the tests run it with a tiny recipe.
# Environment: SAM3D_JOB_SETS (held-out sets, default "totalseg_mr colin27_aal"), SAM3D_JOB_CLICKS (default 5).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
log() { echo "[gpu_job $(date +%H:%M:%S)] $*" >&2; }

prepare() {
    local py=${SAM3D_PYTHON:-.venv/bin/python}
    rm -rf .whl .device-data
    mkdir -p .whl
    # pure-Python wheels at the versions requirements.txt pins (the machine has torch, numpy, scipy, scikit-image,
    # safetensors, PyYAML, tqdm, matplotlib, tensorboard)
    local want=()
    for name in monai pytorch-ignite nibabel; do
        want+=("$(grep -i -m1 "^$name==" requirements.txt)")
    done
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl "${want[@]}"
    cp -r ../shared/data .device-data
    du -sh .whl .device-data >&2
}

steps_per_second() {  # from a probe run's metrics.csv: steps 10..last over their seconds (after warm-up)
    python3 - "$1" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
a, b = rows[min(9, len(rows) - 2)], rows[-1]
print((int(b["step"]) - int(a["step"])) / max(float(b["seconds"]) - float(a["seconds"]), 1e-6))
PY
}

run() {
    local recipe=$1 seconds=$2
    shift 2
    local out=${OUT:-$ROOT/runs/gpu_job/out} work=${SAM3D_JOB_WORK:-/tmp/sam3d_job}
    mkdir -p "$out"
    rm -rf "$work"
    mkdir -p "$work"
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" .whl/*.whl
        export PYTHONPATH="$work/site:$ROOT/lib:${PYTHONPATH:-}"
    else
        export PYTHONPATH="$ROOT/lib:${PYTHONPATH:-}"
    fi
    local data=.device-data
    [ -d "$data" ] || data=../shared/data
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' >&2
    local common=("data.dir=$ROOT/$data" "log.progress=false" "log.tensorboard=false" "$@")
    log "probe: 30 steps of $recipe"
    python3 scripts/train.py --config "$recipe" "${common[@]}" train.steps=30 validation.every=0 \
        checkpoint.every=1000 "output=$work/probe" >"$work/probe.log" 2>&1 || { tail -50 "$work/probe.log"; exit 1; }
    local rate steps
    rate=$(steps_per_second "$work/probe/metrics.csv")
    steps=$(python3 -c "print(max(30, int($rate * $seconds * 0.92)))")
    log "$rate steps/s -> $steps steps in ${seconds}s"
    python3 scripts/train.py --config "$recipe" "${common[@]}" "train.steps=$steps" "train.max_minutes=$(python3 -c "print($seconds / 60 * 1.1)")" \
        "output=$work/run" 2>&1 | tee "$work/train.log" | grep -E "validation|checkpoint|max_minutes|Error|error" >&2 || true
    [ -f "$work/run/summary.json" ] || { tail -50 "$work/train.log"; exit 1; }
    python3 scripts/export_weights.py "$work/run/model.safetensors" "$work/model.safetensors" --half >&2
    split -b 15m -d "$work/model.safetensors" "$out/model.part."
    cp "$work/model.yaml" "$out/model.yaml"
    cp "$work/probe.log" "$work/train.log" "$work/run/"
    tar -czf "$out/logs.tar.gz" -C "$work/run" --exclude model.safetensors --exclude state.pt .
    local model  # the recipe's model config: the engine settings the evaluation must use
    model=$(python3 -c "import sys; from sam3d.training import load_recipe; print(load_recipe(sys.argv[1])['model'].get('config') or 'sam3d_small')" "$recipe")
    local dev=cpu
    python3 -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' && dev=cuda
    for set in ${SAM3D_JOB_SETS:-totalseg_mr colin27_aal}; do
        local labels=()
        [ "$set" = colin27_aal ] && labels=(--labels 1,9,17,25,33,41,49,57,65,73,81,89,97,105,113)
        [ -d "$data/$set" ] || continue
        log "evaluate on $set"
        # no baseline: its held-out figures for these clicks are in BENCHMARKS.md, and it would take minutes here
        python3 scripts/evaluate.py --quiet --no-baseline --model "$model" --checkpoint "$work/model.safetensors" --data "$data/$set" \
            "${labels[@]}" --clicks "${SAM3D_JOB_CLICKS:-5}" --device "$dev" --out "$work/eval_$set" >&2
        cp "$work/eval_$set/summary.md" "$out/eval_$set.md"
    done
    ls -la "$out" >&2
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
prepare) prepare ;;
run) run "$@" ;;
*) echo "usage: bash scripts/gpu_job.sh prepare | run RECIPE SECONDS [key.path=value ...]" >&2; exit 2 ;;
esac
