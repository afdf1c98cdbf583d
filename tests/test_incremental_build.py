"""Incremental builds (``build_examples --previous``) on a timestamped version of the bundled sample.

The sample's raw events (``user<TAB>item item ...``, each user's events in
order) get a synthetic time: an event's position ``j`` in its user's list as
``(j + 1) // 2`` (so after the first, a user's events come in pairs with the
same time). The log is cut into
four days by the global order (time, user, position): the cuts fall inside
a time, so a day starts with events at exactly the previous day's end. One
build over all four days is compared with four builds chained with
``--previous``, each reading only its own day's file. The module builds each
once; the bad-input checks reuse them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import incremental
from pipelines.build_examples import DATASET_CONFIG_FILENAME, build_examples
from qin_tf.rows import PreprocessError
from pipelines.vocabularies import read_vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAW_EVENTS = os.path.join(REPO, "data", "microlens_sample", "raw", "events.tsv")
DAYS = 4
MAX_LEN = 5  # short, so that the state's kept history is cut


def timestamped_events():
    """[(user, item, time)] in the global order (time, user's line, position)."""
    out = []
    with open(RAW_EVENTS) as f:
        for line_no, line in enumerate(f):
            user, items = line.rstrip("\n").split("\t")
            for j, item in enumerate(items.split()):
                out.append(((j + 1) // 2, line_no, j, int(user), int(item)))
    out.sort()
    return [(u, i, t) for t, _, _, u, i in out]


def write_events(path, events):
    pq.write_table(pa.table({"user": pa.array([e[0] for e in events], pa.int64()),
                             "item": pa.array([e[1] for e in events], pa.int64()),
                             "ts": pa.array([e[2] for e in events], pa.int64())}), path)


def write_config(path, files, **over):
    cfg = {"name": "sample_days", "shards": 2,
           "events": {"files": files, "format": "parquet", "user": "user", "item": "item", "time": "ts"},
           "history": {"max_len": MAX_LEN},
           # The config's own cut lies after every event; each run gives the cut by flag.
           "split": {"method": "time", "valid_from": 1000, "test_from": 1000}}
    cfg.update(over)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(path)


def tree_hash(d):
    h = {}
    for root, _, files in os.walk(d):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                h[os.path.relpath(p, d)] = hashlib.sha256(f.read()).hexdigest()
    return h


def positives_raw(out):
    """{(user, raw history, raw target, split)} of the positive rows (dense ids mapped back; None = OOV)."""
    with open(os.path.join(out, DATASET_CONFIG_FILENAME)) as f:
        vocabs = json.load(f)["vocabularies"]
    items = read_vocab(os.path.join(out, vocabs["item_id"]["path"]), "int64")

    def raw(d):
        return items[d - 2] if d >= 2 else None

    rows = []
    for split in ("train", "valid", "test"):
        for r in pq.read_table(os.path.join(out, f"{split}.parquet")).to_pylist():
            if r["label"] == 1:
                rows.append((r["user_id"], tuple(raw(x) for x in r["item_seq"]), raw(r["item_id"]), split))
    return rows


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("days")
    events = timestamped_events()
    times = sorted(e[2] for e in events)
    cut = {"valid_from": float(times[int(len(times) * 0.7)]), "test_from": float(times[int(len(times) * 0.85)])}
    n = len(events)
    bounds = [n * k // DAYS for k in range(DAYS + 1)]
    day_files = []
    for k in range(DAYS):
        path = str(d / f"events-day{k + 1}.parquet")
        write_events(path, events[bounds[k]:bounds[k + 1]])
        day_files.append(path)
    full_cfg = write_config(d / "all.json", day_files)
    full = str(d / "full")
    full_stats = build_examples(full_cfg, full, **cut)
    outs, stats = [], []
    for k in range(DAYS):
        cfg = write_config(d / f"day{k + 1}.json", day_files[k])
        out = str(d / f"day{k + 1}")
        if k == DAYS - 1:  # the last day as a user runs it: the CLI
            proc = subprocess.run(
                [sys.executable, "-m", "pipelines.build_examples", f"--config={cfg}", f"--output_dir={out}",
                 f"--previous={outs[-1]}", f"--valid_from={cut['valid_from']}", f"--test_from={cut['test_from']}"],
                cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
            assert proc.returncode == 0, proc.stderr
            with open(os.path.join(out, "stats.json")) as f:
                stats.append(json.load(f))
        else:
            stats.append(build_examples(cfg, out, previous=outs[-1] if outs else None, **cut))
        outs.append(out)
    return {"dir": d, "events": events, "bounds": bounds, "day_files": day_files, "cut": cut,
            "full": full, "full_stats": full_stats, "days": outs, "day_stats": stats}


def test_day_by_day_positives_equal_one_build(chain):
    full = positives_raw(chain["full"])
    assert {s: sum(1 for r in full if r[3] == s) for s in ("valid", "test")} == {
        s: chain["full_stats"]["splits"][s]["positives"] for s in ("valid", "test")}
    assert all(chain["full_stats"]["splits"][s]["positives"] > 0 for s in ("train", "valid", "test"))
    chained = [r for out in chain["days"] for r in positives_raw(out)]
    assert sorted(chained, key=repr) == sorted(full, key=repr)
    assert max(len(r[1]) for r in full) == MAX_LEN  # histories were cut, the state kept enough


def test_histories_across_days_and_equal_times(chain):
    """A known answer: the history of a user's event at the start of day 2, from day 1's state."""
    events, (b1, b2) = chain["events"], chain["bounds"][1:3]
    end = max(e[2] for e in events[:b1])
    assert events[b1][2] == end  # day 2 starts at exactly day 1's end
    user, item, t = next(e for e in events[b1:b2] if sum(1 for x in events[:b1] if x[0] == e[0]) >= 2)
    before = [x[1] for x in events[:b1 + events[b1:].index((user, item, t))] if x[0] == user and x[2] < t]
    rows = [r for r in positives_raw(chain["days"][1]) if r[0] == user and r[2] == item]
    assert [list(r[1]) for r in rows] == [before[-MAX_LEN:]]


def test_vocabularies_are_appended_never_renumbered(chain):
    orders = [read_vocab(os.path.join(out, "vocab", "item_id.txt"), "int64") for out in chain["days"]]
    for a, b in zip(orders, orders[1:]):
        assert b[:len(a)] == a
    assert len(orders[0]) < len(orders[1])  # later days brought new items
    counts = pq.read_table(os.path.join(chain["days"][-1], "state", "item_counts.parquet")).to_pylist()
    full_counts = pq.read_table(os.path.join(chain["full"], "state", "item_counts.parquet")).to_pylist()
    assert counts == full_counts  # cumulative training counts: those of one build over all days


def test_each_day_reads_only_its_file_and_the_state_continues(chain):
    for k, stats in enumerate(chain["day_stats"]):
        assert stats["files"]["events"] == [chain["day_files"][k]]
        assert stats["events_in"] == chain["bounds"][k + 1] - chain["bounds"][k]
    states = []
    for out in chain["days"] + [chain["full"]]:
        with open(os.path.join(out, "state", "state.json")) as f:
            states.append(json.load(f))
    assert [s["builds"] for s in states] == [1, 2, 3, 4, 1]
    assert [s["end_time"] for s in states[:DAYS]] == [
        float(max(e[2] for e in chain["events"][:b])) for b in chain["bounds"][1:]]
    assert states[DAYS - 1]["end_time"] == states[DAYS]["end_time"]
    assert states[0]["fingerprint"]["history.max_len"] == MAX_LEN


def test_negatives_exclude_the_users_items_of_every_day(chain):
    touched = {}
    for u, i, _ in chain["events"]:
        touched.setdefault(u, set()).add(i)
    out = chain["days"][-1]
    items = read_vocab(os.path.join(out, "vocab", "item_id.txt"), "int64")
    negatives = [(r["user_id"], items[r["item_id"] - 2]) for s in ("train", "valid", "test")
                 for r in pq.read_table(os.path.join(out, f"{s}.parquet")).to_pylist() if r["label"] == 0]
    assert negatives
    assert not [x for x in negatives if x[1] in touched[x[0]]]


# ------------------------------------------------------------------ bad input


def _refused(chain, tmp_path, message_parts, previous, output, config=None, **kw):
    prev_hash = tree_hash(previous)
    config = config or write_config(tmp_path / "day3.json", chain["day_files"][2])
    with pytest.raises(PreprocessError) as e:
        build_examples(config, output, previous=previous, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    for part in message_parts:
        assert part in msg, msg
    assert tree_hash(previous) == prev_hash
    return msg


def test_another_config_is_refused_naming_the_field(chain, tmp_path):
    cfg = write_config(tmp_path / "other.json", chain["day_files"][2], history={"max_len": 7})
    _refused(chain, tmp_path, ["`history.max_len` is 5 there and 7 here"], chain["days"][1],
             str(tmp_path / "out"), config=cfg)
    assert not os.path.exists(tmp_path / "out")


def test_previous_without_state_is_refused(chain, tmp_path):
    old = str(tmp_path / "old")
    shutil.copytree(chain["days"][0], old)
    shutil.rmtree(os.path.join(old, "state"))
    _refused(chain, tmp_path, [old, "has no state/state.json", "without --previous"], old, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_leave_last_out_cannot_continue(chain, tmp_path):
    cfg = write_config(tmp_path / "llo.json", chain["day_files"][2], split={"method": "leave_last_out"})
    _refused(chain, tmp_path, ["leave_last_out cannot continue"], chain["days"][1], str(tmp_path / "out"), config=cfg)


def test_previous_and_output_must_not_nest(chain, tmp_path):
    prev = chain["days"][1]
    _refused(chain, tmp_path, ["is the output directory or inside it"], prev, prev)
    _refused(chain, tmp_path, ["is inside --previous"], prev, os.path.join(prev, "next"))
    _refused(chain, tmp_path, ["is the output directory or inside it"], prev, str(chain["dir"]))
    assert not os.path.exists(os.path.join(prev, "next"))


def test_events_before_the_previous_end_are_refused_by_the_cli(chain, tmp_path):
    """Day 2's file again after day 3: one line naming file, row, column and both times; nothing written."""
    prev = chain["days"][2]
    prev_hash = tree_hash(prev)
    cfg = write_config(tmp_path / "late.json", chain["day_files"][1])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipelines.build_examples", f"--config={cfg}",
                           f"--output_dir={out}", f"--previous={prev}"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    events, (b1, b2, b3) = chain["events"], chain["bounds"][1:4]
    end = max(e[2] for e in events[:b3])
    row = next(r for r, e in enumerate(events[b1:b2]) if e[2] < end)
    assert proc.stderr.strip() == (
        f"build_examples: error: {chain['day_files'][1]}: row {row}, column `ts`: event time {events[b1 + row][2]} "
        f"is before the previous build's end {end}; a build continues only with events at or after it (build the "
        "earlier days again from the start instead)")
    assert tree_hash(prev) == prev_hash
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith("out.tmp-")]


def test_fingerprint_ignores_paths_and_the_run_split():
    from pipelines.logs_config import LogsConfig

    base = {"name": "a", "events": {"files": "a.parquet", "user": "u", "item": "i", "time": "t"},
            "split": {"method": "time", "valid_from": 1, "test_from": 2}}
    other = {**base, "name": "b", "events": {**base["events"], "files": "b/*.parquet"},
             "split": {"method": "time", "valid_from": 5, "test_from": 9}, "shards": 8}
    assert incremental.fingerprint(LogsConfig.from_dict(base)) == incremental.fingerprint(LogsConfig.from_dict(other))
    changed = LogsConfig.from_dict({**base, "negatives": {"seed": 3}})
    assert incremental.fingerprint(changed)["negatives.seed"] == 3


def test_the_last_days_state_equals_one_builds(chain):
    """Users without events on a day are carried over; the chain's final state is that of one build."""
    def users(out):
        sdir = os.path.join(out, "state")
        rows = [r for n in sorted(os.listdir(sdir)) if n.startswith("users-")
                for r in pq.read_table(os.path.join(sdir, n)).to_pylist()]
        return sorted(rows, key=lambda r: r["user"])

    last, full = users(chain["days"][-1]), users(chain["full"])
    assert len(full) == len({e[0] for e in chain["events"]})
    assert last == full
    assert max(len(r["hist_items"]) for r in full) >= MAX_LEN


# ------------------------------------------------------------------ a hand-made log, known answers

# u1's (c, 4) is on both days (a duplicate across builds); day 2 starts at day 1's end (4).
DAY1 = "user,item,ts\nu1,a,1\nu1,b,2\nu1,a,3\nu1,c,4\nu2,a,1\n"
DAY2 = "user,item,ts\nu1,c,4\nu1,d,4\nu2,d,4\nu3,d,4\nu1,b,5\nu3,b,6\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    (d / "day1.csv").write_text(DAY1)
    (d / "day2.csv").write_text(DAY2)
    rules = {"id_dtype": "string", "history": {"max_len": 2, "duplicates": "last"},
             "negatives": {"per_positive": 0}, "split": {"method": "time", "valid_from": 5, "test_from": 6}}

    def cfg(name, files):
        return write_config(d / f"{name}.json", files, **rules, events={
            "files": files, "format": "csv", "user": "user", "item": "item", "time": "ts"})

    out = {"full": str(d / "full"), "day1": str(d / "d1"), "day2": str(d / "d2")}
    stats = {"full": build_examples(cfg("all", ["day1.csv", "day2.csv"]), out["full"]),
             "day1": build_examples(cfg("day1", "day1.csv"), out["day1"])}
    stats["day2"] = build_examples(cfg("day2", "day2.csv"), out["day2"], previous=out["day1"])
    return out, stats


def tiny_rows(out):
    with open(os.path.join(out, DATASET_CONFIG_FILENAME)) as f:
        vocabs = json.load(f)["vocabularies"]
    users = read_vocab(os.path.join(out, vocabs["user_id"]["path"]))
    items = read_vocab(os.path.join(out, vocabs["item_id"]["path"]))
    return sorted((users[r["user_id"] - 2], [items[x - 2] for x in r["item_seq"]], items[r["item_id"] - 2], s)
                  for s in ("train", "valid", "test") for r in pq.read_table(os.path.join(out, f"{s}.parquet"))
                  .to_pylist())


def test_known_answer_across_two_builds(tiny):
    out, stats = tiny
    day2 = tiny_rows(out["day2"])
    assert day2 == [("u1", ["b", "a"], "d", "train"),  # time 4: not day 1's (c, 4); "last" keeps one a
                    ("u1", ["c", "d"], "b", "valid"),  # b a c d -> the last 2
                    ("u2", ["a"], "d", "train"),  # u2's day-1 event, from the state
                    ("u3", ["d"], "b", "test")]
    assert sorted(tiny_rows(out["day1"]) + day2) == tiny_rows(out["full"])
    assert stats["day2"]["events_dropped"] == {"duplicate_event": 1, "empty_history": 1}
    assert stats["full"]["events_dropped"] == {"duplicate_event": 1, "empty_history": 3}


def test_new_ids_are_appended_where_one_build_would_order_them_otherwise(tiny):
    out, _ = tiny
    assert read_vocab(os.path.join(out["day1"], "vocab", "item_id.txt")) == ["a", "b", "c"]
    assert read_vocab(os.path.join(out["day2"], "vocab", "item_id.txt")) == ["a", "b", "c", "d"]
    assert read_vocab(os.path.join(out["full"], "vocab", "item_id.txt")) == ["a", "d", "b", "c"]
    assert read_vocab(os.path.join(out["day2"], "vocab", "user_id.txt")) == ["u1", "u2", "u3"]
    counts = {r["item"]: r["count"] for r in pq.read_table(os.path.join(out["day2"], "state", "item_counts.parquet"))
              .to_pylist()}
    assert counts == {"a": 3, "b": 1, "c": 1, "d": 3}


def test_split_overrides_need_a_time_split(tmp_path):
    path = write_config(tmp_path / "llo.json", "none.parquet", split={"method": "leave_last_out"})
    with pytest.raises(PreprocessError, match="--valid_from / --test_from need split `time`"):
        build_examples(path, str(tmp_path / "out"), valid_from=3.0)
    path = write_config(tmp_path / "t.json", "none.parquet")
    with pytest.raises(PreprocessError, match=r"valid_from \(2000.0\) must be <= test_from \(1000\)"):
        build_examples(path, str(tmp_path / "out"), valid_from=2000.0)
    assert not (tmp_path / "out").exists()


def test_a_log_without_time_writes_its_order_as_the_state(tmp_path):
    """The bundled sample's MicroLens lines (no time column): the state's end is the build count."""
    out = str(tmp_path / "out")
    build_examples(os.path.join(REPO, "configs", "logs", "microlens_sample.json"), out)
    with open(os.path.join(out, "state", "state.json")) as f:
        state = json.load(f)
    assert (state["end_time"], state["builds"], state["fingerprint"]["split.method"]) == (None, 1, "leave_last_out")
    sdir = os.path.join(out, "state")
    rows = {r["user"]: r for n in os.listdir(sdir) if n.startswith("users-")
            for r in pq.read_table(os.path.join(sdir, n)).to_pylist()}
    with open(RAW_EVENTS) as f:
        lines = [line.rstrip("\n").split("\t") for line in f]
    assert len(rows) == len(lines)
    for user, items in lines:
        items = [int(x) for x in items.split()]
        r = rows[int(user)]
        assert r["hist_items"] == items[-100:] and r["items"] == sorted(set(items))
        assert (r["last_time"], r["last_items"]) == (None, [])
