#!/usr/bin/env bash
# float32 against mixed_bfloat16 on MicroLens-50k, several seeds per model
# (issue 23, point 1). Each run is the model's flagfile recipe with a fixed
# epoch cap per model (stated in RESULTS.md), --monitor_splits=test (reported
# only, never used to select), one seed and one policy. Runs are seed-major so
# that a stopped sweep still holds whole seeds; a run whose metrics.json
# exists is skipped and a stopped run resumes, so the sweep goes on where it
# stopped; nothing in RUNS is removed. SEEDS and MODELS
# choose and order the runs (RESULTS.md gives the order this session used).
#
#   DATA=runs/microlens50k/data OUT=results/bf16_seeds bash scripts/bf16_seeds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-runs/microlens50k/data}
OUT=${OUT:-results/bf16_seeds}
RUNS=${RUNS:-runs/bf16_seeds}
SEEDS=${SEEDS:-"20242025 1 2"}
POLICIES=${POLICIES:-"float32 mixed_bfloat16"}
# model name, flagfile, extra flags, epoch cap
MODELS=${MODELS:-"qin din qin_tuned"}
declare -A FLAGFILE=([qin]=configs/microlens50k.flags [din]=configs/microlens50k.flags
                     [qin_tuned]=configs/microlens50k_tuned.flags)
declare -A EXTRA=([qin]="" [din]="--model=din" [qin_tuned]="")
declare -A EPOCHS=([qin]=${QIN_EPOCHS:-3} [din]=${DIN_EPOCHS:-8} [qin_tuned]=${TUNED_EPOCHS:-4})
mkdir -p "$OUT"
for seed in $SEEDS; do
  for model in $MODELS; do
    for policy in $POLICIES; do
      name="${model}_${policy}_s${seed}"
      if [[ -f "$OUT/$name/metrics.json" ]]; then continue; fi
      mkdir -p "$OUT/$name"
      # an unfinished run in $RUNS/$name resumes (qin_tf.train); a finished one is only copied
      [[ -f "$RUNS/$name/metrics.json" ]] || /usr/bin/time -v "$PYTHON" -m qin_tf.train --flagfile="${FLAGFILE[$model]}" ${EXTRA[$model]} \
        --data_dir="$DATA" --model_dir="$RUNS/$name" --epochs="${EPOCHS[$model]}" \
        --seed="$seed" --dtype_policy="$policy" --monitor_splits=test --log_every_steps=0 \
        > "$OUT/$name/train.log" 2> "$OUT/$name/stderr.log"
      grep -E "Maximum resident|Elapsed \(wall" "$OUT/$name/stderr.log" > "$OUT/$name/process.txt" || true
      cp "$RUNS/$name/metrics.json" "$RUNS/$name/config.json" "$OUT/$name/"
      echo "$(date -u +%H:%M:%S) done $name"
    done
  done
done
