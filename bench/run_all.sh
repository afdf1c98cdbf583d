#!/usr/bin/env bash
# Runs every benchmark of BENCHMARKS.md, one after another, and appends each
# one's JSON line to $OUT (default bench/results/results.jsonl). Run it on an
# idle machine: the figures are wall-clock rates.
#
#   DATA=runs/microlens50k/data RAW=../shared/data/microlens50k_mmctr \
#   MODEL=runs/microlens50k/model bash bench/run_all.sh
#
# DATA: MicroLens-50k preprocessed with max_len 64 (python -m pipelines.preprocess
#       --input_dir=$RAW --output_dir=$DATA); RAW: the MMCTR-layout parquet files;
# MODEL: a training run's model_dir (best.keras) for scoring and latency; empty:
#       an untrained QIN with the released hyperparameters (same speed).
# QUICK=1 runs every command with small settings (a smoke test of the scripts).
# PYTHON: the interpreter of a fresh venv made by the README's command; bench/common.py
#       stops a benchmark whose environment differs from such an install.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-runs/microlens50k/data}
RAW=${RAW:-../shared/data/microlens50k_mmctr}
MODEL=${MODEL:-}
OUT=${OUT:-bench/results/results.jsonl}
PY=${PYTHON:-python}
mkdir -p "$(dirname "$OUT")"
MODEL_FLAG=()
[[ -n "$MODEL" ]] && MODEL_FLAG=(--model_dir="$MODEL")
if [[ "${QUICK:-0}" == 1 ]]; then
  STEPS=(--steps=1 --warmup_steps=1); EPOCH=(); SLOW=(--steps=1 --warmup_steps=1); CALLS=(--calls=30 --warmup=3)
else
  STEPS=(--steps=10 --warmup_steps=2); EPOCH=(--epoch); SLOW=(--steps=3 --warmup_steps=1); CALLS=()
fi

# Waits until the machine is idle (under 10% of one core busy over 3 s), so
# that nothing else shares the cores when a benchmark starts.
wait_idle() {
  local a b busy total
  while true; do
    a=($(head -1 /proc/stat)); sleep 3; b=($(head -1 /proc/stat))
    busy=$(( (b[1]+b[2]+b[3]+b[6]+b[7]+b[8]) - (a[1]+a[2]+a[3]+a[6]+a[7]+a[8]) ))
    total=$(( busy + (b[4]+b[5]) - (a[4]+a[5]) ))
    (( total > 0 && busy * 100 / total < 5 )) && return 0
    echo "  (waiting: the machine is busy)" >&2
    sleep 20
  done
}

run() {
  wait_idle
  echo "+ $*" >&2
  "$@" | tail -n 1 >> "$OUT"
}

# The machine's matrix-product rate, preprocessing and the reader.
run $PY bench/bench_gemm.py
run $PY bench/bench_preprocess.py --input_dir="$RAW" --max_len=64
run $PY bench/bench_reader.py --data_dir="$DATA" --split=train
run $PY bench/bench_reader.py --data_dir="$DATA" --split=train --training
run $PY bench/bench_reader.py --data_dir="$DATA" --split=train --training --cache=false

# Training, released configuration: one device and mirrored (2 logical CPU devices).
run $PY bench/bench_train.py --data_dir="$DATA" "${STEPS[@]}" "${EPOCH[@]}" \
    --eval --eval_batch_sizes=1024,8192,32768
run $PY bench/bench_train.py --data_dir="$DATA" --strategy=mirrored "${STEPS[@]}" "${EPOCH[@]}" --profile
# Where the time goes: one op at a time (same speed), so each op's time is its own.
run $PY bench/bench_train.py --data_dir="$DATA" --inter_op_threads=1 "${SLOW[@]}" --profile

# Training levers, one at a time (the one_device run above is the production "after").
run $PY bench/bench_train.py --data_dir="$DATA" --nosparse_history --asta=projected "${SLOW[@]}"
run $PY bench/bench_train.py --data_dir="$DATA" --nosparse_history --asta=projected --inter_op_threads=1 \
    --steps=1 --warmup_steps=1 --profile --profile_steps=1
run $PY bench/bench_train.py --data_dir="$DATA" --nosparse_history "${SLOW[@]}"
run $PY bench/bench_train.py --data_dir="$DATA" --nosparse_history --deduplicate "${SLOW[@]}"
run $PY bench/bench_train.py --data_dir="$DATA" --asta=projected "${STEPS[@]}"
run $PY bench/bench_train.py --data_dir="$DATA" --nosparse_history --jit_compile "${SLOW[@]}"
run $PY bench/bench_train.py --data_dir="$DATA" --dtype_policy=mixed_bfloat16 "${STEPS[@]}"
run $PY bench/bench_train.py --data_dir="$DATA" --dtype_policy=mixed_bfloat16 --inter_op_threads=1 "${SLOW[@]}" \
    --profile
run $PY bench/bench_train.py --data_dir="$DATA" --intra_op_threads=2 --inter_op_threads=1 "${STEPS[@]}"
run $PY bench/bench_train.py --data_dir="$DATA" --intra_op_threads=1 --inter_op_threads=2 "${STEPS[@]}"

# Batch scoring over the 80k test rows (TFRecords and parquet), and the folds off.
run $PY bench/bench_score.py --data_dir="$DATA" "${MODEL_FLAG[@]}" --parquet="$RAW/test.parquet" --repeats=3 \
    --batch_sizes=1024,8192,32768
run $PY bench/bench_score.py --data_dir="$DATA" "${MODEL_FLAG[@]}" --batch_sizes=1024 --repeats=3 --nofold

# Serving latency: the production export alone (in-process and gRPC), then the levers.
run $PY bench/bench_latency.py --data_dir="$DATA" "${MODEL_FLAG[@]}" "${CALLS[@]}" --nounfolded
run $PY bench/bench_latency.py --data_dir="$DATA" "${MODEL_FLAG[@]}" "${CALLS[@]}" --nogrpc --xla
run $PY bench/bench_latency.py --data_dir="$DATA" "${MODEL_FLAG[@]}" "${CALLS[@]}" --nogrpc --nounfolded \
    --intra_op_threads=1 --inter_op_threads=1
# Each model preset, training and scoring (bench/run_presets.sh).
DATA="$DATA" OUT="$OUT" PYTHON="$PY" QUICK="${QUICK:-0}" bash bench/run_presets.sh
echo "results appended to $OUT" >&2
