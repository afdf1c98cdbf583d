#!/usr/bin/env bash
# The main job from raw logs, end to end, on the bundled sample's raw MicroLens events
# (data/microlens_sample/raw, configs/logs/microlens_sample.json):
#   raw events + catalog -> examples, vocabularies, item table (pipelines.build_examples)
#   -> TFRecords + feature spec (pipelines.preprocess) -> train QIN -> SavedModel -> batch scoring.
# Everything lands in $OUT (default runs/sample_logs); a rerun replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/sample_logs}
PY=${PYTHON:-python}

echo "== 1/5 build examples: configs/logs/microlens_sample.json -> $OUT/examples"
$PY -m pipelines.build_examples --config=configs/logs/microlens_sample.json --output_dir="$OUT/examples"

echo "== 2/5 preprocess: $OUT/examples -> $OUT/data"
$PY -m pipelines.preprocess --input_dir="$OUT/examples" --output_dir="$OUT/data" \
    --dataset_config="$OUT/examples/dataset_config.json"

echo "== 3/5 train QIN (configs/sample.flags) -> $OUT/model"
rm -rf "$OUT/export"
$PY -m qin_tf.train --flagfile=configs/sample.flags \
    --data_dir="$OUT/data" --model_dir="$OUT/model" --export_base="$OUT/export"

echo "== 4/5 exported SavedModel: $OUT/export"
ls "$OUT/export"

echo "== 5/5 batch-score the built test split with the SavedModel alone"
$PY -m export.score --saved_model="$OUT/export" --input="$OUT/examples/test.parquet" \
    --output="$OUT/test_scores.csv" --format=csv
