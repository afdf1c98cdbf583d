"""The log configuration of :mod:`pipelines.build_examples`: what the raw logs are and how to cut them.

A JSON file, relative paths resolved against the file's own directory::

    {
      "name": "movielens100k",                      # the dataset's name (in the dataset config)
      "events": {                                   # the event log (required)
        "files": "raw/*.tsv",                       # a glob, or a list of globs
        "format": "csv",                            # parquet | csv | jsonl | sequences
        "delimiter": "\\t",                         # csv / sequences field delimiter (default ",")
        "header": true,                             # csv: first line names the columns (default true)
        "user": "user_id", "item": "item_id",       # columns of the user and the item
        "time": "timestamp",                        # optional; without it the file order is the time order
        "label": {"column": "rating", "op": ">=", "value": 4},   # optional: a 0/1 column name or a rule;
                                                    # without it every event is a positive, negatives sampled
        "context": ["device"]                       # categorical columns carried on the event
      },
      "catalog": {                                  # the item catalog (optional)
        "files": "raw/items.csv", "format": "csv", "delimiter": ",", "item": "item_id",
        "tags": {"column": "genres", "delimiter": "|"},    # or {"column": "title", "hashtags": true},
                                                    # or {"column": "tags"} for a list column
        "lowercase_tags": false, "tag_min_count": 1, "max_tags": 5,
        "vector": {"column": "emb"}                 # a fixed-width list<float> column, or
                                                    # {"files": ..., "format": "parquet", "item": "item_id",
                                                    #  "column": "item_emb_d128"} (a file keyed by item id)
      },
      "users": {"files": ..., "format": ..., "user": "user_id",
                "context": ["gender", {"column": "age", "name": "age_bucket", "buckets": [18, 25, 35]}]},
      "id_dtype": "int64",                          # raw item and user ids: int64 | string
      "unknown_items": "keep",                      # log items without a catalog row: keep | drop | fail
      "item_min_count": 1, "context_min_count": 1,  # vocabulary min counts (training period)
      "popularity_level": "views_level",            # derived context column name, or null for none
      "history": {"events": "positives", "max_len": 100, "duplicates": "keep", "min_len": 1},
      "negatives": {"per_positive": 1, "sampling": "uniform", "seed": 0},   # per_positive <= 1000 and
                                                    # below the item vocabulary's size
      "split": {"method": "leave_last_out"},        # or {"method": "time", "valid_from": T1, "test_from": T2}
                                                    # (build_examples --valid_from/--test_from override
                                                    #  T1/T2 per run; --previous needs "time")
      "on_bad_row": "fail",                         # fail | drop (a counted drop, by reason, in stats.json)
      "max_len": 64,                                # max_len of the written dataset config (preprocessing)
      "shards": 4                                   # parts per split while writing (output: one file a split)
    }

Every value is checked for its type and range when the config is read: a
wrong one (``"max_len": "abc"``, ``"seed": null``, a list where an object
goes) is one :class:`LogsConfigError` line naming the file and the field.

``format: "sequences"`` reads lines ``user<delimiter>item item item ...``
(``item_delimiter``, default a space): each user's events in time order, as
MicroLens ships them; an event's order is (file, line, position).
"""

from __future__ import annotations

import dataclasses
import glob as _glob
import json
import os
import posixpath
from typing import Any, Mapping

FORMATS = ("parquet", "csv", "jsonl", "sequences")
OPS = (">=", ">", "<=", "<", "==", "!=")


class LogsConfigError(ValueError):
    """The log configuration is malformed."""


def _get(d: Mapping[str, Any], key: str, where: str, default=dataclasses.MISSING):
    if key in d:
        return d[key]
    if default is dataclasses.MISSING:
        raise LogsConfigError(f"{where}: missing required key `{key}`.")
    return default


def _known(d: Any, keys: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise LogsConfigError(f"{where}: expected a JSON object. Received: {d!r}")
    unknown = sorted(set(d) - keys)
    if unknown:
        raise LogsConfigError(f"{where}: unknown keys {unknown}; known keys are {sorted(keys)}.")
    return d


def _choice(value, choices, where):
    if value not in choices:
        raise LogsConfigError(f"{where} must be one of {list(choices)}. Received: {value!r}")
    return value


def _int(value, where, low=0, high=None):
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high:,}]"
        raise LogsConfigError(f"{where} must be an integer {bound}. Received: {value!r}")
    return value


def _str(value, where, optional=False, one_char=False):
    """A non-empty string (a column name, a delimiter); None too when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or (one_char and len(value) != 1):
        what = "a one-character string" if one_char else "a non-empty string"
        raise LogsConfigError(f"{where} must be {what}{' or null' if optional else ''}. Received: {value!r}")
    return value


def _bool(value, where):
    if not isinstance(value, bool):
        raise LogsConfigError(f"{where} must be true or false. Received: {value!r}")
    return value


def _number(value, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value in (float("inf"), float("-inf")):
        raise LogsConfigError(f"{where} must be a finite number. Received: {value!r}")
    return value


def _list(value, where):
    if not isinstance(value, list):
        raise LogsConfigError(f"{where} must be a JSON list. Received: {value!r}")
    return value


#: The most negatives a positive may get (``negatives.per_positive``): beyond it the examples
#: would be mostly sampled rows; a build also refuses a value at or above the item vocabulary's size.
MAX_NEGATIVES_PER_POSITIVE = 1000


@dataclasses.dataclass(frozen=True)
class Source:
    """Files of one table: globs resolved to absolute patterns, and how to parse them."""

    files: tuple[str, ...]
    format: str
    delimiter: str = ","
    header: bool = True
    item_delimiter: str = " "

    @classmethod
    def parse(cls, d: Mapping[str, Any], where: str, base: str) -> "Source":
        files = _get(d, "files", where)
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
            raise LogsConfigError(f"{where}.files must be a glob or a list of globs. Received: {files!r}")
        files = tuple(f if "://" in f or os.path.isabs(f) else _resolve(base, f) for f in files)
        fmt = _choice(_get(d, "format", where, None) or _guess_format(files[0]), FORMATS, f"{where}.format")
        delimiter = _str(d.get("delimiter", "\t" if fmt == "sequences" else ","), f"{where}.delimiter",
                         one_char=fmt == "csv")
        return cls(files=files, format=fmt, delimiter=delimiter,
                   header=_bool(d.get("header", fmt == "csv"), f"{where}.header"),
                   item_delimiter=_str(d.get("item_delimiter", " "), f"{where}.item_delimiter"))

    def match(self) -> list[str]:
        """The files the globs name, in sorted order (metadata only)."""
        from apache_beam.io.filesystems import FileSystems

        out = []
        for pattern in self.files:
            if "://" in pattern:
                out += sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
            else:
                out += sorted(_glob.glob(pattern))
        return out


def _resolve(base: str, path: str) -> str:
    """``path`` relative to the directory ``base`` (a local path or a URL such as ``gs://bucket/dir``)."""
    if "://" not in base:
        return os.path.normpath(os.path.join(base, path))
    scheme, rest = base.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"


def _guess_format(path: str) -> str:
    for ext, fmt in ((".parquet", "parquet"), (".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"),
                     (".tsv", "csv")):
        if path.endswith(ext):
            return fmt
    return "csv"


@dataclasses.dataclass(frozen=True)
class LabelRule:
    column: str
    op: str = "=="
    value: Any = 1
    binary: bool = True  # a plain 0/1 column (values other than 0/1 are bad rows)


@dataclasses.dataclass(frozen=True)
class ContextColumn:
    column: str
    name: str
    buckets: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, d, where) -> "ContextColumn":
        if isinstance(d, str) and d:
            return cls(column=d, name=d)
        if not isinstance(d, dict):
            raise LogsConfigError(f"{where}: a context column is a column name or an object. Received: {d!r}")
        _known(d, {"column", "name", "buckets"}, where)
        col = _str(_get(d, "column", where), f"{where}.column")
        b = d.get("buckets")
        if b is not None and (not isinstance(b, list) or not b or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x == x for x in b) or sorted(b) != b):
            raise LogsConfigError(f"{where}.buckets must be a sorted non-empty list of numbers. Received: {b!r}")
        return cls(column=col, name=_str(d.get("name", col), f"{where}.name"), buckets=tuple(b) if b else None)


@dataclasses.dataclass(frozen=True)
class Events:
    source: Source
    user: str
    item: str
    time: str | None = None
    label: LabelRule | None = None
    context: tuple[ContextColumn, ...] = ()


@dataclasses.dataclass(frozen=True)
class Tags:
    column: str
    delimiter: str | None = None  # a delimited string; None: a list column (or hashtags)
    hashtags: bool = False  # "text # tag one # tag two": the parts after each '#'
    lowercase: bool = False
    min_count: int = 1
    max_tags: int = 5


@dataclasses.dataclass(frozen=True)
class Vector:
    column: str
    source: Source | None = None  # None: a column of the catalog itself
    item: str | None = None  # the item id column of the separate file


@dataclasses.dataclass(frozen=True)
class Catalog:
    source: Source
    item: str
    tags: Tags | None = None
    vector: Vector | None = None


@dataclasses.dataclass(frozen=True)
class Users:
    source: Source
    user: str
    context: tuple[ContextColumn, ...] = ()


@dataclasses.dataclass(frozen=True)
class LogsConfig:
    name: str
    events: Events
    catalog: Catalog | None = None
    users: Users | None = None
    id_dtype: str = "int64"
    unknown_items: str = "keep"
    item_min_count: int = 1
    context_min_count: int = 1
    popularity_level: str | None = "views_level"
    history_events: str = "positives"
    history_max_len: int = 100
    history_duplicates: str = "keep"
    history_min_len: int = 1
    negatives_per_positive: int = 1
    negative_sampling: str = "uniform"
    seed: int = 0
    split: str = "leave_last_out"
    valid_from: float | None = None
    test_from: float | None = None
    on_bad_row: str = "fail"
    max_len: int = 64
    shards: int = 4
    path: str = ""

    @property
    def context_names(self) -> tuple[str, ...]:
        """The context columns of the examples: the derived level first, then log, then user columns."""
        names = [self.popularity_level] if self.popularity_level else []
        names += [c.name for c in self.events.context]
        names += [c.name for c in self.users.context] if self.users else []
        return tuple(names)

    @property
    def categorical_context(self) -> tuple[str, ...]:
        """Context columns with a vocabulary (all but the derived level)."""
        return tuple(n for n in self.context_names if n != self.popularity_level)

    @property
    def sample_negatives(self) -> bool:
        return self.events.label is None and self.negatives_per_positive > 0

    @classmethod
    def load(cls, path: str) -> "LogsConfig":
        """Reads the config from a local path or a URL (Beam's ``FileSystems``: ``gs://...``); its
        relative globs name files next to it."""
        from pipelines import beamio

        local = beamio.is_local(path)
        try:
            if not local and not beamio.FileSystems.exists(path):
                raise FileNotFoundError(path)
            d = json.loads(beamio.read_text(path))
        except FileNotFoundError:
            raise LogsConfigError(f"{path}: log config not found") from None
        except json.JSONDecodeError as e:
            raise LogsConfigError(f"{path}: not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise LogsConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return cls.from_dict(d, where=path, base=os.path.dirname(os.path.abspath(path)) if local
                             else path.rsplit("/", 1)[0])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "log config", base: str = ".") -> "LogsConfig":
        top = {"name", "events", "catalog", "users", "id_dtype", "unknown_items", "item_min_count",
               "context_min_count", "popularity_level", "history", "negatives", "split", "on_bad_row",
               "max_len", "shards"}
        _known(d, top, where)
        events = _parse_events(_get(d, "events", where), where, base)
        catalog = _parse_catalog(d["catalog"], where, base) if d.get("catalog") is not None else None
        users = _parse_users(d["users"], where, base) if d.get("users") is not None else None
        h = _known(d.get("history", {}), {"events", "max_len", "duplicates", "min_len"}, f"{where}: history")
        n = _known(d.get("negatives", {}), {"per_positive", "sampling", "seed"}, f"{where}: negatives")
        s = _known(d.get("split", {}), {"method", "valid_from", "test_from"}, f"{where}: split")
        method = _parse_split(s, events, where)
        cfg = cls(
            name=_str(_get(d, "name", where), f"{where}: name"), events=events, catalog=catalog, users=users,
            id_dtype=_choice(d.get("id_dtype", "int64"), ("int64", "string"), f"{where}: id_dtype"),
            unknown_items=_choice(d.get("unknown_items", "keep"), ("keep", "drop", "fail"), f"{where}: unknown_items"),
            item_min_count=_int(d.get("item_min_count", 1), f"{where}: item_min_count", 1),
            context_min_count=_int(d.get("context_min_count", 1), f"{where}: context_min_count", 1),
            popularity_level=_str(d.get("popularity_level", "views_level"), f"{where}: popularity_level",
                                  optional=True),
            history_events=_choice(h.get("events", "positives"), ("positives", "all"), f"{where}: history.events"),
            history_max_len=_int(h.get("max_len", 100), f"{where}: history.max_len", 1),
            history_duplicates=_choice(h.get("duplicates", "keep"), ("keep", "last"), f"{where}: history.duplicates"),
            history_min_len=_int(h.get("min_len", 1), f"{where}: history.min_len", 0),
            negatives_per_positive=_int(n.get("per_positive", 1), f"{where}: negatives.per_positive", 0,
                                        MAX_NEGATIVES_PER_POSITIVE),
            negative_sampling=_choice(n.get("sampling", "uniform"), ("uniform", "popularity"),
                                      f"{where}: negatives.sampling"),
            seed=_int(n.get("seed", 0), f"{where}: negatives.seed", 0),
            split=method, valid_from=s.get("valid_from"), test_from=s.get("test_from"),
            on_bad_row=_choice(d.get("on_bad_row", "fail"), ("fail", "drop"), f"{where}: on_bad_row"),
            max_len=_int(d.get("max_len", 64), f"{where}: max_len", 1),
            shards=_int(d.get("shards", 4), f"{where}: shards", 1), path=where)
        names = ["user_id", "item_id", "item_seq", "label", *cfg.context_names]
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise LogsConfigError(f"{where}: context names must differ from each other and from "
                                  f"user_id/item_id/item_seq/label; repeated: {dup}")
        return cfg


def _parse_label(label, where: str) -> LabelRule | None:
    """``events.label``: a column name (0/1 labels), a rule ``{column, op, value}``, or none."""
    if isinstance(label, str):
        return LabelRule(column=_str(label, f"{where}: events.label"))
    if label is None:
        return None
    _known(label, {"column", "op", "value"}, f"{where}: events.label")
    value = _get(label, "value", f"{where}: events.label")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise LogsConfigError(f"{where}: events.label.value must be a number or a string. "
                              f"Received: {value!r}")
    return LabelRule(column=_str(_get(label, "column", f"{where}: events.label"),
                                 f"{where}: events.label.column"),
                     op=_choice(label.get("op", ">="), OPS, f"{where}: events.label.op"),
                     value=value, binary=False)


def _parse_events(ev, where: str, base: str) -> Events:
    """The ``events`` section."""
    ev = _known(ev, {"files", "format", "delimiter", "header", "item_delimiter",
                     "user", "item", "time", "label", "context"}, f"{where}: events")
    label = _parse_label(ev.get("label"), where)
    events = Events(source=Source.parse(ev, f"{where}: events", base),
                    user=_str(_get(ev, "user", f"{where}: events"), f"{where}: events.user"),
                    item=_str(_get(ev, "item", f"{where}: events"), f"{where}: events.item"),
                    time=_str(ev.get("time"), f"{where}: events.time", optional=True), label=label,
                    context=tuple(ContextColumn.parse(c, f"{where}: events.context")
                                  for c in _list(ev.get("context", []), f"{where}: events.context")))
    if events.source.format == "sequences" and (events.time or label or events.context):
        raise LogsConfigError(f"{where}: events of format `sequences` have only a user and its items "
                              "(no time, label or context columns)")
    return events


def _parse_catalog(c, where: str, base: str) -> Catalog:
    """The ``catalog`` section, with its ``tags`` and ``vector``."""
    c = _known(c, {"files", "format", "delimiter", "header", "item", "tags", "vector",
                   "lowercase_tags", "tag_min_count", "max_tags"}, f"{where}: catalog")
    tags = None
    if c.get("tags") is not None:
        t = c["tags"]
        t = {"column": t} if isinstance(t, str) else _known(t, {"column", "delimiter", "hashtags"},
                                                          f"{where}: catalog.tags")
        tags = Tags(column=_str(_get(t, "column", f"{where}: catalog.tags"), f"{where}: catalog.tags.column"),
                    delimiter=_str(t.get("delimiter"), f"{where}: catalog.tags.delimiter", optional=True),
                    hashtags=_bool(t.get("hashtags", False), f"{where}: catalog.tags.hashtags"),
                    lowercase=_bool(c.get("lowercase_tags", False), f"{where}: catalog.lowercase_tags"),
                    min_count=_int(c.get("tag_min_count", 1), f"{where}: catalog.tag_min_count", 1),
                    max_tags=_int(c.get("max_tags", 5), f"{where}: catalog.max_tags", 1))
    vector = None
    if c.get("vector") is not None:
        v = c["vector"]
        v = {"column": v} if isinstance(v, str) else _known(
            v, {"column", "files", "format", "item"}, f"{where}: catalog.vector")
        vsrc = Source.parse(v, f"{where}: catalog.vector", base) if "files" in v else None
        vector = Vector(column=_str(_get(v, "column", f"{where}: catalog.vector"),
                                    f"{where}: catalog.vector.column"), source=vsrc,
                        item=_str(v.get("item", c.get("item")), f"{where}: catalog.vector.item")
                        if vsrc else None)
    return Catalog(source=Source.parse(c, f"{where}: catalog", base),
                   item=_str(_get(c, "item", f"{where}: catalog"), f"{where}: catalog.item"),
                   tags=tags, vector=vector)


def _parse_users(u, where: str, base: str) -> Users:
    """The ``users`` section."""
    u = _known(u, {"files", "format", "delimiter", "header", "user", "context"}, f"{where}: users")
    return Users(source=Source.parse(u, f"{where}: users", base),
                 user=_str(_get(u, "user", f"{where}: users"), f"{where}: users.user"),
                 context=tuple(ContextColumn.parse(x, f"{where}: users.context")
                               for x in _list(u.get("context", []), f"{where}: users.context")))


def _parse_split(s: Mapping[str, Any], events: Events, where: str) -> str:
    """The split method; ``time`` needs ``valid_from <= test_from`` and a time column."""
    method = _choice(s.get("method", "leave_last_out"), ("leave_last_out", "time"), f"{where}: split.method")
    if method == "time":
        for key in ("valid_from", "test_from"):
            _number(_get(s, key, f"{where}: split"), f"{where}: split.{key}")
    if method == "time" and s["valid_from"] > s["test_from"]:
        raise LogsConfigError(f"{where}: split `time` needs valid_from <= test_from. Received: {dict(s)}")
    if method == "time" and not events.time:
        raise LogsConfigError(f"{where}: split `time` needs a time column (events.time)")
    return method
