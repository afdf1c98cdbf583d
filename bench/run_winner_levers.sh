#!/usr/bin/env bash
# The challenge winner's Transformer + DCNv2 (configs/transformer_dcn.flags) made affordable (issue 23, part 3):
# its training step at the released batch 128, full-rank cross layers (as released) against low-rank
# ones (--cross_projection_dim, a deviation from the release), each in float32 and mixed_bfloat16, one after
# another in one run, each JSON line appended to $OUT (default bench/results/winner_levers.jsonl). Run on an
# idle machine from a fresh venv made by the README's command (PYTHON: its interpreter):
#
#   DATA=runs/microlens50k/data PYTHON=.venv/bin/python bash bench/run_winner_levers.sh
#
# QUICK=1 runs one step of each (a smoke test of the script).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-runs/microlens50k/data}
OUT=${OUT:-bench/results/winner_levers.jsonl}
PY=${PYTHON:-python}
mkdir -p "$(dirname "$OUT")"
if [[ "${QUICK:-0}" == 1 ]]; then STEPS=(--steps=1 --warmup_steps=1); else STEPS=(--steps=10 --warmup_steps=2); fi
for rank in none 256 64; do
  for policy in float32 mixed_bfloat16; do
    echo "+ cross_projection_dim=$rank dtype_policy=$policy" >&2
    $PY bench/bench_train.py --data_dir="$DATA" --train_flag=--flagfile=configs/transformer_dcn.flags \
      --train_flag=--cross_projection_dim=$rank --dtype_policy=$policy "${STEPS[@]}" | tail -n 1 >> "$OUT"
  done
done
