"""The gate on a bad day, at the size of a real day: does ``export.validate`` refuse a corrupted candidate?

Runs on a ``scripts/weekly_cycle.py`` work directory (its builds, data
directories, models and flags). For period ``w``:

1. **In service**: the cycle's warm-started model of period ``w - 1`` (period
   0's model for w = 1), exported and pushed as version 1 of a fresh serving
   base (``export.validate --push`` on an empty base: the first day).
2. **Candidates**, each warm-started from the model in service with the
   cycle's flags and seed, on period ``w``'s train rows, and exported:
   - ``true``: the rows as built (the cycle's own warm model of period ``w``);
   - ``shuffled``: the same rows with their labels permuted (seeded);
   - ``flipped``: the same rows with every label inverted.
3. **The gate**: ``python -m export.validate --candidate=... --serving=BASE
   --data=<period w's data> --split=valid`` (the period's valid rows, as in
   the documented cycle), default tolerance, without ``--push``; its exit
   code, its one line and its record are kept. The serving base's bytes are
   hashed before and after every call.

Writes ``OUT/gate_bad_day.json`` and prints one line per candidate. Example::

    python scripts/gate_bad_day.py --work=runs/cycle_mlens --out=results/cycle_microlens --period=2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import weekly_cycle  # noqa: E402  (the cycle's steps: data_dir, train)
from qin_tf.fingerprint import tree_digest  # noqa: E402


def corrupted_data(work: str, w: int, how: str, seed: int) -> str:
    """Period ``w``'s warm data directory with its train labels ``how`` (shuffled / flipped)."""
    ex = os.path.join(work, "ex", f"p{w:02d}")
    name = f"gate_{how}_p{w:02d}"
    src = os.path.join(work, "exdirs", f"{name}_src")
    if not os.path.exists(os.path.join(src, "train.parquet")):
        os.makedirs(src, exist_ok=True)
        table = pq.read_table(os.path.join(ex, "train.parquet"))
        labels = table["label"].to_numpy()
        new = np.random.default_rng(seed).permutation(labels) if how == "shuffled" else 1 - labels
        table = table.set_column(table.column_names.index("label"), "label", pa.array(new, table["label"].type))
        pq.write_table(table, os.path.join(src, "train.parquet"))
    test = weekly_cycle.eval_rows(os.path.join(work, "ex", f"p{w + 1:02d}"))
    return weekly_cycle.data_dir(work, name, ex, [src], test)


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})


def export(model_dir: str, base: str) -> str:
    """Version 1 of ``base``: ``model_dir``'s model, its warm-up rows from the data it trained on."""
    with open(os.path.join(model_dir, "config.json")) as f:
        data = json.load(f)["train"]["data_dir"]
    if not os.path.exists(os.path.join(base, "1", "saved_model.pb")):
        proc = run("export.exporter", f"--model_dir={model_dir}", f"--export_base={base}", f"--data_dir={data}",
                   "--version=1")
        if proc.returncode != 0:
            raise SystemExit(f"gate_bad_day: error: exporting {model_dir}: {proc.stderr.strip()[-500:]}")
    return os.path.join(base, "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="a scripts/weekly_cycle.py --work directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--period", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1, help="the cycle's main seed (its models) and the shuffle's")
    args = ap.parse_args(argv)
    work, w, seed = args.work, args.period, args.seed
    with open(os.path.join(args.out, "cycles.json")) as f:
        flags = json.load(f)["flags"]
    models = os.path.join(work, "models", f"s{seed}")
    serving_model = os.path.join(models, "base_p00" if w == 1 else f"warm_p{w - 1:02d}")
    data = os.path.join(work, "data", f"warm_p{w:02d}")
    gate = os.path.join(work, "gate", f"p{w:02d}")
    serving = os.path.join(gate, "serving")
    if not os.path.exists(os.path.join(serving, "1")):
        os.makedirs(serving, exist_ok=True)
        first = export(serving_model, os.path.join(gate, "export_in_service"))
        proc = run("export.validate", f"--candidate={first}", f"--serving={serving}", f"--data={data}",
                   "--split=valid", "--push")
        if proc.returncode != 0:
            raise SystemExit(f"gate_bad_day: error: pushing the model in service: {proc.stderr.strip()[-500:]}")

    candidates = {"true": os.path.join(models, f"warm_p{w:02d}")}
    for how in ("shuffled", "flipped"):
        d = corrupted_data(work, w, how, seed)
        m = os.path.join(work, "models", f"s{seed}", f"gate_{how}_p{w:02d}")
        with contextlib.redirect_stdout(io.StringIO()):
            weekly_cycle.train(flags, d, m, seed, serving_model, os.path.join(work, "logs", f"gate_{how}_p{w:02d}.log"))
        candidates[how] = m
    results = {"period": w, "seed": seed, "serving_model": serving_model, "data": data, "flags": flags,
               "candidates": {}}
    for name, m in candidates.items():
        version = export(m, os.path.join(gate, f"export_{name}"))
        before = tree_digest(serving)
        proc = run("export.validate", f"--candidate={version}", f"--serving={serving}", f"--data={data}",
                   "--split=valid")
        record_path = version.rstrip("/") + ".validation.json"
        record = json.load(open(record_path)) if os.path.exists(record_path) else None
        results["candidates"][name] = {
            "model_dir": m, "exit_code": proc.returncode, "stdout": proc.stdout.strip(), "stderr": proc.stderr.strip(),
            "record": record, "serving_unchanged": tree_digest(serving) == before,
            "test_auc_in_training": json.load(open(os.path.join(m, "metrics.json")))["splits"]["test"]["auc"]}
        line = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        print(f"period {w} candidate {name}: exit {proc.returncode}: {line[-1] if line else ''}", flush=True)
    with open(os.path.join(args.out, f"gate_bad_day_p{w:02d}.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
