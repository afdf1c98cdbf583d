"""Incremental builds against full rebuilds: wall time and peak memory per day.

The log is cut into ``--days`` periods (MovieLens-100k: equal bands of its
timestamps; the periods' parquet files are written once under ``--work``).
For day ``d = 1 .. N`` two builds are timed, each in its own process (a
fresh Python running :func:`pipelines.build_examples.build_examples`
in-process on Beam's in-process runner, so the process's peak RSS is the
build's; children, if any, are included by ``RUSAGE_CHILDREN``):

* **incremental**: day ``d``'s events only, ``previous`` = day ``d - 1``'s
  incremental build;
* **full**: days ``1 .. d`` in one build from nothing.

Every build's split: ``valid_from`` = ``test_from`` = the end of day ``d``
(all rows train). Timings include the process's start-up and imports (the
same for both). Example::

    python bench/bench_incremental.py --days=8 --work=runs/bench_incremental \\
        --output=bench/results/incremental.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ml_dir() -> str:
    local = os.path.join(REPO, "runs", "ml-100k")
    if not os.path.exists(os.path.join(local, "ml-100k.inter")):
        raise SystemExit(f"bench_incremental: error: {local}/ml-100k.inter is missing: run "
                         "scripts/get_movielens100k.sh first")
    return local


def movielens_days(work: str, days: int) -> tuple[list[str], list[int], dict]:
    """Day files (equal bands of time), the end time of each day, and the log config template."""
    ml = _ml_dir()
    d = pacsv.read_csv(os.path.join(ml, "ml-100k.inter"), parse_options=pacsv.ParseOptions(delimiter="\t"))
    t = d["timestamp:float"].to_numpy().astype(np.int64)
    edges = np.linspace(t.min(), t.max() + 1, days + 1).astype(np.int64)
    os.makedirs(os.path.join(work, "days"), exist_ok=True)
    files = []
    for k in range(days):
        m = (t >= edges[k]) & (t < edges[k + 1])
        path = os.path.abspath(os.path.join(work, "days", f"day{k + 1}.parquet"))
        pq.write_table(pa.table({"user": pa.array(d["user_id:token"].to_numpy()[m].astype(np.int64)),
                                 "item": pa.array(d["item_id:token"].to_numpy()[m].astype(np.int64)),
                                 "rating": pa.array(d["rating:float"].to_numpy()[m].astype(np.float64)),
                                 "ts": pa.array(t[m])}), path)
        files.append(path)
    with open(os.path.join(REPO, "configs", "logs", "movielens100k.json")) as f:
        cfg = json.load(f)
    cfg["events"] = {"files": None, "format": "parquet", "user": "user", "item": "item", "time": "ts",
                     "label": {"column": "rating", "op": ">=", "value": 4}}
    cfg["catalog"]["files"] = os.path.join(ml, "ml-100k.item")
    cfg["users"]["files"] = os.path.join(ml, "ml-100k.user")
    return files, [int(e) for e in edges[1:]], cfg


def one(config: str, output_dir: str, previous: str | None) -> dict:
    """Runs one build in this process; returns wall seconds and peak RSS (MiB, self and children)."""
    from pipelines.build_examples import build_examples

    t = time.perf_counter()
    stats = build_examples(config, output_dir, previous=previous)
    sec = time.perf_counter() - t
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"build_seconds": sec, "peak_rss_mib": rss / 1024, "events_in": stats["events_in"],
            "rows": sum(s["rows"] for s in stats["splits"].values())}


def measured(config: str, output_dir: str, previous: str | None) -> dict:
    """:func:`one` in a fresh process; adds the process's wall seconds."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", f"--config={config}", f"--output_dir={output_dir}"]
    if previous:
        cmd.append(f"--previous={previous}")
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"error: build {output_dir} failed: {proc.stderr.strip().splitlines()[-1:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**res, "process_seconds": wall, "loadavg_1min": os.getloadavg()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=int, default=8)
    ap.add_argument("--work", default=os.path.join(REPO, "runs", "bench_incremental"))
    ap.add_argument("--output", default=None)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config")
    ap.add_argument("--output_dir")
    ap.add_argument("--previous")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.config, args.output_dir, args.previous)))
        return 0

    import shutil
    shutil.rmtree(args.work, ignore_errors=True)
    files, ends, template = movielens_days(args.work, args.days)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "")
    result = {"dataset": "movielens100k", "days": args.days, "cpu": cpu, "cores": os.cpu_count(),
              "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    prev = None
    for k in range(args.days):
        for kind, day_files, previous in (("incremental", files[k], prev), ("full", files[:k + 1], None)):
            cfg = json.loads(json.dumps(template))
            cfg["events"]["files"] = day_files
            cfg["split"] = {"method": "time", "valid_from": ends[k], "test_from": ends[k]}
            path = os.path.join(args.work, f"{kind}_day{k + 1}.json")
            with open(path, "w") as f:
                json.dump(cfg, f)
            out = os.path.join(args.work, f"{kind}_day{k + 1}")
            r = {"day": k + 1, "kind": kind, **measured(path, out, previous)}
            result["rows"].append(r)
            print(json.dumps(r), flush=True)
            if kind == "incremental":
                prev = out
            else:
                shutil.rmtree(out)  # a full build is never continued
    result["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    print("| day | events (incr / full) | incremental build s | full build s | incremental peak RSS MiB | "
          "full peak RSS MiB | load (1 min) |")
    print("|---|---|---|---|---|---|---|")
    rows = result["rows"]
    for k in range(args.days):
        i, f_ = rows[2 * k], rows[2 * k + 1]
        print(f"| {k + 1} | {i['events_in']} / {f_['events_in']} | {i['build_seconds']:.1f} | "
              f"{f_['build_seconds']:.1f} | {i['peak_rss_mib']:.0f} | {f_['peak_rss_mib']:.0f} | "
              f"{i['loadavg_1min']:.1f} / {f_['loadavg_1min']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
