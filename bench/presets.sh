# The model presets the benchmarks run, as `bench/bench_train.py --train_flag=...` flags: one home,
# sourced by bench/run_presets.sh and bench/run_gpu.sh.
# shellcheck disable=SC2034
declare -A PRESET=(
  [qin]="--train_flag=--flagfile=configs/microlens50k.flags"
  [din]="--train_flag=--flagfile=configs/microlens50k.flags --train_flag=--model=din"
  [qin_qnn_dnn]="--train_flag=--flagfile=configs/microlens50k_tuned.flags --train_flag=--head=qnn_dnn"
  [transformer_dcn]="--train_flag=--flagfile=configs/transformer_dcn.flags"
)
PRESET_NAMES=(qin din qin_qnn_dnn transformer_dcn)
