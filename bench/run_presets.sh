#!/usr/bin/env bash
# Training and scoring speed of each model preset (issue 13), and of QIN with a DNN tower,, one after another in one run,
# each JSON line appended to $OUT (default bench/results/results.jsonl). Run on an idle machine
# from a fresh venv made by the README's command (PYTHON: its interpreter):
#
#   DATA=runs/microlens50k/data PYTHON=.venv/bin/python bash bench/run_presets.sh
#
# Each preset trains at the batch size of its own flagfile (QIN and DIN 8,192, the winner's
# Transformer + DCNv2 128, as released) and once more at 128 (QIN, DIN) or 1,024 (the winner's),
# so that the rates also compare at one batch size; scoring exports an untrained model of the preset (same speed as a trained
# one) and runs `python -m export.score` over the test split at --batch_size=8192.
# QUICK=1 runs one step and scores once (a smoke test of the script).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-runs/microlens50k/data}
OUT=${OUT:-bench/results/results.jsonl}
PY=${PYTHON:-python}
mkdir -p "$(dirname "$OUT")"
if [[ "${QUICK:-0}" == 1 ]]; then STEPS=(--steps=1 --warmup_steps=1); else STEPS=(--steps=10 --warmup_steps=2); fi

run() {
  echo "+ $*" >&2
  "$@" | tail -n 1 >> "$OUT"
}

source bench/presets.sh
for name in "${PRESET_NAMES[@]}"; do
  # shellcheck disable=SC2086
  run $PY bench/bench_train.py --data_dir="$DATA" ${PRESET[$name]} "${STEPS[@]}"
  if [[ $name == transformer_dcn ]]; then
    # batch 1024 takes ~17 s a step here: 3 timed steps
    OTHER=(--global_batch_size=1024 --steps=3 --warmup_steps=1)
    [[ "${QUICK:-0}" == 1 ]] && OTHER=(--global_batch_size=1024 --steps=1 --warmup_steps=1)
  else
    OTHER=(--global_batch_size=128 "${STEPS[@]}")
  fi
  # shellcheck disable=SC2086
  run $PY bench/bench_train.py --data_dir="$DATA" ${PRESET[$name]} "${OTHER[@]}"
  # shellcheck disable=SC2086
  run $PY bench/bench_score.py --data_dir="$DATA" ${PRESET[$name]} --batch_sizes=8192
done
echo "results appended to $OUT" >&2
