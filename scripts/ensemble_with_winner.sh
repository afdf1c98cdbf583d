#!/usr/bin/env bash
# One ensemble export of DIN + tuned QIN + the winner's Transformer + DCNv2 (issue 23, point 4), and
# the pairs, against each member (RESULTS.md, "With the winner's model"). The members are finished
# training runs (--model_dir); their blend weights are fitted on valid only, test is scored once.
#
#   DIN=runs/ensemble_members/din_float32_s20242025 QIN=runs/bf16_seeds/qin_tuned_float32_s1 \
#   WINNER=runs/winner/tdcn_r256_bf16 bash scripts/ensemble_with_winner.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-runs/microlens50k/data}
E=${EXPORTS:-runs/ensemble_winner}     # export bases, made here (new)
OUT=${OUT:-results/ensemble_winner}    # metrics and fitted weights
: "${DIN:?set DIN to the model_dir of DIN}" "${QIN:?set QIN to the model_dir of tuned QIN}" "${WINNER:?set WINNER to the model_dir of the winner model}"
mkdir -p "$OUT"
$PY -m export.exporter --model_dir="$DIN" --export_base="$E/din" --data_dir="$DATA"
$PY -m export.exporter --model_dir="$QIN" --export_base="$E/qin_tuned" --data_dir="$DATA"
$PY -m export.exporter --model_dir="$WINNER" --export_base="$E/tdcn" --data_dir="$DATA"
$PY -m export.ensemble --member="$E/din" --member="$E/qin_tuned" --data="$DATA" --export_base="$E/din_qin_tuned"
$PY -m export.ensemble --member="$E/din" --member="$E/tdcn" --data="$DATA" --export_base="$E/din_tdcn"
$PY -m export.ensemble --member="$E/din" --member="$E/qin_tuned" --member="$E/tdcn" --data="$DATA" \
  --export_base="$E/din_qin_tuned_tdcn"
for n in din_qin_tuned din_tdcn din_qin_tuned_tdcn; do
  cp "$E/$n/1/assets.extra/ensemble.json" "$OUT/$n.ensemble.json"
done
$PY scripts/evaluate_exports.py --data="$DATA" --splits=valid,test --out="$OUT/metrics.jsonl" \
  DIN="$E/din/1" "QIN tuned=$E/qin_tuned/1" "Transformer+DCNv2=$E/tdcn/1" \
  "DIN + QIN tuned=$E/din_qin_tuned/1" "DIN + Transformer+DCNv2=$E/din_tdcn/1" \
  "DIN + QIN tuned + Transformer+DCNv2=$E/din_qin_tuned_tdcn/1"
