#!/usr/bin/env bash
# The main job, end to end, on the bundled sample (data/microlens_sample):
#   logs (parquet) -> TFRecords + item table + feature spec -> train QIN
#   -> SavedModel export -> batch scoring of the raw test split (prints its AUC).
# Everything lands in $OUT (default runs/sample); a rerun replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/sample}
PY=${PYTHON:-python}

echo "== 1/4 preprocess: data/microlens_sample -> $OUT/data"
$PY -m pipelines.preprocess --input_dir=data/microlens_sample --output_dir="$OUT/data"

echo "== 2/4 train QIN (configs/sample.flags) -> $OUT/model"
rm -rf "$OUT/export"
$PY -m qin_tf.train --flagfile=configs/sample.flags \
    --data_dir="$OUT/data" --model_dir="$OUT/model" --export_base="$OUT/export"

echo "== 3/4 exported SavedModel: version $(ls "$OUT/export") in $OUT/export (a TF Serving model base path)"

echo "== 4/4 batch-score the raw test split with the SavedModel alone"
$PY -m export.score --saved_model="$OUT/export" --input=data/microlens_sample/test.parquet \
    --output="$OUT/test_scores.csv" --format=csv --overwrite
