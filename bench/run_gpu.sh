#!/usr/bin/env bash
# The GPU check, in one run of under 10 minutes (issue: "ready for the day a GPU is lent"):
#
#   OUT=bench/results/gpu bash bench/run_gpu.sh                       # fresh .venv-gpu by the README's command
#   SKIP_INSTALL=1 PYTHON=.venv/bin/python bash bench/run_gpu.sh      # reuse an environment
#   ALLOW_CPU=1 QUICK=1 SKIP_INSTALL=1 PYTHON=... OUT=/tmp/gpu_smoke bash bench/run_gpu.sh   # smoke test, no GPU
#
#   1. environment: the README's install (`python3 -m venv ... && pip install -q -e .`, into .venv-gpu so
#      that .venv is left alone); a registry out of reach is one line and exit 1. Records nvidia-smi -L,
#      TensorFlow's GPUs, the CPU. No GPU visible to TensorFlow: exit 1, unless ALLOW_CPU=1 (CPU mode).
#   2. the bundled sample, preprocessed (data/microlens_sample -> $OUT/data).
#   3. parity: QIN trained on the sample on the GPU (configs/sample.flags, 3 epochs), exported
#      (export.exporter), the test split scored (export.score) with the GPU visible and with
#      CUDA_VISIBLE_DEVICES="": PASS when the two score files agree within 1e-4 (max |diff|).
#   4. speed: bench/bench_train.py, the training step of each preset (qin, din, qin_qnn_dnn,
#      transformer_dcn, as bench/run_presets.sh names them, at their flagfiles' batch sizes, on the
#      sample's TFRecords repeated) in float32, mixed_bfloat16 and mixed_float16 (loss scaling) on
#      one device; then MirroredStrategy over every GPU in float32 and mixed_bfloat16.
#      --steps=5 --warmup_steps=2 (QUICK=1: 1 and 1, at batch 256).
#
# Every step runs under `timeout`; with a GPU the whole run keeps to BUDGET_S seconds (default 540; none
# in CPU mode): a step that would start past it is recorded as skipped. TensorFlow's output goes to
# $OUT/logs/. Writes $OUT/results.jsonl (one JSON line a step) and $OUT/summary.md (printed at the end).
# Exit status: 0 when every step that ran passed and parity passed.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-bench/results/gpu}
LOGS=$OUT/logs
RESULTS=$OUT/results.jsonl
mkdir -p "$LOGS"
: > "$RESULTS"
export TF_CPP_MIN_LOG_LEVEL=2 TF_FORCE_GPU_ALLOW_GROWTH=true PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PARITY_ATOL=1e-4
# QUICK=1 (a smoke test of the script, not a measurement): one step at batch 256, one epoch
if [[ "${QUICK:-0}" == 1 ]]; then STEPS=(--steps=1 --warmup_steps=1 --global_batch_size=256); EPOCHS=1; else
  STEPS=(--steps=5 --warmup_steps=2); EPOCHS=3; fi
FAILED=0

say() { echo "run_gpu: $*"; }
elapsed() { echo $(( $(date +%s) - START )); }

# record NAME KEY=VALUE... : one JSON line of strings (numbers where they parse) into $RESULTS
record() {
  "$PY" - "$@" >> "$RESULTS" <<'EOF'
import json, sys
rec = {"step": sys.argv[1]}
for kv in sys.argv[2:]:
    k, _, v = kv.partition("=")
    try:
        rec[k] = json.loads(v)
    except ValueError:
        rec[k] = v
print(json.dumps(rec))
EOF
}

# step NAME LIMIT_S CMD... : runs CMD under timeout (and the budget), stdout/stderr to $LOGS/NAME.{out,err}
step() {
  local name=$1 limit=$2; shift 2
  if [[ -n "${DEADLINE:-}" ]]; then
    local left=$(( DEADLINE - $(date +%s) ))
    if (( left < 30 )); then
      say "$name: skipped (budget of ${BUDGET_S}s spent)"; record "$name" status=skipped reason=budget
      return 2
    fi
    (( left < limit )) && limit=$left
  fi
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$LOGS/$name.out" 2> "$LOGS/$name.err"
  local rc=$?
  STEP_S=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then return 0; fi
  local why=failed; (( rc == 124 )) && why="timeout after ${limit}s"
  say "$name: $why (rc $rc; $(tail -n 1 "$LOGS/$name.err" | cut -c1-200)) [$LOGS/$name.err]"
  record "$name" status=failed rc=$rc reason="$why" seconds=$STEP_S log="$LOGS/$name.err"
  FAILED=1
  return 1
}

# --- 1. environment ----------------------------------------------------------------------------------
if [[ "${SKIP_INSTALL:-0}" == 1 ]]; then
  PY=${PYTHON:-python}
  say "SKIP_INSTALL=1: using $PY"
else
  VENV=${VENV:-.venv-gpu}
  say "installing into $VENV (the README's command: python3 -m venv $VENV && $VENV/bin/pip install -q -e .)"
  # pip gives up on a registry it cannot reach after one 15 s try, not five
  if ! PIP_DEFAULT_TIMEOUT=15 PIP_RETRIES=1 timeout 420 bash -c \
      "python3 -m venv '$VENV' && '$VENV/bin/pip' install -q -e ." > "$LOGS/install.log" 2>&1; then
    if grep -qiE "NewConnectionError|Failed to establish|Name or service not known|Temporary failure in name|Network is unreachable|No matching distribution|Could not find a version|ProxyError|timed out" "$LOGS/install.log"; then
      say "install: pip cannot reach a package registry ($(grep -m1 -oiE "NewConnectionError|Failed to establish a new connection|Name or service not known|Temporary failure in name resolution|Network is unreachable|No matching distribution found for [^ ]*|Could not find a version[^(]*|ProxyError|timed out" "$LOGS/install.log")); stopping. Rerun with SKIP_INSTALL=1 PYTHON=<a python with qin-tf installed>."
    else
      say "install: failed ($(tail -n 1 "$LOGS/install.log" | cut -c1-200)); stopping. See $LOGS/install.log."
    fi
    exit 1
  fi
  PY=$VENV/bin/python
fi

env_json() {
  "$PY" - <<'EOF' 2> "$LOGS/env.err"
import json, os, platform, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
names = [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus]
print(json.dumps({"python": platform.python_version(), "tensorflow": tf.__version__,
                  "gpus": len(gpus), "gpu_names": names, "cuda_build": tf.test.is_built_with_cuda()}))
EOF
}
ENV=$(env_json) || { say "environment: TensorFlow does not import with $PY ($(tail -n 1 "$LOGS/env.err")); stopping."; exit 1; }
SMI=$( (nvidia-smi -L 2>/dev/null || true) | tr '\n' ';')
GPUS=$(echo "$ENV" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['gpus'])")
if (( GPUS == 0 )) && [[ -n "$SMI" && "${SKIP_INSTALL:-0}" != 1 ]]; then
  # the README installs `tensorflow`; its CUDA libraries come with the [and-cuda] extra
  TFV=$("$PY" -c "import importlib.metadata as m; print(m.version('tensorflow'))")
  say "nvidia-smi lists GPUs but TensorFlow sees none: installing tensorflow[and-cuda]==$TFV"
  PIP_DEFAULT_TIMEOUT=15 PIP_RETRIES=1 timeout 300 "$VENV/bin/pip" install -q "tensorflow[and-cuda]==$TFV" \
    > "$LOGS/install_cuda.log" 2>&1 || say "install of tensorflow[and-cuda] failed: see $LOGS/install_cuda.log"
  ENV=$(env_json) || ENV='{"gpus": 0}'
  GPUS=$(echo "$ENV" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['gpus'])")
fi
CPU=$( (lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p'; grep -m1 "model name" /proc/cpuinfo 2>/dev/null | sed 's/.*: //') | head -n 1)
record env nvidia_smi="$SMI" cpu="$CPU" cores="$(nproc)" tf="$ENV" python_path="$PY"
say "nvidia-smi: ${SMI:-none}; TensorFlow: $ENV; CPU: $CPU ($(nproc) cores)"
if (( GPUS == 0 )); then
  if [[ "${ALLOW_CPU:-0}" != 1 ]]; then
    say "no GPU visible to TensorFlow; stopping (ALLOW_CPU=1 runs the same steps on the CPU)."; exit 1
  fi
  say "no GPU visible to TensorFlow: CPU mode (ALLOW_CPU=1); parity compares the CPU with itself."
  MODE=cpu
else
  MODE=gpu
  BUDGET_S=${BUDGET_S:-540}
fi
if [[ -n "${BUDGET_S:-}" && "$BUDGET_S" != 0 ]]; then DEADLINE=$(( START + BUDGET_S )); fi

# --- 2. the sample ---------------------------------------------------------------------------------
DATA=$OUT/data
rm -rf "$DATA"
step preprocess 180 "$PY" -m pipelines.preprocess --input_dir=data/microlens_sample --output_dir="$DATA" \
  || { say "preprocess failed: nothing else can run."; exit 1; }
record preprocess status=ok seconds=$STEP_S

# --- 3. parity: trained on the GPU, scored on the GPU and on the CPU ---------------------------------
S=$OUT/sample
rm -rf "$S"
PARITY=not_run
if step sample_train 240 "$PY" -m qin_tf.train --flagfile=configs/sample.flags --data_dir="$DATA" \
     --model_dir="$S/model" --epochs=$EPOCHS; then
  record sample_train status=ok seconds=$STEP_S test="$(grep -m1 "best model on test" "$LOGS/sample_train.out")"
  if step sample_export 180 "$PY" -m export.exporter --model_dir="$S/model" --export_base="$S/export" \
       --data_dir="$DATA"; then
    record sample_export status=ok seconds=$STEP_S
    step score_gpu 120 "$PY" -m export.score --saved_model="$S/export" --input=data/microlens_sample/test.parquet \
      --output="$S/scores_gpu.csv" --format=csv --overwrite && G=ok || G=
    step score_cpu 120 env CUDA_VISIBLE_DEVICES="" "$PY" -m export.score --saved_model="$S/export" \
      --input=data/microlens_sample/test.parquet --output="$S/scores_cpu.csv" --format=csv --overwrite && C=ok || C=
    if [[ -n "$G" && -n "$C" ]]; then
      DIFF=$("$PY" - "$S/scores_gpu.csv" "$S/scores_cpu.csv" <<'EOF'
import csv, sys
a, b = ([(r["row"], float(r["ctr"])) for r in csv.DictReader(open(p))] for p in sys.argv[1:])
assert [r for r, _ in a] == [r for r, _ in b] and a, "the two score files hold other rows"
print(max(abs(x - y) for (_, x), (_, y) in zip(a, b)), len(a))
EOF
      ) || DIFF="nan 0"
      read -r MAXDIFF NROWS <<< "$DIFF"
      if "$PY" -c "import sys; sys.exit(0 if float('$MAXDIFF') <= $PARITY_ATOL else 1)"; then PARITY=PASS; else
        PARITY=FAIL; FAILED=1; fi
      record parity status="$PARITY" mode=$MODE max_abs_diff="$MAXDIFF" rows="$NROWS" atol=$PARITY_ATOL \
        auc_gpu="$(tail -n 1 "$LOGS/score_gpu.out")" auc_cpu="$(tail -n 1 "$LOGS/score_cpu.out")"
      say "parity ($MODE-trained export, test split, $NROWS rows): max |score GPU - score CPU| = $MAXDIFF" \
          "(tolerance $PARITY_ATOL): $PARITY"
    fi
  fi
fi

# --- 4. speed of the training step ------------------------------------------------------------------
source bench/presets.sh
bench() {  # bench STRATEGY PRESET POLICY
  local name="train_$1_$2_$3"
  # shellcheck disable=SC2086
  if step "$name" 150 "$PY" bench/bench_train.py --data_dir="$DATA" --strategy="$1" ${PRESET[$2]} \
       --dtype_policy="$3" "${STEPS[@]}"; then
    "$PY" - "$name" "$2" "$3" "$STEP_S" "$LOGS/$name.out" >> "$RESULTS" <<'EOF'
import json, sys
name, preset, policy, seconds, out = sys.argv[1:]
rec = json.loads(open(out).read().strip().splitlines()[-1])
print(json.dumps({"step": name, "status": "ok", "preset": preset, "policy": policy,
                  "process_seconds": int(seconds), **rec}))
EOF
    say "$name: $(tail -n 1 "$RESULTS" | "$PY" -c "import json,sys; r=json.load(sys.stdin); print(r['examples_per_s'], 'examples/s,', r['seconds_per_step'], 's/step, batch', r['global_batch_size'], 'on', r['num_replicas'], 'replica(s)')")"
  fi
}
for policy in float32 mixed_bfloat16 mixed_float16; do
  for preset in "${PRESET_NAMES[@]}"; do bench one_device $preset $policy; done
done
for policy in float32 mixed_bfloat16; do
  for preset in "${PRESET_NAMES[@]}"; do bench mirrored $preset $policy; done
done

# --- 5. summary ---------------------------------------------------------------------------------------
TOTAL=$(elapsed)
record total status=done seconds="$TOTAL" mode=$MODE parity="$PARITY" quick="${QUICK:-0}"
"$PY" - "$RESULTS" "$OUT/summary.md" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
env = next(r for r in rows if r["step"] == "env")
total = next(r for r in rows if r["step"] == "total")
lines = [f"# bench/run_gpu.sh ({total['mode']} mode{', QUICK' if total['quick'] == 1 else ''})", "",
         f"- GPUs (nvidia-smi -L): {env['nvidia_smi'] or 'none'}",
         f"- TensorFlow: {json.dumps(env['tf'])}", f"- CPU: {env['cpu']} ({env['cores']} cores)"]
par = next((r for r in rows if r["step"] == "parity"), None)
lines.append(f"- parity (sample QIN export, test split scored with the GPU and with CUDA_VISIBLE_DEVICES=''): " + (
    f"**{par['status']}**, max |diff| {par['max_abs_diff']:.3g} over {par['rows']} rows (tolerance {par['atol']})"
    if par else "not run (an earlier step failed)"))
lines.append(f"- total wall time: {total['seconds']} s")
lines += ["", "| strategy | preset | policy | replicas | batch | s/step | examples/s | status |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for r in rows:
    if not r["step"].startswith("train_"):
        continue
    strategy = "one_device" if r["step"].startswith("train_one_device_") else "mirrored"
    rest = r["step"][len(f"train_{strategy}_"):]
    if r["status"] == "ok":
        lines.append(f"| {strategy} | {r['preset']} | {r['policy']} | {r['num_replicas']} | {r['global_batch_size']} "
                     f"| {r['seconds_per_step']} | {r['examples_per_s']:,.0f} | ok |")
    else:
        lines.append(f"| {strategy} | {rest} | | | | | | {r['status']}: {r.get('reason', '')} |")
other = [r for r in rows if r["step"] in ("preprocess", "sample_train", "sample_export", "score_gpu", "score_cpu")
         and r["status"] != "ok"]
lines += [""] + [f"- {r['step']}: {r['status']} ({r.get('reason', '')})" for r in other]
open(sys.argv[2], "w").write("\n".join(lines).rstrip() + "\n")
EOF
echo
cat "$OUT/summary.md"
echo
say "total ${TOTAL}s; results in $RESULTS, summary in $OUT/summary.md, logs in $LOGS"
exit $FAILED
