"""Markdown tables of a results file written by bench/run_all.sh (the tables of BENCHMARKS.md).

    python bench/summarize.py [bench/results/results.jsonl]

Figures of the original PyTorch QIN (FuxiCTR 2.3.7, torch CPU, 2 threads) on
the same data and machine type, as measured by the project, are the
reference of the ratio columns.
"""

from __future__ import annotations

import json
import sys

#: The original PyTorch QIN on this data and machine type (project measurement).
ORIGINAL = {"train_examples_per_s": 310.0, "seconds_per_epoch": 18 * 60.0, "score_examples_per_s": 990.0,
            "peak_rss_mb": 10.2 * 1024}


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _levers(r: dict) -> str:
    lv = r["levers"]
    parts = ["sparse history" if lv["sparse_history"] else "dense history",
             f"{lv['asta']} ASTA"]
    if lv.get("deduplicate"):
        parts.append("each id embedded once")
    if lv["jit_compile"]:
        parts.append("XLA")
    if lv["dtype_policy"] != "float32":
        parts.append(lv["dtype_policy"])
    if lv["intra_op_threads"] or lv["inter_op_threads"]:
        parts.append(f"threads intra {lv['intra_op_threads'] or 'default'}/inter {lv['inter_op_threads'] or 'default'}")
    return ", ".join(parts)


def main(path: str) -> None:
    rows = load(path)
    print(f"<!-- from {path}: {len(rows)} runs, {rows[0]['date']} .. {rows[-1]['date']} -->\n")
    print("| bench | command | result | peak RSS MB |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        b = r["bench"]
        if b == "train":
            res = f"{r['examples_per_s']:,.0f} ex/s ({r['seconds_per_step']} s/step)"
            if "seconds_per_epoch" in r:
                res += f"; epoch {r['seconds_per_epoch']} s"
            res += f"; {_levers(r)}, {r['strategy']}"
        elif b == "reader":
            res = f"best {r['best_records_per_s']:,} rec/s, setup {r['setup_s']} s"
        elif b == "preprocess":
            res = f"{r['rows']:,} rows in {r['seconds']} s = {r['rows_per_s']:,} rows/s"
        elif b == "score":
            res = "; ".join(f"{x['input']} b{x['batch_size']}: {x['examples_per_s']:,.0f} ex/s "
                            f"(CLI {x['cli_examples_per_s']:,.0f}, {x['cli_peak_rss_mb']} MB)" for x in r["runs"])
        elif b == "latency":
            res = "; ".join(f"b{n}: " + ", ".join(f"{k} p50 {v['p50_ms']} p99 {v['p99_ms']}" for k, v in d.items())
                            for n, d in r["in_process"].items())
            if "grpc_round_trip" in r:
                res += "; gRPC " + "; ".join(f"b{n}: p50 {v['p50_ms']} p99 {v['p99_ms']}"
                                             for n, v in r["grpc_round_trip"].items() if isinstance(v, dict))
        elif b == "gemm":
            res = f"float32 {r['float32_gflops']} GFLOP/s, bfloat16 {r['bfloat16_gflops']} GFLOP/s"
        else:
            res = ""
        print(f"| {b} | `{r['command']}` | {res} | {r['peak_rss_mb']} |")
    train = [r for r in rows if r["bench"] == "train" and r["levers"]["sparse_history"]
             and r["levers"]["asta"] == "reassociated" and not r["levers"]["intra_op_threads"]
             and not r["levers"]["inter_op_threads"] and r["levers"]["dtype_policy"] == "float32"]
    for r in train:
        print(f"\n{r['strategy']}: {r['examples_per_s'] / ORIGINAL['train_examples_per_s']:.1f}x the original's "
              f"examples/s; epoch {ORIGINAL['seconds_per_epoch'] / r.get('seconds_per_epoch', float('nan')):.1f}x "
              f"faster; peak RSS {r['peak_rss_mb'] / ORIGINAL['peak_rss_mb']:.2f}x")
    for r in rows:
        if r["bench"] == "train" and "profile" in r:
            p = r["profile"]
            print(f"\nprofile ({_levers(r)}, {r['strategy']}): wall {p['wall_s']} s, op time {p['op_time_s']} s, "
                  f"input wait {p.get('input_wait_s')} s\n  by part: {p['by_part']}\n  by type: {p['by_type']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/results.jsonl")
