"""Every day, not once, measured: warm start against a full retrain and a frozen model, period by period.

The log is cut into periods (MovieLens-100k: weeks of its real timestamps;
MicroLens-50k: "days" of its raw log's order, see :func:`microlens_periods`).
Period 0 is built and trained from scratch (the frozen model, c). Then for
each period ``w = 1 .. last``:

1. **Build** period ``w`` incrementally (``build_examples --previous`` = period
   ``w - 1``'s build), with ``valid_from`` = the period's last day
   (``--valid_days``) and ``test_from`` = its end: its train rows, then its
   last day as valid rows (model selection), no test rows.
2. **Eval rows**: period ``w + 1``'s rows (all of its build's train and valid
   rows) become the ``test`` split of period ``w``'s data directories. Their
   dense ids extend period ``w``'s (ids are appended); for a model whose
   item table is smaller, an item id beyond it is mapped to the OOV id 1
   when scoring (a context value beyond a model's table already falls into
   its out-of-vocabulary row).
3. **(a) warm**: ``qin_tf.train --warm_start_from`` = the (a) model of
   period ``w - 1`` (period 0's model for w = 1), on period ``w``'s train
   rows (``--warm_window=K``: the train rows of periods ``w - K + 1 .. w``,
   a replay of the recent past; its models are named ``warmK_pWW``).
4. **(b) full**: ``qin_tf.train`` from scratch on the train rows of periods
   ``0 .. w`` (period ``w``'s vocabularies), same flags, same valid rows.
5. **(c) frozen**: period 0's model, untouched.
6. AUC (and logloss) of (a), (b), (c) on the eval rows; the wall time of
   the (a) and (b) training calls (in-process :func:`qin_tf.train.cli`, so
   TensorFlow's start-up is not counted; model building, every epoch's
   evaluation and the final evaluation are).

Every step skips what is already done (a rerun continues). Results:
``OUT/cycles.json`` (one record per period and seed), ``OUT/auc.png``,
``OUT/table.md``. Example::

    python scripts/weekly_cycle.py --dataset=movielens --work=runs/cycle_ml \\
        --out=results/cycle_movielens_all --epochs=4 --patience=2

``--extra_seeds=S --seed_periods=5,10`` retrains (a) and (b) of those
periods with another seed (the warm start from the main seed's previous
model) for a seed-to-seed spread.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY = 86400
ML_DIR = os.path.join(REPO, "runs", "ml-100k")
EVAL_SPLIT = "test"


# --------------------------------------------------------------------------
# Periods
# --------------------------------------------------------------------------


def _ml_dir() -> str:
    if not os.path.exists(os.path.join(ML_DIR, "ml-100k.inter")):
        raise SystemExit(f"weekly_cycle: error: {ML_DIR}/ml-100k.inter is missing: run scripts/get_movielens100k.sh first")
    return ML_DIR


def movielens_periods(work: str) -> tuple[list[dict], dict]:
    """Weeks of MovieLens-100k's timestamps from its first event: files, bounds, and the config template."""
    ml = _ml_dir()
    d = pacsv.read_csv(os.path.join(ml, "ml-100k.inter"), parse_options=pacsv.ParseOptions(delimiter="\t"))
    t = d["timestamp:float"].to_numpy().astype(np.int64)
    t0 = int(t.min())
    n = int((t.max() - t0) // (7 * DAY)) + 1
    periods = []
    os.makedirs(os.path.join(work, "periods"), exist_ok=True)
    for k in range(n):
        lo, hi = t0 + k * 7 * DAY, t0 + (k + 1) * 7 * DAY
        m = (t >= lo) & (t < hi)
        path = os.path.abspath(os.path.join(work, "periods", f"p{k:02d}.parquet"))
        if not os.path.exists(path):
            pq.write_table(pa.table({
                "user": pa.array(d["user_id:token"].to_numpy()[m].astype(np.int64)),
                "item": pa.array(d["item_id:token"].to_numpy()[m].astype(np.int64)),
                "rating": pa.array(d["rating:float"].to_numpy()[m].astype(np.float64)),
                "ts": pa.array(t[m])}), path)
        periods.append({"index": k, "file": path, "events": int(m.sum()), "start": lo, "end": hi,
                        "valid_from": hi - DAY, "test_from": hi})
    with open(os.path.join(REPO, "configs", "logs", "movielens100k.json")) as f:
        cfg = json.load(f)
    cfg["events"] = {"files": None, "format": "parquet", "user": "user", "item": "item", "time": "ts",
                     "label": {"column": "rating", "op": ">=", "value": 4}}
    cfg["catalog"]["files"] = os.path.join(ml, "ml-100k.item")
    cfg["users"]["files"] = os.path.join(ml, "ml-100k.user")
    return periods, cfg


def microlens_periods(work: str, days: int, valid_frac: float) -> tuple[list[dict], dict]:
    """MicroLens-50k's raw log cut into ``days`` "days" (it has no timestamps).

    The only order the raw log has is each user's: its ``i``-th item is the
    user's ``i``-th interaction. A "day" is a band of those positions: day 0
    holds every user's first interactions up to a position, day 1 the next
    positions, and so on; the bands' edges are quantiles of the positions
    >= 2 (position 1 has no history and yields no example), so the days
    hold about equal numbers of examples (the last one the long tails).
    Every user has at least 5 interactions, so the first days hold one
    position of every user each.

    Each event gets the time ``position * 10**6 + r(user)``, where ``r`` is a
    fixed pseudo-random rank of the user in ``[0, 10**6)``: a user's events
    stay in order, and a day's events at its last position whose user ranks
    in the top ``valid_frac`` are the day's valid rows (``valid_from``): a
    fixed random share of the users, no cross-user order is invented beyond
    that.
    """
    with open(os.path.join(REPO, "configs", "logs", "microlens50k.json")) as f:
        cfg = json.load(f)
    ev = cfg["events"]
    src = ev["files"] if os.path.isabs(ev["files"]) else os.path.normpath(
        os.path.join(REPO, "configs", "logs", ev["files"]))
    users, items, pos = [], [], []
    with open(src) as f:
        for line in f:
            u, its = line.rstrip("\n").split("\t")
            for i, it in enumerate(its.split()):
                users.append(int(u))
                items.append(int(it))
                pos.append(i + 1)
    users, items, pos = np.array(users), np.array(items), np.array(pos)
    scale = 10 ** 6
    rank = (users.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(scale)
    ts = pos.astype(np.int64) * scale + rank.astype(np.int64)
    edges = np.unique(np.quantile(pos[pos >= 2], np.linspace(0, 1, days + 1)[1:-1]).astype(np.int64))
    bands = np.concatenate([[0], edges, [pos.max() + 1]])
    periods = []
    os.makedirs(os.path.join(work, "periods"), exist_ok=True)
    for k in range(len(bands) - 1):
        lo, hi = int(bands[k]), int(bands[k + 1])
        m = (pos >= lo) & (pos < hi)
        path = os.path.abspath(os.path.join(work, "periods", f"p{k:02d}.parquet"))
        if not os.path.exists(path):
            pq.write_table(pa.table({"user": pa.array(users[m]), "item": pa.array(items[m]),
                                     "ts": pa.array(ts[m])}), path)
        vf = (hi - 1) * scale + int(round((1 - valid_frac) * scale))
        periods.append({"index": k, "file": path, "events": int(m.sum()), "start": lo * scale, "end": hi * scale,
                        "positions": [lo, hi], "valid_from": vf, "test_from": hi * scale})
    cfg["events"] = {"files": None, "format": "parquet", "user": "user", "item": "item", "time": "ts"}
    for key in ("catalog", "users"):
        if cfg.get(key):
            for sub in (cfg[key], cfg[key].get("vector") or {}):
                f_ = sub.get("files")
                if f_ and not os.path.isabs(f_):
                    sub["files"] = os.path.normpath(os.path.join(REPO, "configs", "logs", f_))
    return periods, cfg


# --------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------


def build(work: str, p: dict, template: dict, prev: str | None) -> tuple[str, float]:
    """Period ``p``'s incremental build; returns its directory and wall seconds (0 when done before)."""
    from pipelines.build_examples import build_examples

    out = os.path.join(work, "ex", f"p{p['index']:02d}")
    if os.path.exists(os.path.join(out, "stats.json")):
        return out, 0.0
    cfg = json.loads(json.dumps(template))
    cfg["events"]["files"] = p["file"]
    cfg["split"] = {"method": "time", "valid_from": p["valid_from"], "test_from": p["test_from"]}
    cfg_path = os.path.join(work, "configs", f"p{p['index']:02d}.json")
    os.makedirs(os.path.dirname(cfg_path), exist_ok=True)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
    t = time.perf_counter()
    build_examples(cfg_path, out, previous=prev)
    return out, time.perf_counter() - t


def eval_rows(next_ex: str) -> pa.Table:
    """Period w+1's rows: its build's train and valid rows."""
    return pa.concat_tables([pq.read_table(os.path.join(next_ex, f"{s}.parquet")) for s in ("train", "valid")])


def data_dir(work: str, name: str, ex: str, train_from: list[str], test: pa.Table | None) -> str:
    """Examples dir (``ex``'s config, vocabularies, item table and valid rows; train rows of
    ``train_from``; ``test``) preprocessed into TFRecords; returns the data directory."""
    from pipelines.preprocess import preprocess

    data = os.path.join(work, "data", name)
    if os.path.exists(os.path.join(data, "feature_spec.json")):
        return data
    exd = os.path.join(work, "exdirs", name)
    shutil.rmtree(exd, ignore_errors=True)
    os.makedirs(exd)
    for f in ("dataset_config.json", "item_info.parquet", "valid.parquet", "vocab"):
        os.symlink(os.path.abspath(os.path.join(ex, f)), os.path.join(exd, f))
    tables = [pq.read_table(os.path.join(d, "train.parquet")) for d in train_from]
    pq.write_table(pa.concat_tables(tables), os.path.join(exd, "train.parquet"))
    if test is None:
        os.symlink(os.path.abspath(os.path.join(ex, "test.parquet")), os.path.join(exd, "test.parquet"))
    else:
        pq.write_table(test, os.path.join(exd, "test.parquet"))
    with contextlib.redirect_stdout(io.StringIO()):
        preprocess(exd, data, os.path.join(exd, "dataset_config.json"))
    return data


def train(flags: list[str], data: str, model_dir: str, seed: int, warm: str | None, log: str) -> float | None:
    """``qin_tf.train`` in-process; returns the wall seconds (None when done before)."""
    from qin_tf import train as qtrain

    if os.path.exists(os.path.join(model_dir, "metrics.json")):
        return None
    argv = ["train", *flags, f"--data_dir={data}", f"--model_dir={model_dir}", f"--seed={seed}"]
    if warm:
        argv.append(f"--warm_start_from={warm}")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        rc = qtrain.cli(argv)
    sec = time.perf_counter() - t
    if rc != 0:
        raise SystemExit(f"error: training {model_dir} failed (exit {rc}); see {log}")
    with open(os.path.join(model_dir, "train_seconds.json"), "w") as f:
        json.dump({"seconds": sec}, f)
    return sec


def train_seconds(model_dir: str) -> float:
    with open(os.path.join(model_dir, "train_seconds.json")) as f:
        return json.load(f)["seconds"]


_MODELS: dict = {}


def score(model_dir: str, data: str) -> dict:
    """AUC and logloss of ``model_dir/best.keras`` on ``data``'s eval split; item ids beyond the model's
    item table are mapped to the OOV id 1 (context values beyond a table fall into its OOV row)."""
    import keras
    import tensorflow as tf

    import qin_tf.model  # noqa: F401  (registers the layers for load_model)
    from qin_tf import metrics as qmetrics
    from qin_tf.data import make_dataset, model_inputs
    from qin_tf.spec import FeatureSpec

    if model_dir not in _MODELS:
        with open(os.path.join(model_dir, "config.json")) as f:
            mdata = json.load(f)["train"]["data_dir"]
        model = keras.saving.load_model(os.path.join(model_dir, "best.keras"), compile=False)
        mspec = FeatureSpec.load(mdata)
        fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        _MODELS[model_dir] = (model, mspec, fn)
    model, mspec, fn = _MODELS[model_dir]
    spec = FeatureSpec.load(data)
    ds = make_dataset(spec, EVAL_SPLIT, 4096, training=False, with_meta=True, labelled=True)
    ys, ps, gs, mapped = [], [], [], 0
    for features, label in ds:
        x = dict(model_inputs(spec, features))
        for name in (spec.target_item, spec.sequence):
            v = x[name]
            beyond = v >= mspec.num_items
            mapped += int(tf.reduce_sum(tf.cast(beyond, tf.int64)))
            x[name] = tf.where(beyond, tf.ones_like(v), v)
        out = fn(x)
        out = out["ctr"] if isinstance(out, dict) else out
        ps.append(np.reshape(np.asarray(out, np.float64), [-1]))
        ys.append(label.numpy())
        gs.append(features[spec.meta[0]].numpy())
    m = qmetrics.evaluate(np.concatenate(ys), np.concatenate(ps), np.concatenate(gs))
    return {"auc": float(m["auc"]), "logloss": float(m["logloss"]), "gauc": float(m["gauc"]),
            "rows": int(m["num_examples"]), "ids_mapped_to_oov": mapped}


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(Exception):
        cpu = next(line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}


def run_seed_cycle(args, work, flags, periods, exs, w, seed, base_warm, records):
    """Trains (a) and (b) of period ``w`` for ``seed`` and scores (a), (b), (c)."""
    ex = exs[w]
    test = eval_rows(exs[w + 1])
    warm = "warm" if args.warm_window == 1 else f"warm{args.warm_window}"
    window = exs[max(0, w - args.warm_window + 1):w + 1]  # (a)'s train rows: the last warm_window periods
    d_a = data_dir(work, f"{warm}_p{w:02d}", ex, window, test)
    d_b = data_dir(work, f"full_p{w:02d}", ex, exs[:w + 1], test)
    m_a = os.path.join(work, "models", f"s{seed}", f"{warm}_p{w:02d}")
    m_b = os.path.join(work, "models", f"s{seed}", f"full_p{w:02d}")
    load = os.getloadavg()
    train(flags, d_a, m_a, seed, base_warm, os.path.join(work, "logs", f"s{seed}_{warm}_p{w:02d}.log"))
    train(flags, d_b, m_b, seed, None, os.path.join(work, "logs", f"s{seed}_full_p{w:02d}.log"))
    m_c = os.path.join(work, "models", f"s{args.seeds[0]}", "base_p00")
    rec = {"period": w, "eval_period": w + 1, "seed": seed, "warm_window": args.warm_window,
           "train_rows_warm": sum(pq.ParquetFile(os.path.join(e, "train.parquet")).metadata.num_rows
                                  for e in window),
           "train_rows_full": sum(pq.ParquetFile(os.path.join(e, "train.parquet")).metadata.num_rows
                                  for e in exs[:w + 1]),
           "warm": {**score(m_a, d_a), "train_seconds": train_seconds(m_a)},
           "full": {**score(m_b, d_a), "train_seconds": train_seconds(m_b)},
           "frozen": score(m_c, d_a), "loadavg_before": list(load), "loadavg_after": list(os.getloadavg())}
    records.append(rec)
    print(f"period {w:2d} seed {seed}: AUC warm {rec['warm']['auc']:.4f} full {rec['full']['auc']:.4f} frozen "
          f"{rec['frozen']['auc']:.4f}  train s warm {rec['warm']['train_seconds']:.1f} full "
          f"{rec['full']['train_seconds']:.1f}  load {load[0]:.1f}", flush=True)
    return m_a


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=["movielens", "microlens"], default="movielens")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--days", type=int, default=6, help="microlens: the number of days")
    ap.add_argument("--valid_frac", type=float, default=0.15, help="microlens: a day's valid share")
    ap.add_argument("--first", type=int, default=1)
    ap.add_argument("--last", type=int, default=None, help="the last period trained (default: all but the last)")
    ap.add_argument("--warm_window", type=int, default=1,
                    help="(a) trains on the train rows of the last this many periods (1: the new period's only)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--patience", type=int, default=1)
    ap.add_argument("--flagfile", default=None)
    ap.add_argument("--train_flags", default="", help="more qin_tf.train flags, space-separated (same for a and b)")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    ap.add_argument("--extra_seeds", type=lambda s: [int(x) for x in s.split(",")], default=[])
    ap.add_argument("--seed_periods", type=lambda s: [int(x) for x in s.split(",")], default=[])
    ap.add_argument("--summarize", action="store_true", help="only rewrite table and plot from OUT/cycles.json")
    args = ap.parse_args(argv)
    if args.summarize:
        with open(os.path.join(args.out, "cycles.json")) as f:
            res = json.load(f)
        res["machine_at_end"] = machine()
        summarize(args.out, res)
        return 0

    work, out = args.work, args.out
    os.makedirs(work, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    if args.dataset == "movielens":
        periods, template = movielens_periods(work)
        flagfile = args.flagfile or os.path.join(REPO, "configs", "movielens100k.flags")
    else:
        periods, template = microlens_periods(work, args.days, args.valid_frac)
        flagfile = args.flagfile or os.path.join(REPO, "configs", "microlens50k.flags")
    last = min(args.last if args.last is not None else len(periods) - 2, len(periods) - 2)
    flags = [f"--flagfile={flagfile}", f"--epochs={args.epochs}", f"--patience={args.patience}", *args.train_flags.split()]
    started = {"machine": machine(), "argv": sys.argv, "flags": flags, "periods": periods}

    exs, build_s, prev = [], [], None
    for p in periods[:last + 2]:
        ex, sec = build(work, p, template, prev)
        exs.append(ex)
        build_s.append(sec)
        prev = ex
    earlier = os.path.join(out, "cycles.json")
    if os.path.exists(earlier):  # a rerun skips the builds done before: keep their times
        with open(earlier) as f:
            done_before = json.load(f).get("build_seconds") or []
        build_s = [s or (done_before[k] if k < len(done_before) else 0.0) for k, s in enumerate(build_s)]
    print(f"built {len(exs)} periods ({sum(build_s):.0f} s)", flush=True)

    seed = args.seeds[0]
    d0 = data_dir(work, "base_p00", exs[0], [exs[0]], eval_rows(exs[1]))
    m0 = os.path.join(work, "models", f"s{seed}", "base_p00")
    train(flags, d0, m0, seed, None, os.path.join(work, "logs", f"s{seed}_base_p00.log"))

    records, warm_from = [], {}
    prev_model = m0
    for w in range(args.first, last + 1):
        warm_from[w] = prev_model
        prev_model = run_seed_cycle(args, work, flags, periods, exs, w, seed, prev_model, records)
        _write(out, started, records, build_s)
    for s in args.extra_seeds:
        for w in args.seed_periods:
            if w in warm_from:
                run_seed_cycle(args, work, flags, periods, exs, w, s, warm_from[w], records)
                _write(out, started, records, build_s)
    _write(out, started, records, build_s, final=True)
    return 0


def _write(out, started, records, build_s, final=False):
    res = {**started, "build_seconds": build_s, "records": records,
           "machine_at_end": machine() if final else None}
    with open(os.path.join(out, "cycles.json"), "w") as f:
        json.dump(res, f, indent=1)
    if final:
        summarize(out, res)


def _each(rs, get, fmt) -> str:
    return ", ".join(format(get(r), fmt) for r in rs)


def summarize(out: str, res: dict) -> None:
    main_seed = res["records"][0]["seed"] if res["records"] else None
    recs = [r for r in res["records"] if r["seed"] == main_seed]
    lines = ["| period | eval rows | train rows warm / full | AUC warm | AUC full | AUC frozen | warm - full "
             "| train s warm | train s full | warm / full time |", "|" + "---|" * 10]
    for r in recs:
        lines.append(f"| {r['period']} | {r['warm']['rows']} | {r['train_rows_warm']} / {r['train_rows_full']} | "
                     f"{r['warm']['auc']:.4f} | {r['full']['auc']:.4f} | {r['frozen']['auc']:.4f} | "
                     f"{r['warm']['auc'] - r['full']['auc']:+.4f} | {r['warm']['train_seconds']:.1f} | "
                     f"{r['full']['train_seconds']:.1f} | {r['warm']['train_seconds'] / r['full']['train_seconds']:.2f} |")
    if recs:
        gap = np.array([r["warm"]["auc"] - r["full"]["auc"] for r in recs])
        ta = sum(r["warm"]["train_seconds"] for r in recs)
        tb = sum(r["full"]["train_seconds"] for r in recs)
        lines += ["", f"mean AUC warm - full: {gap.mean():+.4f} (min {gap.min():+.4f}, max {gap.max():+.4f}, "
                      f"periods within 0.002 below full or better: {int((gap >= -0.002).sum())}/{len(gap)}); "
                      f"mean frozen - full: {np.mean([r['frozen']['auc'] - r['full']['auc'] for r in recs]):+.4f}; "
                      f"training time warm / full: {ta:.0f} s / {tb:.0f} s = {ta / tb:.2f}"]
    spread = {}
    for r in res["records"]:
        spread.setdefault(r["period"], []).append(r)
    multi = {w: rs for w, rs in spread.items() if len(rs) > 1}
    if multi:
        lines += ["", "| period | seeds | AUC warm (each seed) | AUC full (each seed) | warm - full (each seed) |",
                  "|---|---|---|---|---|"]
        for w, rs in sorted(multi.items()):
            lines.append(f"| {w} | {', '.join(str(r['seed']) for r in rs)} | "
                         f"{_each(rs, lambda r: r['warm']['auc'], '.4f')} | {_each(rs, lambda r: r['full']['auc'], '.4f')} | "
                         f"{_each(rs, lambda r: r['warm']['auc'] - r['full']['auc'], '+.4f')} |")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    x = [r["eval_period"] for r in recs]
    for key, label in (("warm", "(a) warm start"), ("full", "(b) full retrain"), ("frozen", "(c) frozen first")):
        ax.plot(x, [r[key]["auc"] for r in recs], marker="o", ms=3, label=label)
    ax.set_xlabel("evaluated period (rows of period w+1)")
    ax.set_ylabel("AUC")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "auc.png"), dpi=90)


if __name__ == "__main__":
    sys.exit(main())
