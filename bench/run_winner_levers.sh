#!/usr/bin/env bash
# The winner's model (configs/transformer_dcn.flags) made affordable, and the dtype policy on this CPU
# (issue 23): training-step speed, in float32 and in mixed_bfloat16, of
#   - every model preset of bench/presets.sh (QIN, DIN, QIN with a DNN tower at batch 8,192; the
#     winner's transformer_dcn with full-rank cross layers, as released, at its batch size, 128);
#   - transformer_dcn with low-rank cross layers (--cross_projection_dim=256, 64),
# one after another in one run, each JSON line of bench/bench_train.py appended to $OUT.
# A step's time depends on the model and the batch, not on the data's size, so DATA may be the
# bundled sample's TFRecords (repeated). Run on an idle machine from a fresh venv made by the
# README's command:
#
#   python -m pipelines.preprocess --input_dir=data/microlens_sample --output_dir=runs/sample/data
#   DATA=runs/sample/data PYTHON=.venv/bin/python OUT=bench/results/winner_levers.jsonl bash bench/run_winner_levers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-runs/sample/data}
OUT=${OUT:-bench/results/winner_levers.jsonl}
PY=${PYTHON:-python}
STEPS=${STEPS:-5}
mkdir -p "$(dirname "$OUT")"
if [[ ! -f "$DATA/feature_spec.json" ]]; then
  echo "run_winner_levers: error: $DATA/feature_spec.json is missing: run python -m pipelines.preprocess first" >&2
  exit 1
fi

run() {
  echo "+ $*" >&2
  "$@" 2>/dev/null | tail -n 1 >> "$OUT"
}

source bench/presets.sh
for policy in float32 mixed_bfloat16; do
  for name in "${PRESET_NAMES[@]}"; do
    # shellcheck disable=SC2086
    run "$PY" bench/bench_train.py --data_dir="$DATA" ${PRESET[$name]} --dtype_policy=$policy --steps="$STEPS" \
      --warmup_steps=2
  done
  for rank in 256 64; do
    # shellcheck disable=SC2086
    run "$PY" bench/bench_train.py --data_dir="$DATA" ${PRESET[transformer_dcn]} --train_flag=--cross_projection_dim=$rank \
      --dtype_policy=$policy --steps="$STEPS" --warmup_steps=2
  done
done
