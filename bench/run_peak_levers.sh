#!/usr/bin/env bash
# How close QIN's training step comes to the machine's matrix-product peak, lever by lever (issue 23,
# point 2), and where the winner's low-rank step spends its time (point 3). One run, in this order:
#   1. bench/bench_gemm.py: the float32 and bfloat16 GEMM rate of QNN's shape (8192 x 896 x 3584);
#   2. for float32 and mixed_bfloat16, the released QIN at batch 8,192 with each lever alone:
#      the default (qin_tf.layers.Dropout), Keras' dropout, the dropout rescaled in the compute
#      dtype (bf16 only), inter-op threads 1, XLA for the QNN tower, XLA for the whole step on the
#      dense history;
#   3. the profile (by model part and op type) of transformer_dcn at --cross_projection_dim=256 in
#      both policies.
# Each JSON line is appended to $OUT; bench/peak_table.py turns the file into BENCHMARKS.md's tables.
# Run on an idle machine from a fresh venv made by the README's command:
#
#   python -m pipelines.preprocess --input_dir=data/microlens_sample --output_dir=runs/sample/data
#   DATA=runs/sample/data PYTHON=.venv/bin/python OUT=bench/results/peak_levers.jsonl bash bench/run_peak_levers.sh
#   python bench/peak_table.py bench/results/peak_levers.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-runs/sample/data}
OUT=${OUT:-bench/results/peak_levers.jsonl}
PY=${PYTHON:-python}
STEPS=${STEPS:-10}
mkdir -p "$(dirname "$OUT")"
if [[ ! -f "$DATA/feature_spec.json" ]]; then
  echo "run_peak_levers: error: $DATA/feature_spec.json is missing: run python -m pipelines.preprocess first" >&2
  exit 1
fi

run() {
  echo "+ $*" >&2
  "$@" 2>/dev/null | tail -n 1 >> "$OUT"
}

source bench/presets.sh
run "$PY" bench/bench_gemm.py
for policy in float32 mixed_bfloat16; do
  qin=("$PY" bench/bench_train.py --data_dir="$DATA" --dtype_policy=$policy --steps="$STEPS" --warmup_steps=2)
  run "${qin[@]}"
  run "${qin[@]}" --dropout_impl=keras
  if [[ $policy != float32 ]]; then run "${qin[@]}" --dropout_impl=native_scale; fi
  run "${qin[@]}" --inter_op_threads=1
  run "${qin[@]}" --jit_qnn
  run "${qin[@]}" --nosparse_history --jit_compile
done
for policy in float32 mixed_bfloat16; do
  # shellcheck disable=SC2086
  run "$PY" bench/bench_train.py --data_dir="$DATA" ${PRESET[transformer_dcn]} --train_flag=--cross_projection_dim=256 \
    --dtype_policy=$policy --steps="$STEPS" --warmup_steps=2 --profile --profile_steps=5 --inter_op_threads=1
done
