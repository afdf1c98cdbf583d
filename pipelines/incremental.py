"""The state one :mod:`pipelines.build_examples` run leaves for the next: read, write, check, extend.

Every build writes ``state/`` into its output::

    state/state.json             {"format": 1, "fingerprint": {...}, "end_time": T or null, "builds": n}
    state/users-00000.parquet    per user (sharded by user): user, hist_items, hist_times,
                                 items, last_time, last_items
    state/item_counts.parquet    item, count: cumulative training-period counts (every item seen, not
                                 only those in the vocabulary: a rare item may qualify later)
    state/context_counts.parquet name, value, count: the same for the categorical context columns

* ``fingerprint``: the log config's rules, everything that shapes examples
  (:func:`fingerprint`; not the file paths, the name, the shards or the
  per-run ``valid_from`` / ``test_from``).
* ``end_time``: the largest event time so far (null for a log without a
  time column: there, ``builds`` is the order, every event of a later build
  comes after every event of an earlier one).
* A user's ``hist_items`` / ``hist_times``: the entries the history rule
  keeps, oldest first: the last ``history.max_len`` of those before the
  user's last time (after ``history.duplicates: last``'s deduplication),
  plus every entry at the user's last time (an event of the next build at
  exactly that time must not see them, and a repeat of one is a duplicate).
  ``items``: every item the user touched in the whole log so far (the
  negatives exclude them). ``last_time`` / ``last_items``: the user's last
  event time and the items at it (the duplicate rule across builds).
* The vocabularies' order is the build's ``vocab/*.txt`` (named by its
  ``dataset_config.json``); a later build appends to it (:func:`appended`).

A build with ``previous`` reads only its own events plus this state: the
user states are joined by user (``CoGroupByKey``) with the new events, the
counts are added to the new training-period counts by the same combiners.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import beamio
from pipelines.beamio import beam  # imported quietly
from qin_tf.rows import PreprocessError, where

STATE_DIR = "state"
STATE_FILE = "state.json"
USERS_PREFIX = "users-"
ITEM_COUNTS = "item_counts.parquet"
CONTEXT_COUNTS = "context_counts.parquet"
LATE_FILE = "_late.json"
FORMAT = 1


# --------------------------------------------------------------------------
# The rules fingerprint and the checks before a build (launching process)
# --------------------------------------------------------------------------


def fingerprint(cfg) -> dict:
    """The config's fields that shape examples, flat (``"history.max_len": 100``), as JSON values."""
    ev = cfg.events
    fp = {
        "events.user": ev.user, "events.item": ev.item, "events.time": ev.time,
        "events.label": dataclasses.asdict(ev.label) if ev.label else None,
        "events.context": [dataclasses.asdict(c) for c in ev.context],
        "catalog": cfg.catalog is not None,
        "catalog.item": cfg.catalog.item if cfg.catalog else None,
        "catalog.tags": dataclasses.asdict(cfg.catalog.tags) if cfg.catalog and cfg.catalog.tags else None,
        "catalog.vector.column": cfg.catalog.vector.column if cfg.catalog and cfg.catalog.vector else None,
        "users.user": cfg.users.user if cfg.users else None,
        "users.context": [dataclasses.asdict(c) for c in cfg.users.context] if cfg.users else None,
        "id_dtype": cfg.id_dtype, "unknown_items": cfg.unknown_items,
        "item_min_count": cfg.item_min_count, "context_min_count": cfg.context_min_count,
        "popularity_level": cfg.popularity_level,
        "history.events": cfg.history_events, "history.max_len": cfg.history_max_len,
        "history.duplicates": cfg.history_duplicates, "history.min_len": cfg.history_min_len,
        "negatives.per_positive": cfg.negatives_per_positive, "negatives.sampling": cfg.negative_sampling,
        "negatives.seed": cfg.seed, "split.method": cfg.split, "max_len": cfg.max_len,
    }
    return json.loads(json.dumps(fp))


def _real(path: str) -> str:
    path = path.rstrip("/") or path
    return os.path.realpath(path) if beamio.is_local(path) else path


def _inside(a: str, b: str) -> bool:
    """``a`` is ``b`` or lies under it."""
    sep = os.sep if beamio.is_local(a) else "/"
    return a == b or a.startswith(b.rstrip(sep) + sep)


def prepare(cfg, output_dir: str, previous: str | None, valid_from=None, test_from=None):
    """The config with the run's split overrides, and the previous build's ``state.json`` (None without one).

    Raises :class:`PreprocessError` (one line) for a previous build that
    cannot be continued: missing, without ``state/``, of another config, or
    where the output would land in it (or it in the output); and for a
    ``leave_last_out`` config with ``previous`` (a user's last event is not
    known before the log ends).
    """
    if valid_from is not None or test_from is not None:
        if cfg.split != "time":
            raise PreprocessError(f"{cfg.path}: --valid_from / --test_from need split `time` "
                                  f"(the config's split is `{cfg.split}`)")
        vf = cfg.valid_from if valid_from is None else valid_from
        tf = cfg.test_from if test_from is None else test_from
        if vf > tf:
            raise PreprocessError(f"{cfg.path}: valid_from ({vf}) must be <= test_from ({tf})")
        cfg = dataclasses.replace(cfg, valid_from=vf, test_from=tf)
    if previous is None:
        return cfg, None
    prev = previous.rstrip("/") or previous
    if cfg.split == "leave_last_out":
        raise PreprocessError(f"{cfg.path}: --previous needs split `time`: leave_last_out cannot continue "
                              "across builds (a user's last event is not known before the log ends)")
    out, real_prev = _real(output_dir), _real(prev)
    if _inside(real_prev, out):
        raise PreprocessError(f"{prev}: --previous is the output directory or inside it ({output_dir}); "
                              "write the new build elsewhere")
    if _inside(out, real_prev):
        raise PreprocessError(f"{output_dir}: the output directory is inside --previous ({prev}); "
                              "write the new build elsewhere")
    if not beamio.exists(prev):
        raise PreprocessError(f"{prev}: --previous does not exist")
    path = beamio.join(prev, STATE_DIR, STATE_FILE)
    if not beamio.exists(path):
        raise PreprocessError(f"{prev}: --previous has no {STATE_DIR}/{STATE_FILE} (built before incremental "
                              "builds, or not a build_examples output); build it again without --previous "
                              "to start a chain")
    try:
        state = json.loads(beamio.read_text(path))
        fp = state["fingerprint"]
    except (ValueError, KeyError, TypeError) as e:
        raise PreprocessError(f"{path}: not a build state ({e})") from None
    if state.get("format") != FORMAT:
        raise PreprocessError(f"{path}: state format {state.get('format')!r}, this build reads {FORMAT}")
    now = fingerprint(cfg)
    for key in sorted(set(fp) | set(now)):
        if fp.get(key) != now.get(key):
            raise PreprocessError(f"{prev}: --previous was built with another log config: `{key}` is "
                                  f"{json.dumps(fp.get(key))} there and {json.dumps(now.get(key))} here "
                                  f"({cfg.path}); a chain of builds keeps the rules")
    state["dir"] = prev
    return cfg, state


def raise_late(work_dir: str, resume: dict | None):
    """Raises the first event older than the previous build's end (as the pipeline recorded it), if any."""
    path = beamio.join(work_dir, LATE_FILE)
    if resume is not None and beamio.exists(path):
        e = json.loads(beamio.read_text(path))
        raise PreprocessError(e["message"], file=e["file"], row=e["row"], column=e["column"], reason=e["reason"])


# --------------------------------------------------------------------------
# Per user (in workers)
# --------------------------------------------------------------------------


def _fmt_time(t: float) -> str:
    return f"{t:.0f}" if float(t).is_integer() else f"{t!r}"


def late_event(events: list, end: float | None, files: dict, column: str):
    """The bad-row record of the first event (in ``events``' order) before ``end``, or None."""
    if end is None:
        return None
    for e in events:
        if e[0] < end:
            path = files[e[1]]
            return {"order": [e[1], e[2]], "file": path, "row": e[2], "column": column, "reason": "before_previous_end",
                    "message": f"{where(path, e[2], column)}: event time {_fmt_time(e[0])} is before the previous "
                               f"build's end {_fmt_time(end)}; a build continues only with events at or after "
                               "it (build the earlier days again from the start instead)"}
    return None


def previous_of(groups) -> dict | None:
    """The user's state from the previous build (None: a new user, or no previous build)."""
    found = list(groups.get("state", ()))
    return found[0] if found else None


def seen_at_end(prev: dict | None) -> set:
    """``{(item, time)}`` of the user's events at its last time: a repeat in this build is a duplicate."""
    if prev is None or prev["last_time"] is None:
        return set()
    return {(x, prev["last_time"]) for x in prev["last_items"]}


def earlier(prev: dict | None, t: float, timed: bool) -> list:
    """The previous build's kept history items strictly before ``t`` (all of them for a log without time)."""
    if prev is None:
        return []
    if not timed:
        return list(prev["hist_items"])
    return [x for x, ht in zip(prev["hist_items"], prev["hist_times"]) if ht < t]


def all_items(prev: dict | None, events: list) -> set:
    """Every item the user touched, over all builds."""
    return {e[4] for e in events} | set(prev["items"] if prev else ())


def next_state(cfg, prev: dict | None, in_history: list, events: list) -> dict:
    """The user's state after this build's events (``in_history``: those the history rule takes)."""
    timed = bool(cfg.events.time)
    entries = list(zip(prev["hist_items"], prev["hist_times"])) if prev else []
    entries += [(e[4], e[0] if timed else 0.0) for e in in_history]
    last = max((t for _, t in entries), default=None) if timed else None
    head = [x for x in entries if not timed or x[1] < last]
    tail = [x for x in entries if timed and x[1] == last]
    if cfg.history_duplicates == "last":
        kept: dict = {}
        for x, t in head:
            kept.pop(x, None)
            kept[x] = t
        head = list(kept.items())
    head = head[-cfg.history_max_len:]
    last_time = max(e[0] for e in events) if timed and events else None
    last_items = sorted({e[4] for e in events if e[0] == last_time}, key=_sort_key) if last_time is not None else []
    if prev is not None and prev["last_time"] is not None:
        if last_time is None or prev["last_time"] > last_time:
            last_time, last_items = prev["last_time"], list(prev["last_items"])
        elif prev["last_time"] == last_time:
            last_items = sorted(set(last_items) | set(prev["last_items"]), key=_sort_key)
    return {"hist_items": [x for x, _ in head + tail], "hist_times": [float(t) for _, t in head + tail],
            "items": sorted(all_items(prev, events), key=_sort_key), "last_time": last_time,
            "last_items": last_items}


def _sort_key(x):
    return (0, x, "") if isinstance(x, int) else (1, 0, str(x))


# --------------------------------------------------------------------------
# Reading and writing the state (Beam steps)
# --------------------------------------------------------------------------


def _users_schema(id_dtype: str) -> pa.Schema:
    t = pa.int64() if id_dtype == "int64" else pa.string()
    return pa.schema([pa.field("user", t), pa.field("hist_items", pa.list_(t)),
                      pa.field("hist_times", pa.list_(pa.float64())), pa.field("items", pa.list_(t)),
                      pa.field("last_time", pa.float64()), pa.field("last_items", pa.list_(t))])


class ReadUserStates(beam.DoFn):
    """A ``state/users-*.parquet`` path -> (user, state) per row, streamed in batches."""

    def process(self, path):
        pf = pq.ParquetFile(path if beamio.is_local(path) else beamio.open_read(path))
        for batch in pf.iter_batches(batch_size=8192, use_threads=False):
            for r in batch.to_pylist():
                yield r.pop("user"), r


def read_user_states(p, resume: dict | None):
    """The previous build's user states as ``(user, state)`` (empty without a previous build)."""
    if resume is None:
        return p | "NoState" >> beam.Create([])
    sdir = beamio.join(resume["dir"], STATE_DIR)
    files = [beamio.join(sdir, n) for n in beamio.list_dir(sdir, USERS_PREFIX)]
    return p | "StateFiles" >> beam.Create(files) | "ReadState" >> beam.ParDo(ReadUserStates())


class WriteUserStates(beam.DoFn):
    """(shard, [(user, state)...]) -> ``state/users-{shard}.parquet``, rows by user; yields the shard's end."""

    def __init__(self, id_dtype: str, work_dir: str):
        self.id_dtype, self.work_dir = id_dtype, work_dir

    def process(self, element):
        shard, rows = element
        rows = sorted(rows, key=lambda kv: _sort_key(kv[0]))
        table = pa.Table.from_pylist([{"user": u, **s} for u, s in rows], schema=_users_schema(self.id_dtype))
        path = beamio.join(self.work_dir, STATE_DIR, f"{USERS_PREFIX}{shard:05d}.parquet")
        with beamio.create(path) as f:
            pq.write_table(table, f, compression="zstd")
        yield max((s["last_time"] for _, s in rows if s["last_time"] is not None), default=None)


def _read_counts(path: str):
    if not beamio.exists(path):
        return []
    return pq.read_table(path if beamio.is_local(path) else beamio.open_read(path)).to_pylist()


def previous_item_counts(p, resume: dict | None):
    """``(item, count)`` of the previous build's cumulative training-period counts."""
    paths = [] if resume is None else [beamio.join(resume["dir"], STATE_DIR, ITEM_COUNTS)]
    return (p | "PrevItemCountFile" >> beam.Create(paths)
            | "PrevItemCounts" >> beam.FlatMap(lambda path: [(r["item"], r["count"]) for r in _read_counts(path)]))


def previous_context_counts(p, resume: dict | None):
    """``((name, value), count)`` of the previous build's cumulative training-period context counts."""
    paths = [] if resume is None else [beamio.join(resume["dir"], STATE_DIR, CONTEXT_COUNTS)]
    return (p | "PrevCtxCountFile" >> beam.Create(paths)
            | "PrevCtxCounts" >> beam.FlatMap(
                lambda path: [((r["name"], r["value"]), r["count"]) for r in _read_counts(path)]))


def read_vocabularies(resume: dict | None) -> dict | None:
    """``{vocabulary name: raw ids in order}`` of the previous build (its ``dataset_config.json``'s files)."""
    if resume is None:
        return None
    from pipelines.build_examples import DATASET_CONFIG_FILENAME
    from pipelines.vocabularies import read_vocab

    cfg_path = beamio.join(resume["dir"], DATASET_CONFIG_FILENAME)
    try:
        vocabs = json.loads(beamio.read_text(cfg_path))["vocabularies"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PreprocessError(f"{cfg_path}: cannot read the previous build's vocabularies ({e})") from None
    return {name: read_vocab(beamio.join(resume["dir"], v["path"]), v["dtype"]) for name, v in vocabs.items()}


def appended(previous: list | None, fresh: list) -> list:
    """``previous`` then the ids of ``fresh`` (already in their order) it lacks: ids are never renumbered."""
    if previous is None:
        return list(fresh)
    have = set(previous)
    return list(previous) + [x for x in fresh if x not in have]


def write_state(p, cfg, resume: dict | None, work_dir: str, user_states, item_counts, ctx_counts, shard_of):
    """The Beam steps that write ``state/``: user states by shard, cumulative counts, then ``state.json``.

    ``item_counts`` / ``ctx_counts``: the singleton lists of the cumulative
    ``(key, count)``; ``shard_of(user, shards)`` spreads the users.
    """
    beamio.makedirs(beamio.join(work_dir, STATE_DIR))
    t = pa.int64() if cfg.id_dtype == "int64" else pa.string()

    def write_items(counts):
        rows = sorted(counts, key=lambda kv: _sort_key(kv[0]))
        table = pa.table({"item": pa.array([k for k, _ in rows], t),
                          "count": pa.array([n for _, n in rows], pa.int64())})
        with beamio.create(beamio.join(work_dir, STATE_DIR, ITEM_COUNTS)) as f:
            pq.write_table(table, f)
        return True

    def write_ctx(counts):
        rows = sorted(counts)
        table = pa.table({"name": pa.array([k[0] for k, _ in rows], pa.string()),
                          "value": pa.array([k[1] for k, _ in rows], pa.string()),
                          "count": pa.array([n for _, n in rows], pa.int64())})
        with beamio.create(beamio.join(work_dir, STATE_DIR, CONTEXT_COUNTS)) as f:
            pq.write_table(table, f)
        return True

    ends = (user_states | "StateShard" >> beam.Map(lambda kv: (shard_of(kv[0], cfg.shards), kv))
            | "GroupState" >> beam.GroupByKey()
            | "WriteState" >> beam.ParDo(WriteUserStates(cfg.id_dtype, work_dir))
            | "StateEnd" >> beam.CombineGlobally(lambda xs: max((x for x in xs if x is not None), default=None)))
    done_items = item_counts | "WriteItemCounts" >> beam.Map(write_items)
    done_ctx = ctx_counts | "WriteCtxCounts" >> beam.Map(write_ctx)
    prev_end = resume.get("end_time") if resume else None
    builds = (resume.get("builds", 0) if resume else 0) + 1

    def write_json(_, end, a, b):
        if prev_end is not None:
            end = prev_end if end is None else max(end, prev_end)
        state = {"format": FORMAT, "fingerprint": fingerprint(cfg), "end_time": end, "builds": builds,
                 "previous": resume["dir"] if resume else None}
        beamio.write_text(beamio.join(work_dir, STATE_DIR, STATE_FILE), json.dumps(state, indent=2) + "\n")

    _ = (p | "StateTrigger" >> beam.Create([None])
         | "WriteStateJson" >> beam.Map(write_json, end=beam.pvalue.AsSingleton(ends),
                                        a=beam.pvalue.AsSingleton(done_items), b=beam.pvalue.AsSingleton(done_ctx)))
