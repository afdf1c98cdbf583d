r"""Cuts the bundled sample's raw events into days, for ``scripts/run_sample_cycle.sh``.

    python scripts/cut_days.py days --out=runs/cycle/days [--days=3]
    python scripts/cut_days.py corrupt_labels --examples=runs/cycle/day3/examples [--how=flip|shuffle] [--seed=0]

``days``: the sample's raw events (``data/microlens_sample/raw/events.tsv``,
``user<TAB>item item ...``, each user's events in order) carry no time. They
are put in a global order, (position in the user's list, user's line), the
same order ``tests/test_incremental_build.py`` uses, and cut into ``--days``
parts of equal size (the last takes the remainder). Day ``d`` (1-based) is
the UTC day starting at ``DAY0 + (d - 1) * 86400``; its ``n`` events get the
times ``day start + floor(k * 86400 / n)`` for ``k = 0 .. n - 1``, so they are
spread over the day and strictly increasing. Per day it writes
``events-day{d}.parquet`` (``user``, ``item``, ``ts``; int64) and
``day{d}.json``, a log config like ``configs/logs/microlens_sample.json``
(same catalog, vectors, history and negatives rules, absolute paths) with
``split: time``. The same input gives the same bytes.

The split rule, per day (the script passes it as ``--valid_from`` /
``--test_from``): events from ``VALID_AT`` of the day (60%, 14:24 UTC) on
are valid rows, from ``TEST_AT`` (80%, 19:12 UTC) on test rows, the rest
train. The last line of ``days`` is, per day, ``d valid_from test_from``
(one line per day), for the shell to read.

``corrupt_labels``: a corrupted day for the gate to refuse. Rewrites the
``label`` column of ``EXAMPLES/train.parquet`` in place: ``flip`` (the
default) makes every click a non-click and back, ``shuffle`` permutes the
labels with a seeded generator. The valid and test rows keep their labels,
so the gate compares on true labels. It prints how many labels changed.
Why ``flip`` by default: on the sample, a warm-started run on shuffled
train labels keeps its best epoch on the (true) valid labels, its first,
which still ranks about as well as the model in service on a day's few
hundred valid rows; the gate then rightly has nothing to refuse.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data", "microlens_sample")
RAW_EVENTS = os.path.join(SAMPLE, "raw", "events.tsv")
BASE_CONFIG = os.path.join(REPO, "configs", "logs", "microlens_sample.json")
#: Midnight UTC of day 1 (2026-01-01).
DAY0 = 1767225600
DAY_S = 86400
#: Fractions of each day from which events are valid, then test rows.
VALID_AT, TEST_AT = 0.6, 0.8


def ordered_events(path: str = RAW_EVENTS) -> list[tuple[int, int]]:
    """[(user, item)] in the global order (position in the user's list, user's line)."""
    keyed = []
    with open(path) as f:
        for line_no, line in enumerate(f):
            user, items = line.rstrip("\n").split("\t")
            for j, item in enumerate(items.split()):
                keyed.append((j, line_no, int(user), int(item)))
    keyed.sort()
    return [(u, i) for _, _, u, i in keyed]


def day_config(events_file: str) -> dict:
    """The sample's log config for one day's events file: its catalog and rules, split by time."""
    with open(BASE_CONFIG) as f:
        cfg = json.load(f)
    base = os.path.dirname(BASE_CONFIG)
    cfg["name"] = "microlens_sample_days"
    cfg["events"] = {"files": events_file, "format": "parquet", "user": "user", "item": "item", "time": "ts"}
    cfg["catalog"]["files"] = os.path.normpath(os.path.join(base, cfg["catalog"]["files"]))
    cfg["catalog"]["vector"]["files"] = os.path.normpath(os.path.join(base, cfg["catalog"]["vector"]["files"]))
    # The config's own cut lies after every day; each run gives its day's cut by flag.
    cfg["split"] = {"method": "time", "valid_from": float(DAY0 + 10**6 * DAY_S),
                    "test_from": float(DAY0 + 10**6 * DAY_S)}
    return cfg


def cut_days(out: str, days: int) -> list[tuple[int, float, float]]:
    """Writes the days' events and configs into ``out``; [(day, valid_from, test_from)]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    events = ordered_events()
    n = len(events)
    if not 1 <= days <= n:
        raise SystemExit(f"cut_days: error: --days must be in 1..{n}, got {days}")
    os.makedirs(out, exist_ok=True)
    bounds = [n * k // days for k in range(days + 1)]
    cuts = []
    for d in range(1, days + 1):
        part = events[bounds[d - 1]:bounds[d]]
        start = DAY0 + (d - 1) * DAY_S
        ts = [start + k * DAY_S // len(part) for k in range(len(part))]
        path = os.path.join(os.path.abspath(out), f"events-day{d}.parquet")
        pq.write_table(pa.table({"user": pa.array([e[0] for e in part], pa.int64()),
                                 "item": pa.array([e[1] for e in part], pa.int64()),
                                 "ts": pa.array(ts, pa.int64())}), path)
        with open(os.path.join(out, f"day{d}.json"), "w") as f:
            json.dump(day_config(path), f, indent=1, sort_keys=True)
            f.write("\n")
        cuts.append((d, float(start + VALID_AT * DAY_S), float(start + TEST_AT * DAY_S)))
    return cuts


def corrupt_labels(examples: str, how: str = "flip", seed: int = 0) -> int:
    """Flips or permutes the train labels of a build in place; the number of rows whose label changed."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(examples, "train.parquet")
    table = pq.read_table(path)
    labels = table.column("label").to_numpy()
    perm = 1 - labels if how == "flip" else np.random.default_rng(seed).permutation(labels)
    i = table.schema.get_field_index("label")
    table = table.set_column(i, table.schema.field(i), pa.array(perm, table.schema.field(i).type))
    pq.write_table(table, path)
    return int((perm != labels).sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("days")
    p.add_argument("--out", required=True)
    p.add_argument("--days", type=int, default=3)
    p = sub.add_parser("corrupt_labels")
    p.add_argument("--examples", required=True)
    p.add_argument("--how", choices=("flip", "shuffle"), default="flip")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "days":
        for d, valid_from, test_from in cut_days(args.out, args.days):
            print(d, repr(valid_from), repr(test_from))
    else:
        print(corrupt_labels(args.examples, args.how, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
