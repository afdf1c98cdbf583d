"""BENCHMARKS.md's tables from a bench/run_peak_levers.sh results file.

    python bench/peak_table.py bench/results/peak_levers.jsonl

Prints, in markdown: the GEMM peaks; each QIN lever's examples/s, its QNN
GFLOP/s (``qnn_train_gflop_per_step`` over the step time) and that rate as a
fraction of the GEMM peak of its dtype; then the op-time shares of each
profiled step (by model part, and the largest op types).
"""

from __future__ import annotations

import json
import sys

_PEAK_DTYPE = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def lever(r: dict) -> str:
    lv = r["levers"]
    parts = []
    if lv.get("dropout_impl", "qin") != "qin":
        parts.append({"keras": "Keras' dropout", "native_scale": "dropout rescaled in the compute dtype"}
                     [lv["dropout_impl"]])
    if lv.get("inter_op_threads"):
        parts.append(f"inter-op threads {lv['inter_op_threads']}")
    if lv.get("jit_qnn"):
        parts.append("XLA for the QNN tower")
    if lv.get("jit_compile"):
        parts.append("XLA for the whole step (dense history)")
    elif not lv.get("sparse_history", True):
        parts.append("dense history")
    return ", ".join(parts) or "default"


def main(path: str) -> None:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    gemm = next(r for r in rows if r["bench"] == "gemm")
    m = gemm["machine"]
    print(f"<!-- {path}: {len(rows)} lines, {rows[0]['date']} .. {rows[-1]['date']}, {m['cpu']}, "
          f"{m['cores']} cores -->\n")
    print(f"GEMM {gemm['m']} x {gemm['k']} x {gemm['n']}: float32 {gemm['float32_gflops']:,} GFLOP/s, "
          f"bfloat16 {gemm['bfloat16_gflops']:,} GFLOP/s\n")
    print("| policy | lever | ex/s | s / step | vs default | QNN GFLOP/s | fraction of the GEMM peak |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    default = {}
    for r in rows:
        if r["bench"] != "train" or r.get("model") != "qin":
            continue
        policy = r["levers"]["dtype_policy"]
        name = lever(r)
        if name == "default":
            default[policy] = r["examples_per_s"]
        peak = gemm[f"{_PEAK_DTYPE[policy]}_gflops"]
        ratio = f"{r['examples_per_s'] / default[policy]:.2f}" if policy in default else "-"
        print(f"| {policy} | {name} | {r['examples_per_s']:,.0f} | {r['seconds_per_step']} | {ratio} | "
              f"{r['qnn_gflops']:,.0f} | {r['qnn_gflops'] / peak:.2f} |")
    for r in rows:
        if "profile" not in r:
            continue
        p = r["profile"]
        print(f"\n{r['model']} ({' '.join(f for f in r['train_flags'] if 'flagfile' not in f) or 'preset'}), "
              f"{r['levers']['dtype_policy']}, batch {r['global_batch_size']}: {r['examples_per_s']:,.1f} ex/s; "
              f"profile of {p['steps']} steps, {p['wall_s']} s wall, {p['op_time_s']} s of op time\n")
        print("| part | share of op time |\n| --- | --- |")
        for name, share in p["by_part"]:
            print(f"| {name} | {share:.1%} |")
        print("\n| op type | share of op time |\n| --- | --- |")
        for name, share in p["by_type"][:8]:
            print(f"| {name} | {share:.1%} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/peak_levers.jsonl")
