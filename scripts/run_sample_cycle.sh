#!/usr/bin/env bash
# The daily cycle, day after day, on the bundled sample's raw events (README, "Every day: the cycle"):
#   cut the events into DAYS days (scripts/cut_days.py: a timestamped parquet and a log config per day);
#   day 1:  build -> preprocess -> train -> export -> validate (the first version) -> push into $OUT/serving;
#   day d:  build --previous=day d-1 -> preprocess -> train --warm_start_from=(the model in service)
#           -> export the candidate -> validate against $OUT/serving on day d's valid rows -> push if blessed,
#           else report the refusal and keep serving.
# Split rule, per day: its events from 14:24 UTC (60% of the day) on are valid rows, from 19:12 (80%)
# test rows, the rest train (--valid_from / --test_from).
# One line per step; each step's full output is in $OUT/logs/day<d>-<step>.log.
# Exit 0 when the cycle ran (a refused candidate is an outcome, not a failure); 1 on any error.
#
# Environment: OUT (default runs/sample_cycle; must not exist or be empty), PYTHON (default python),
#   DAYS (3), EPOCHS (configs/sample.flags' 20, early stopped), TRAIN_FLAGS (more qin_tf.train flags),
#   AUC_TOLERANCE (export.validate's default, 0.002; on the sample's ~300 valid rows a day the AUC's own
#   standard error is about 0.03, so here the gate's decisions are mostly noise), CORRUPT_DAY (a day whose train labels are corrupted after its build, for the gate to refuse),
#   CORRUPTION (flip: every train label inverted, the default; shuffle: permuted; see scripts/cut_days.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/sample_cycle}
PY=${PYTHON:-python}
DAYS=${DAYS:-3}
EPOCHS=${EPOCHS:-}
TRAIN_FLAGS=${TRAIN_FLAGS:-}
AUC_TOLERANCE=${AUC_TOLERANCE:-0.002}
CORRUPT_DAY=${CORRUPT_DAY:-0}
CORRUPTION=${CORRUPTION:-flip}

if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT")" ]; then
    echo "run_sample_cycle: error: $OUT exists and is not empty; remove it or set OUT" >&2
    exit 1
fi
mkdir -p "$OUT/logs" "$OUT/serving"
SERVING="$OUT/serving"

# step DAY NAME COMMAND...: runs COMMAND with its output in $OUT/logs/day<DAY>-<NAME>.log; on failure
# prints the log's last line and stops the cycle.
step() {
    local day=$1 name=$2 log="$OUT/logs/day$1-$2.log"
    shift 2
    if ! "$@" >"$log" 2>&1; then
        echo "run_sample_cycle: error: day $day $name failed: $(grep -v '^\s*$' "$log" | tail -n 1) (log: $log)" >&2
        exit 1
    fi
}

step 0 cut "$PY" scripts/cut_days.py days --out="$OUT/days" --days="$DAYS"
mapfile -t CUTS < <(tail -n "$DAYS" "$OUT/logs/day0-cut.log")
echo "cut: data/microlens_sample/raw/events.tsv -> $DAYS days in $OUT/days (valid rows from 14:24 UTC, test from 19:12)"

SERVING_MODEL=""  # the model_dir of the version in service: the next day warm-starts from it
for ((d = 1; d <= DAYS; d++)); do
    read -r _ VALID_FROM TEST_FROM <<<"${CUTS[$((d - 1))]}"
    DAY="$OUT/day$d"
    PREVIOUS=()
    if ((d > 1)); then PREVIOUS=(--previous="$OUT/day$((d - 1))/examples"); fi
    step "$d" build "$PY" -m pipelines.build_examples --config="$OUT/days/day$d.json" \
        --output_dir="$DAY/examples" "${PREVIOUS[@]}" --valid_from="$VALID_FROM" --test_from="$TEST_FROM"
    echo "day $d: build -> $DAY/examples${PREVIOUS:+ (continues $OUT/day$((d - 1))/examples)}"
    if ((d == CORRUPT_DAY)); then
        step "$d" corrupt "$PY" scripts/cut_days.py corrupt_labels --examples="$DAY/examples" --how="$CORRUPTION"
        echo "day $d: CORRUPT_DAY: labels of $DAY/examples/train.parquet corrupted ($CORRUPTION)"
    fi

    step "$d" preprocess "$PY" -m pipelines.preprocess --input_dir="$DAY/examples" --output_dir="$DAY/data" \
        --dataset_config="$DAY/examples/dataset_config.json"
    echo "day $d: preprocess -> $DAY/data"

    WARM=()
    if [ -n "$SERVING_MODEL" ]; then WARM=(--warm_start_from="$SERVING_MODEL"); fi
    # shellcheck disable=SC2086  # TRAIN_FLAGS is a list of flags
    step "$d" train "$PY" -m qin_tf.train --flagfile=configs/sample.flags --data_dir="$DAY/data" \
        --model_dir="$DAY/model" ${EPOCHS:+--epochs=$EPOCHS} "${WARM[@]}" $TRAIN_FLAGS
    echo "day $d: train -> $DAY/model${SERVING_MODEL:+ (warm start from $SERVING_MODEL)}"

    step "$d" export "$PY" -m export.exporter --model_dir="$DAY/model" --export_base="$DAY/export" \
        --data_dir="$DAY/data" --version="$d"
    echo "day $d: export -> candidate $DAY/export/$d"

    LOG="$OUT/logs/day$d-validate.log"
    set +e
    "$PY" -m export.validate --candidate="$DAY/export/$d" --serving="$SERVING" --data="$DAY/data" \
        --split=valid --auc_tolerance="$AUC_TOLERANCE" --push >"$LOG" 2>"$LOG.err"
    RC=$?
    set -e
    cat "$LOG.err" >>"$LOG" && rm -f "$LOG.err"
    LAST=$(grep -v '^\s*$' "$LOG" | tail -n 1)
    if ((RC == 0)); then
        VERSION=$("$PY" -c 'import json, sys; print(json.loads(sys.argv[1])["pushed"]["serving_version"])' "$LAST")
        SERVING_MODEL="$DAY/model"
        echo "day $d: validate: blessed ($DAY/export/$d.validation.json); pushed as version $VERSION -> $SERVING/$VERSION"
    elif ((RC == 1)) && [[ "$LAST" == "validate: refused: "* ]]; then
        echo "day $d: validate (exit $RC): ${LAST#validate: } ($DAY/export/$d.validation.json); not pushed," \
            "still serving version $(ls "$SERVING" | grep -E '^[0-9]+$' | sort -n | tail -n 1)"
    else
        echo "run_sample_cycle: error: day $d validate failed: $LAST (log: $LOG)" >&2
        exit 1
    fi
done
echo "done: $SERVING serves version $(ls "$SERVING" | grep -E '^[0-9]+$' | sort -n | tail -n 1); rollback: $PY -m export.rollback --model_base_path=$SERVING"
