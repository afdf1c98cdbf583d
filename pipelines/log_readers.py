"""Reading the raw logs of :mod:`pipelines.build_examples`: event files, the catalog, the user table.

Beam ``DoFn``s that run in workers, one file at a time, and read rows through
Beam's ``FileSystems`` (:mod:`pipelines.beamio`):

* :class:`ReadEvents`: an event file -> ``(user, event)``; bad rows on the
  ``bad`` output, counts on ``stats``.
* :class:`ReadTable`: a catalog, vector or user file -> ``(key, values)``.
* :class:`JoinCatalog`: an item's catalog rows and vector rows -> its raw tags
  and vector (one row per item, else a bad row).
* :func:`read_catalog`: the same readers in the launching process, for small
  catalogs and the tools that refresh an export.

Values are checked as they are read (:func:`parse_id` applies
:data:`qin_tf.spec.RAW_ID_RULE`); a bad value raises :class:`BadValue`, which
the reader turns into a bad-row record (:func:`bad_record`) naming file, row
and column. The rules themselves are documented in :mod:`pipelines.build_examples`.
"""

from __future__ import annotations

import bisect
import csv
import datetime
import json
from collections import Counter
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from pipelines import beamio
from pipelines.beamio import beam  # imported quietly
from pipelines.logs_config import LogsConfig, Source
from qin_tf.rows import PreprocessError, where
from qin_tf.spec import RAW_ID_RULE, raw_id_problem

# --------------------------------------------------------------------------
# Reading rows (in workers)
# --------------------------------------------------------------------------


class BadValue(Exception):
    def __init__(self, column, reason, text):
        super().__init__(text)
        self.column, self.reason, self.text = column, reason, text


class _FileError(BadValue):
    """The file's fault, not a row's (bytes that are not UTF-8): an error whatever ``on_bad_row`` says."""

    def __init__(self, column, reason, text, row):
        super().__init__(column, reason, text)
        self.row = row


def bad_record(path, fidx, row, column, reason, text, fatal=False):
    out = {"order": [fidx, -1 if row is None else row], "file": path, "row": row, "column": column,
           "reason": reason, "message": f"{where(path, row, column)}: {text}"}
    return {**out, "fatal": True} if fatal else out


class _Lines:
    """The lines of a binary text file, decoded as UTF-8; the first line that is not UTF-8 is remembered.

    Such a line is still yielded (its bad bytes as surrogate escapes) so that the
    reader can say which row and column hold them; it then stops with
    :func:`_not_utf8`. Bytes that do not decode are the file's fault, not a
    row's: an error whatever ``on_bad_row`` says (as in :mod:`pipelines.preprocess`).
    """

    def __init__(self, raw):
        self.raw, self.bad = raw, None

    def __iter__(self):
        for n, b in enumerate(self.raw):
            try:
                yield b.decode("utf-8")
            except UnicodeDecodeError as e:
                if self.bad is None:
                    self.bad = (n, f"byte 0x{b[e.start]:02x} at offset {e.start} of line {n + 1}")
                yield b.decode("utf-8", "surrogateescape")


def _has_bad_bytes(value) -> bool:
    return isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value)


def _not_utf8(path: str, row, values: dict | None, lines: _Lines):
    """Stops reading a file that is not UTF-8, naming its row, the column holding the bytes and the byte."""
    column = next((c for c, v in (values or {}).items() if _has_bad_bytes(v)), None)
    raise _FileError(column, "not_utf8", f"not UTF-8 text ({lines.bad[1]})", row)


def read_rows(path: str, src: Source, columns: list[str]) -> Iterator[tuple[int, dict]]:
    """Yields ``(0-based row, {column: value})``; raises BadValue(column, 'missing_column') for a missing column."""
    if src.format == "parquet":
        pf = pq.ParquetFile(path if beamio.is_local(path) else beamio.open_read(path))
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise BadValue(missing[0], "missing_column", f"no such column (the file has {pf.schema_arrow.names})")
        row = 0
        for batch in pf.iter_batches(batch_size=8192, columns=columns, use_threads=False):
            cols = {c: batch.column(c).to_pylist() for c in columns}
            for i in range(batch.num_rows):
                yield row + i, {c: cols[c][i] for c in columns}
            row += batch.num_rows
        return
    with beamio.open_read(path) as raw:
        text = _Lines(raw)
        if src.format == "jsonl":
            for row, line in enumerate(text):
                if text.bad is not None:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        obj = None
                    _not_utf8(path, row, obj if isinstance(obj, dict) else None, text)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield row, BadValue(None, "unparseable_row", f"not a JSON object: {e}")
                    continue
                yield row, {c: obj.get(c) if isinstance(obj, dict) else None for c in columns}
            return
        reader = csv.reader(text, delimiter=src.delimiter)
        names = next(reader, None) if src.header else None
        if text.bad is not None:
            raise _FileError(None, "not_utf8", f"the header is not UTF-8 text ({text.bad[1]})", None)
        if src.header:
            names = names or []
            missing = [c for c in columns if c not in names]
            if missing:
                raise BadValue(missing[0], "missing_column", f"no such column (the header has {names})")
            index = {c: names.index(c) for c in columns}
        else:
            index = {c: int(c) for c in columns}
        for row, fields in enumerate(reader):
            if text.bad is not None:
                _not_utf8(path, row, dict(zip(names, fields)) if names else
                          {str(i): f for i, f in enumerate(fields)}, text)
            if not fields:
                continue
            yield row, {c: (fields[i] if i < len(fields) and fields[i] != "" else None) for c, i in index.items()}


#: The reason (``stats.json``'s ``bad_rows`` key) of an id, tag or context value that breaks
#: :data:`qin_tf.spec.RAW_ID_RULE`.
BAD_RAW_ID = "bad_raw_id"


def _check_raw(value, column: str):
    """``value`` if it keeps the raw-id rule (a vocabulary file round-trips it), else a bad row."""
    why = raw_id_problem(value)
    if why is not None:
        raise BadValue(column, BAD_RAW_ID, f"{why}; {RAW_ID_RULE}")
    return value


def parse_id(value, dtype: str, column: str):
    """A raw user or item id: an int (``dtype`` int64) or a str, kept only if it keeps the raw-id rule."""
    if value is None or (isinstance(value, float) and value != value):
        raise BadValue(column, "null", "null value")
    if dtype == "string":
        return _check_raw(str(value), column)
    if isinstance(value, bool):
        raise BadValue(column, "unparseable_id", f"not an int64 id: {value!r}")
    if isinstance(value, int):
        return _check_raw(value, column)
    try:
        if isinstance(value, float) and value.is_integer():
            return _check_raw(int(value), column)
        v = int(str(value).strip())
    except (ValueError, OverflowError):
        raise BadValue(column, "unparseable_id", f"not an int64 id: {value!r} (set \"id_dtype\": \"string\" "
                                             "for string ids)") from None
    return _check_raw(v, column)


def _parse_time(value, column: str) -> float:
    """Seconds (a finite float): from a number, a datetime or an ISO 8601 string; else a bad row.

    ``nan`` and ``inf`` (as numbers or as text) are bad rows (``non_finite_time``): they
    cannot be ordered, so such an event would land in other events' histories.
    """
    if value is None:
        raise BadValue(column, "null", "null value")
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return _finite_time(float(value), value, column)
        except OverflowError:  # an int beyond a float
            raise BadValue(column, "non_finite_time", f"time {value!r} is not a finite number") from None
    s = str(value).strip()
    try:
        return _finite_time(float(s), value, column)
    except (ValueError, OverflowError):
        pass
    try:
        t = datetime.datetime.fromisoformat(s)
    except ValueError:
        raise BadValue(column, "unparseable_time", f"unparseable time {value!r} (a number or an ISO 8601 "
                                               "date-time)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


def _finite_time(t: float, value, column: str) -> float:
    if t != t or t in (float("inf"), float("-inf")):
        raise BadValue(column, "non_finite_time", f"time {value!r} is not a finite number")
    return t


_OPS = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b,
        "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


def _parse_label(value, rule) -> int:
    if value is None or (isinstance(value, float) and value != value):
        raise BadValue(rule.column, "null", "null value")
    if rule.binary:
        v = str(value).strip().lower()
        if v in ("1", "true", "1.0"):
            return 1
        if v in ("0", "false", "0.0"):
            return 0
        raise BadValue(rule.column, "bad_label", f"label must be 0 or 1, got {value!r}")
    try:
        x = float(value) if isinstance(rule.value, (int, float)) else str(value)
    except ValueError:
        raise BadValue(rule.column, "bad_label", f"not a number: {value!r}") from None
    return int(_OPS[rule.op](x, rule.value))


def context_value(value, c) -> str | None:
    """A context value as its raw string (None: missing); bucketed columns give the bucket index."""
    if value is None or (isinstance(value, float) and value != value) or value == "":
        return None
    if c.buckets is not None:
        try:
            x = float(value)
        except ValueError:
            raise BadValue(c.column, "unparseable_value", f"not a number for the buckets: {value!r}") from None
        return str(bisect.bisect_right(c.buckets, x))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return _check_raw(str(value), c.column)  # a line of vocab/<context>.txt


class ReadEvents(beam.DoFn):
    """(file index, path) -> (user, [event, ...]) per batch of rows; bad rows and counts on side outputs.

    An event is ``(t, file, row, pos, item, label, (context values...))``.
    """

    BATCH = 4096

    def __init__(self, cfg: LogsConfig):
        self.cfg = cfg

    def process(self, element):
        fidx, path = element
        cfg, ev = self.cfg, self.cfg.events
        pending: dict[Any, list] = {}
        n_in = 0
        bad_counts: Counter = Counter()

        def bad(row, column, reason, text):
            bad_counts[reason] += 1
            return beam.pvalue.TaggedOutput("bad", bad_record(path, fidx, row, column, reason, text))

        try:
            if ev.source.format == "sequences":
                rows = self._sequence_rows(path)
            else:
                cols = [ev.user, ev.item] + ([ev.time] if ev.time else []) \
                    + ([ev.label.column] if ev.label else []) + [c.column for c in ev.context]
                rows = read_rows(path, ev.source, list(dict.fromkeys(cols)))
            for row, values in rows:
                if isinstance(values, BadValue):
                    n_in += 1
                    yield bad(row, values.column, values.reason, values.text)
                    continue
                for pos, v in (values if isinstance(values, list) else [(0, values)]):
                    n_in += 1
                    try:
                        user = parse_id(v[ev.user], cfg.id_dtype, ev.user)
                        item = parse_id(v[ev.item], cfg.id_dtype, ev.item)
                        t = _parse_time(v[ev.time], ev.time) if ev.time else 0.0
                        label = _parse_label(v[ev.label.column], ev.label) if ev.label else 1
                        ctx = tuple(context_value(v[c.column], c) for c in ev.context)
                    except BadValue as b:
                        yield bad(row, b.column, b.reason, b.text)
                        continue
                    pending.setdefault(user, []).append((t, fidx, row, pos, item, label, ctx))
                if len(pending) >= self.BATCH:
                    yield from pending.items()
                    pending = {}
        except BadValue as b:  # schema-level (a missing column) or the file's bytes
            bad_counts[b.reason] += 1
            yield beam.pvalue.TaggedOutput("bad", bad_record(path, fidx, getattr(b, "row", None), b.column,
                                                              b.reason, b.text, fatal=isinstance(b, _FileError)))
        yield from pending.items()
        yield beam.pvalue.TaggedOutput("stats", {"events_in": n_in, "events_bad": dict(bad_counts)})

    def _sequence_rows(self, path):
        ev = self.cfg.events
        with beamio.open_read(path) as raw:
            lines = _Lines(raw)
            for row, line in enumerate(lines):
                line = line.rstrip("\r\n")
                if lines.bad is not None:
                    user, _, rest = line.partition(ev.source.delimiter)
                    _not_utf8(path, row, {ev.user: user, ev.item: rest}, lines)
                if not line.strip():
                    continue
                user, sep, rest = line.partition(ev.source.delimiter)
                items = rest.split(ev.source.item_delimiter) if ev.source.item_delimiter.strip() else rest.split()
                items = [x for x in items if x.strip()]
                if not items:  # a user line without items: one bad event (no item)
                    yield row, [(0, {ev.user: user or None, ev.item: None})]
                    continue
                yield row, [(pos, {ev.user: user or None, ev.item: x}) for pos, x in enumerate(items)]


def _is_padding_row(key_value, values: dict, key: str) -> bool:
    """Whether a catalog or vector-file row is an item table's padding row: id 0 and nothing else in it
    (no tags, an all-zero vector), as the challenge layout's ``item_info.parquet`` has."""
    def empty(v):
        if isinstance(v, (list, tuple)):
            return all(empty(x) for x in v)
        return v is None or v == "" or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0)

    return (isinstance(key_value, (int, str)) and not isinstance(key_value, bool) and str(key_value).strip() == "0"
            and all(empty(v) for c, v in values.items() if c != key))


class ReadTable(beam.DoFn):
    """(file index, path) -> (key, (file, row, values)) for the catalog, the vector file or the user table.

    Item tables (``what`` catalog or vector_file) may hold the challenge layout's
    padding row (item id 0, no tags, an all-zero vector): it is no item and is
    skipped. Any other id 0 breaks the raw-id rule (a bad row).
    """

    def __init__(self, src: Source, key: str, columns: list[str], id_dtype: str, what: str):
        self.src, self.key, self.columns, self.id_dtype, self.what = src, key, columns, id_dtype, what

    def process(self, element):
        fidx, path = element
        n = 0
        try:
            for row, values in read_rows(path, self.src, list(dict.fromkeys([self.key, *self.columns]))):
                n += 1
                if isinstance(values, BadValue):
                    yield beam.pvalue.TaggedOutput("bad", bad_record(path, fidx, row, values.column,
                                                                      values.reason, values.text))
                    continue
                try:
                    key = parse_id(values[self.key], self.id_dtype, self.key)
                except BadValue as b:
                    if b.reason == BAD_RAW_ID and self.what in ("catalog", "vector_file") \
                            and self.id_dtype == "int64" and _is_padding_row(values[self.key], values, self.key):
                        continue
                    yield beam.pvalue.TaggedOutput("bad", bad_record(path, fidx, row, b.column, b.reason, b.text))
                    continue
                yield key, (path, fidx, row, values)
        except BadValue as b:  # schema-level (a missing column) or the file's bytes
            yield beam.pvalue.TaggedOutput("bad", bad_record(path, fidx, getattr(b, "row", None), b.column,
                                                              b.reason, b.text, fatal=isinstance(b, _FileError)))
        yield beam.pvalue.TaggedOutput("stats", {f"{self.what}_rows_in": n})


def _tags_of(value, t) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        parts = [str(x) for x in value if x is not None]
    elif t.hashtags:
        parts = str(value).split("#")[1:]
    elif t.delimiter:
        parts = str(value).split(t.delimiter)
    else:
        parts = [str(value)]
    parts = [p.strip().lower() if t.lowercase else p.strip() for p in parts]
    return list(dict.fromkeys(p for p in parts if p))


class JoinCatalog(beam.DoFn):
    """(item, {catalog: rows, vector: rows}) -> (item, (tags, vector)); duplicates are bad rows.

    A tag that breaks the raw-id rule (it would break ``vocab/tags.txt``) and a
    vector that is not a list of finite floats are bad rows (the item keeps the
    rest of its row). ``located``: the value is ``(tags, vector, where)``, with
    ``where`` the vector's file, row and column (to name it if widths differ).
    """

    def __init__(self, cfg: LogsConfig, located: bool = False):
        self.cfg, self.located = cfg, located

    def process(self, element):
        yield from self._process(element)

    def _process(self, element):
        item, groups = element
        cat = self.cfg.catalog
        rows = sorted(groups["catalog"], key=lambda r: (r[1], r[2]))
        vecs = sorted(groups["vector"], key=lambda r: (r[1], r[2]))
        for kind, found, col in (("catalog", rows, cat.item), ("vector", vecs, cat.vector and cat.vector.item)):
            for path, fidx, row, _ in found[1:]:
                yield beam.pvalue.TaggedOutput("bad", bad_record(
                    path, fidx, row, col, "duplicate_catalog_row",
                    f"duplicate item id {item!r} (also at row {found[0][2]} of {found[0][0]})"))
        if not rows:
            return
        path, fidx, row, values = rows[0]
        tags = _tags_of(values.get(cat.tags.column), cat.tags) if cat.tags else []
        for t in tags:
            why = raw_id_problem(t)
            if why is not None:
                yield beam.pvalue.TaggedOutput("bad", bad_record(path, fidx, row, cat.tags.column, BAD_RAW_ID,
                                                                  f"tag {why}; {RAW_ID_RULE}"))
        tags = [t for t in tags if raw_id_problem(t) is None]
        vec, at = None, None
        if cat.vector is not None:
            vrow = vecs[0] if cat.vector.source is not None and vecs else (None if cat.vector.source else rows[0])
            if vrow is not None:
                raw = vrow[3].get(cat.vector.column)
                if raw is not None:
                    try:
                        vec = np.asarray(json.loads(raw) if isinstance(raw, str) else raw, dtype=np.float32)
                        problem = None if vec.ndim == 1 and vec.size and np.isfinite(vec).all() else \
                            f"the vector must be a non-empty list of finite floats (got {_short(raw)})"
                    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
                        problem = f"the vector must be a JSON list of finite floats: {_short(raw)} ({e})"
                    if problem is not None:
                        yield beam.pvalue.TaggedOutput("bad", bad_record(
                            vrow[0], vrow[1], vrow[2], cat.vector.column, "bad_vector", problem))
                        vec = None
                    at = where(vrow[0], vrow[2], cat.vector.column)
        yield item, ((tags, vec, at) if self.located else (tags, vec))


def _short(value, n: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= n else r[:n] + "..."


def read_catalog(cfg: LogsConfig) -> dict:
    """The catalog of ``cfg`` read in this process, by the pipeline's own readers: ``{raw item: (tags, vector)}``.

    ``tags`` are the item's raw tags (the config's parsing rules), ``vector``
    a float32 array or None. For small catalogs and tools that refresh an
    export (``export.refresh_catalog``); the first bad row (a duplicate item,
    a bad vector, a null id, a missing column) raises :class:`PreprocessError`
    naming file, row and column, whatever ``on_bad_row`` says.
    """
    if cfg.catalog is None:
        raise PreprocessError("the log config has no `catalog` section")
    cat = cfg.catalog

    def rows(src, key, columns, what):
        out, reader = {}, ReadTable(src, key, columns, cfg.id_dtype, what)
        for fidx, path in enumerate(match_files(src, what)):
            for x in reader.process((fidx, path)):
                if isinstance(x, beam.pvalue.TaggedOutput):
                    if x.tag == "bad":
                        raise PreprocessError(x.value["message"])
                    continue
                out.setdefault(x[0], []).append(x[1])
        return out

    cols = [cat.tags.column] if cat.tags else []
    cols += [cat.vector.column] if cat.vector and not cat.vector.source else []
    catalog = rows(cat.source, cat.item, cols, "catalog")
    vectors = (rows(cat.vector.source, cat.vector.item, [cat.vector.column], "vector_file")
               if cat.vector is not None and cat.vector.source is not None else {})
    join, out = JoinCatalog(cfg), {}
    for item in sorted(catalog, key=raw_key):
        for x in join.process((item, {"catalog": catalog[item], "vector": vectors.get(item, [])})):
            if isinstance(x, beam.pvalue.TaggedOutput):
                raise PreprocessError(x.value["message"])
            out[x[0]] = x[1]
    return out


def raw_key(x):
    return (0, x, "") if isinstance(x, int) else (1, 0, str(x))


def match_files(src: Source, what: str) -> list[str]:
    found = src.match()
    if not found:
        raise PreprocessError(f"{', '.join(src.files)}: no files match ({what})")
    return found
