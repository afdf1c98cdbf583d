r"""Input readers of the serving side: an export, and files or JSON lines -> model inputs.

Used by both batch scoring (``export.score``) and the serving client
(``export.client``), and by the gate (``export.validate``): one set of input
suffixes (:data:`qin_tf.signatures.PARQUET_SUFFIXES`, ``JSONL_SUFFIXES``,
``TFRECORD_SUFFIXES``), one way to turn a row into model inputs.

* Loading an export: :func:`resolve_saved_model` (a version directory, or an
  export base's newest version), :func:`load_saved_model`, :func:`load_export`
  (with the export's own feature spec). A version that cannot be loaded is
  one line naming its directory.
* Parquet rows in the MMCTR layout -> dense model inputs, exactly as
  preprocessing does (:func:`sequence_to_dense`; :func:`iter_parquet` runs
  preprocessing's own :func:`qin_tf.rows.convert_batch`); without the spec,
  from a signature's inputs (:func:`arrow_batch_features`).
* TFRecords (:func:`iter_tfrecord`, :func:`iter_tfrecord_requests`): the
  serialized records, unchanged, for ``predict_examples``.
* JSON lines and raw-id rows (:func:`check_row_value`, :func:`iter_raw`,
  :func:`iter_jsonl_requests`, :func:`iter_raw_parquet_requests`): the
  history unpadded, ids checked by the spec's rules
  (:data:`qin_tf.spec.ID_RULE`, :data:`qin_tf.spec.RAW_ID_RULE`).

Bad input raises :class:`qin_tf.rows.PreprocessError` naming the file, the
row (0-based in that file) and the column.
"""

from __future__ import annotations

import glob as globlib
import os
import sys
from typing import Iterator, Mapping, Sequence

import numpy as np

from qin_tf import fileio
from qin_tf.cli import error_line
from qin_tf.rows import (INT, INT_LIST, Columns, PreprocessError, check_columns, convert_batch, fail,
                         is_int_list_type, is_int_type, iter_row_groups, one_line, split_columns)
from qin_tf.signatures import (JSONL_SUFFIXES, PARQUET_SUFFIXES, SERVE_TAG, SPEC_ASSET_PATH, TFRECORD_SUFFIXES,
                               raw_dtype)
from qin_tf.spec import (ID_RULE, INT64_MAX, RAW_ID_RULE, Feature, FeatureSpec, left_pad_recent, negative_ids,
                         raw_id_problem)

#: ``--input`` value that reads JSON lines from stdin.
STDIN = "-"


# --------------------------------------------------------------------------
# Loading the export
# --------------------------------------------------------------------------


def resolve_saved_model(path: str) -> str:
    """``path`` itself if it holds ``saved_model.pb``, else its newest numbered version."""
    g = fileio.gfile()
    if g.exists(os.path.join(path, "saved_model.pb")):
        return path
    if g.isdir(path):
        names = [n.rstrip("/") for n in g.listdir(path)]
        versions = sorted(int(n) for n in names if n.isdigit() and g.exists(os.path.join(path, n, "saved_model.pb")))
        if versions:
            return os.path.join(path, str(versions[-1]))
    raise FileNotFoundError(f"{path}: neither a SavedModel (saved_model.pb) nor an export base with "
                            "numbered versions; run `python -m export.exporter` first.")



def load_saved_model(path: str):
    """``(tf.saved_model.load of the version dir, version dir)`` for an export base or version directory.

    Raises:
        PreprocessError: naming the version directory when it cannot be loaded
            (a truncated or garbage ``saved_model.pb``, missing variables, ...).
        FileNotFoundError: ``path`` holds no SavedModel.
    """
    import tensorflow as tf

    version_dir = resolve_saved_model(path)
    try:
        return tf.saved_model.load(version_dir, tags=[SERVE_TAG]), version_dir
    except Exception as e:  # DecodeError (OSError), NotFoundError, ValueError: all mean a broken version
        fail(version_dir, None, None, f"cannot load this SavedModel ({error_line(e)}); re-export it, or "
                                      "remove this version to use the one before")


def load_export(path: str):
    """Returns ``(loaded SavedModel, FeatureSpec from its assets, version dir)``."""
    from qin_tf.spec import SpecError

    loaded, version_dir = load_saved_model(path)
    try:
        spec = FeatureSpec.load(os.path.join(version_dir, SPEC_ASSET_PATH))
    except (OSError, SpecError, ValueError) as e:
        fail(version_dir, None, None, f"cannot read the export's feature spec ({SPEC_ASSET_PATH}): "
                                      f"{one_line(e)}")
    return loaded, spec, version_dir



# --------------------------------------------------------------------------
# Parquet rows -> model inputs
# --------------------------------------------------------------------------


def sequence_to_dense(lists, max_len: int) -> np.ndarray:
    """A pyarrow list column -> int64 ``[rows, max_len]``, as preprocessing writes it.

    Zeros (padding) are dropped, the most recent ``max_len`` items (the last
    ones: sequences are oldest first) are kept, and the row is left-padded
    with 0: :func:`qin_tf.spec.left_pad_recent`, the function the
    pipeline itself uses. A null list counts as empty.

    Example::

        sequence_to_dense(pa.array([[5, 0, 7, 8], [], [0, 3]]), 3)
        # [[5, 7, 8], [0, 0, 0], [0, 0, 3]]
    """
    import pyarrow.compute as pc

    n = len(lists)
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(lists).fill_null(0).cast("int64").to_numpy(zero_copy_only=False)
    parent = np.repeat(np.arange(n, dtype=np.int64), lengths)
    return left_pad_recent(values, parent, n, max_len)[0]


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def column_to_ids(column, feature: Feature, *, source: str, first_row: int = 0) -> np.ndarray:
    """Checks one parquet column of a model input known only by name and shape; returns int64 ids.

    For callers that know a signature's inputs but not the feature spec (the
    serving client): checks the type, nulls and negative ids, as preprocessing
    does. With the spec, :func:`iter_parquet` runs preprocessing's own
    :func:`qin_tf.rows.convert_batch`, which also checks item ids
    against the item table.

    Raises:
        PreprocessError: naming ``source``, the row (``first_row`` + index) and the column.
    """
    import pyarrow.compute as pc

    name = feature.name
    if column.null_count:
        fail(source, first_row + _first(column.is_null().to_numpy(zero_copy_only=False)), name, "null value")
    if feature.shape:
        if not is_int_list_type(column.type):
            fail(source, None, name, f"has type {column.type}; expected {INT_LIST}")
        flat = pc.list_flatten(column)
        flat_ids = flat.fill_null(0).cast("int64").to_numpy(zero_copy_only=False)
        if flat.null_count or negative_ids(flat_ids).any():
            bad = flat.is_null().to_numpy(zero_copy_only=False) | negative_ids(flat_ids)
            i = _first(bad)
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
            ends = np.cumsum(lengths)
            row = int(np.searchsorted(ends, i, side="right"))
            pos = i - (ends[row] - lengths[row])
            value = flat[i].as_py()
            fail(source, first_row + row, name, f"null value at position {pos} of the list" if value is None
                 else f"negative item id {value} at position {pos} of the list")
        return sequence_to_dense(column, feature.shape[0])
    if not is_int_type(column.type):
        fail(source, None, name, f"has type {column.type}; expected {INT}")
    ids = column.cast("int64").to_numpy(zero_copy_only=False)
    if negative_ids(ids).any():
        row = _first(negative_ids(ids))
        fail(source, first_row + row, name, f"negative id {int(ids[row])}")
    return ids


def arrow_batch_features(batch, features: Sequence[Feature], *, source: str,
                         first_row: int = 0) -> dict[str, np.ndarray]:
    """A pyarrow RecordBatch in the MMCTR layout -> ``{name: int64 array}`` of ``features``."""
    names = batch.schema.names
    for f in features:
        if f.name not in names:
            fail(source, None, f.name, f"missing column; the file has columns {names}")
    return {f.name: column_to_ids(batch.column(names.index(f.name)), f, source=source, first_row=first_row)
            for f in features}


# --------------------------------------------------------------------------
# Input streams
# --------------------------------------------------------------------------


def input_files(pattern: str, raw_ids: bool = False) -> tuple[list[str], str]:
    """The sorted files of ``pattern`` and their kind: ``"parquet"`` or ``"tfrecord"``; with ``raw_ids``
    ``"parquet"`` or ``"jsonl"``."""
    if fileio.is_local(pattern):
        files = sorted(globlib.glob(pattern)) if any(c in pattern for c in "*?[") else (
            [pattern] if os.path.exists(pattern) else [])
        files = [f for f in files if os.path.isfile(f)]
    else:  # a URL (gs://, ram://): TensorFlow's glob
        g = fileio.gfile()
        files = sorted(g.glob(pattern)) if any(c in pattern for c in "*?[") else (
            [pattern] if g.exists(pattern) else [])
        files = [f for f in files if not g.isdir(f)]
    if not files:
        fail(pattern, None, None, "no such file")
    kinds = set()
    other = ("jsonl", JSONL_SUFFIXES, "JSON lines") if raw_ids else ("tfrecord", TFRECORD_SUFFIXES, "TFRecord")
    for f in files:
        if f.endswith(PARQUET_SUFFIXES):
            kinds.add("parquet")
        elif f.endswith(other[1]):
            kinds.add(other[0])
        else:
            fail(f, None, None, f"unknown input type; expected parquet ({', '.join(PARQUET_SUFFIXES)}) "
                                f"or {other[2]} ({', '.join(other[1])})" + (" with --raw_ids" if raw_ids else ""))
    if len(kinds) > 1:
        fail(pattern, None, None, f"mixes parquet and {other[2]} files; score them separately")
    return files, kinds.pop()


class Batch:
    """One batch of input rows: model inputs (or serialized examples), label and meta when present."""

    def __init__(self, source: str, first_row: int, features=None, examples=None,
                 label: np.ndarray | None = None, meta: Mapping[str, np.ndarray] | None = None):
        self.source = source
        self.first_row = first_row
        self.features = features
        self.examples = examples
        self.label = label
        self.meta = dict(meta or {})

    @property
    def num_rows(self) -> int:
        if self.examples is not None:
            return len(self.examples)
        return len(next(iter(self.features.values())))


def parquet_columns(spec: FeatureSpec, names: Sequence[str]) -> Columns:
    """The roles of a parquet file's columns: the spec's, label and meta only where present."""
    return Columns(label=spec.label if spec.label in names else None,
                   meta=tuple(m for m in spec.meta if m in names),
                   target_item=spec.target_item, sequence=spec.sequence, context=tuple(spec.context))


def iter_parquet(files: Sequence[str], spec: FeatureSpec, batch_size: int) -> Iterator[Batch]:
    """Batches of a parquet file, checked and converted by preprocessing's own code.

    :func:`qin_tf.rows.convert_batch` checks every row (nulls,
    negative ids, target 0, items beyond the item table, labels other than
    0/1) and builds the history matrix; the first bad row stops the run with
    the error preprocessing would give (``on_bad_row="fail"``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        try:
            pf = pq.ParquetFile(fileio.binary_source(path))
        except (pa.ArrowException, OSError) as e:
            fail(path, None, None, f"not a readable parquet file: {one_line(e)}")
        schema = pf.schema_arrow
        cols = parquet_columns(spec, schema.names)
        expected = split_columns(cols, labelled=cols.label is not None)
        check_columns(path, schema, expected)
        for row, rb in iter_row_groups(pf, path, cols.all, batch_size):
            conv = convert_batch(rb, row, cols, spec.num_items, spec.max_len)
            if conv.bad:
                b = conv.bad[0]
                raise PreprocessError(b.message(path), file=path, row=b.row, column=b.column, reason=b.reason)
            yield Batch(path, row, features={n: conv.features[n] for n in spec.model_feature_names},
                        label=conv.features[cols.label] if cols.label else None,
                        meta={m: conv.features[m] for m in cols.meta})


def raw_features(spec: FeatureSpec) -> list[Feature]:
    """The inputs of the export's ``serving_raw`` signature: raw dtypes, the history of any width."""
    return [Feature(f.name, f.role, raw_dtype(spec, f.name), (-1,) if f.shape else (), f.vocab_size)
            for f in spec.model_features]


def _raw_rows(path: str, kind: str, names: Sequence[str], batch_size: int) -> Iterator[tuple[int, list[dict]]]:
    """``(first row, [row objects])`` batches of a raw-id parquet or JSON-lines file (only ``names``)."""
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(fileio.binary_source(path))
        except (pa.ArrowException, OSError) as e:
            fail(path, None, None, f"not a readable parquet file: {one_line(e)}")
        have = [n for n in names if n in pf.schema_arrow.names]
        row = 0
        for rb in pf.iter_batches(batch_size=batch_size, columns=have):
            yield row, rb.to_pylist()
            row += rb.num_rows
        return
    rows, first = [], 0
    with fileio.open_text(path) as f:
        for row, line in enumerate(f):
            rows.append(json_object(path, row, line))
            if len(rows) == batch_size:
                yield first, rows
                first, rows = row + 1, []
    if rows:
        yield first, rows


def iter_raw(files: Sequence[str], kind: str, spec: FeatureSpec, batch_size: int) -> Iterator[Batch]:
    """Batches of raw-id rows (parquet or JSON lines), checked as ``export.client --raw_ids`` checks them.

    The label and the meta columns are carried when the file's first row has
    them (then every row must); a label must be 0 or 1. A meta value (a user
    id) is an int64 or a string, one type for every row of every file: the
    output column has one type, so a row whose type differs from the first
    row's is refused, naming it. Ids of inputs with a vocabulary follow the
    raw-id rule (:data:`qin_tf.spec.RAW_ID_RULE`); the others are dense ids.
    """
    features = raw_features(spec)
    raw = {f.name: spec.vocabulary_key(f.name) is not None for f in features}
    extras = (spec.label, *spec.meta)
    meta_type: dict[str, tuple[type, str, int]] = {}  # the first row's type, file and row
    for path in files:
        present = None
        for first, rows in _raw_rows(path, kind, [f.name for f in features] + list(extras), batch_size):
            if present is None:
                present = [n for n in extras if rows and n in rows[0]]
            checked, cols = [], {n: [] for n in present}
            for i, obj in enumerate(rows):
                values = {}
                for f in features:
                    if obj.get(f.name) is None:
                        fail(path, first + i, f.name, "missing" if f.name not in obj else "null value")
                    values[f.name] = check_row_value(obj[f.name], f, path, first + i, raw=raw[f.name])
                checked.append(values)
                for n in present:
                    v = obj.get(n)
                    if v is None:
                        fail(path, first + i, n, "missing, while other rows have it")
                    if n == spec.label and (isinstance(v, bool) or v not in (0, 1)):
                        fail(path, first + i, n, f"label {v!r}; expected 0 or 1")
                    if n != spec.label:
                        _check_meta(v, n, path, first + i, meta_type)
                    cols[n].append(v)
            label = np.asarray(cols.pop(spec.label), np.int64) if spec.label in cols else None
            meta = {n: np.asarray(v, dtype=np.int64 if meta_type[n][0] is int else str) for n, v in cols.items()}
            yield Batch(path, first, features=rows_to_inputs(checked, features), label=label, meta=meta)


def _check_meta(value, name: str, path: str, row: int, seen: dict) -> None:
    """A meta value of a raw-id row: an int64 or a string, of the type of the first row's (``seen``)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        fail(path, row, name, f"expected an integer or a string, got {value!r}"[:200])
    if isinstance(value, int) and not -2 ** 63 <= value < 2 ** 63:
        fail(path, row, name, f"{value} is beyond int64")
    kind = int if isinstance(value, int) else str
    first = seen.setdefault(name, (kind, path, row))
    if first[0] is not kind:
        fail(path, row, name, f"{'an integer' if kind is int else 'a string'}, while {first[1]} row {first[2]} "
                              f"has {'an integer' if first[0] is int else 'a string'}; the column takes one "
                              "type in every row")


def _compression(path: str) -> str:
    return "GZIP" if path.endswith(".gz") else ""


def iter_tfrecord(files: Sequence[str], spec: FeatureSpec, batch_size: int) -> Iterator[Batch]:
    import tensorflow as tf

    extras = {n: tf.io.FixedLenFeature([], tf.int64, default_value=-1) for n in (spec.label, *spec.meta)}
    for path in files:
        ds = tf.data.TFRecordDataset(path, compression_type=_compression(path)).batch(batch_size)
        row = 0
        it = iter(ds)
        while True:
            try:
                serialized = next(it)
            except StopIteration:
                break
            except tf.errors.OpError as e:
                fail(path, row, None, f"unreadable TFRecord data: {one_line(e.message)}")
            try:
                parsed = tf.io.parse_example(serialized, extras)
            except tf.errors.InvalidArgumentError:
                bad = find_bad_record(serialized.numpy(), extras)
                if bad is None:
                    raise
                fail(path, row + bad[0], None, bad[1])
            cols = {}
            for n in extras:
                v = parsed[n].numpy()
                missing = v == -1
                if missing.all():
                    continue
                if missing.any():
                    fail(path, row + _first(missing), n, "missing, while other rows have it")
                cols[n] = v
            label = cols.pop(spec.label, None)
            yield Batch(path, row, examples=serialized, label=label, meta=cols)
            row += int(serialized.shape[0])


def find_bad_record(serialized: Sequence[bytes], parse_spec) -> tuple[int, str] | None:
    """The first record of a batch that ``parse_spec`` rejects and TF's reason; None if all parse."""
    import tensorflow as tf

    for i, s in enumerate(serialized):
        try:
            tf.io.parse_example(tf.constant([s]), parse_spec)
        except tf.errors.InvalidArgumentError as e:
            return i, e.message.split("\n")[0]
    return None


def check_row_value(value, feature: Feature, source: str, row: int, *, raw: bool | None = None):
    """One JSON value of a model input -> an int or string, or for the history a list of them (unpadded).

    With ``raw`` (default: a string feature, or a history of any width: the
    raw-id signature's inputs) the value holds raw ids, checked by the raw-id
    rule (:data:`qin_tf.spec.RAW_ID_RULE`; 0 and ``""`` are padding in a
    history only); otherwise dense ids, checked by :data:`qin_tf.spec.ID_RULE`
    and the int64 range. The type must be the feature's: strings for a string
    feature, integers otherwise.

    Raises:
        PreprocessError: naming ``source``, ``row`` and the feature.
    """
    if raw is None:
        raw = feature.dtype == "string" or bool(feature.shape and feature.shape[-1] < 0)
    text = feature.dtype == "string"
    kind = "raw string id" if text else ("raw int64 id" if raw else "integer id")

    def ok(v):
        return isinstance(v, str) if text else isinstance(v, int) and not isinstance(v, bool)

    if feature.shape:
        if not isinstance(value, list) or not all(ok(v) for v in value):
            fail(source, row, feature.name, f"expected a list of {kind}s (the history, oldest first, unpadded), "
                                            f"got {json_snippet(value)}")
        for pos, v in enumerate(value):
            if raw and v not in (0, ""):  # raw padding is dropped by the graph
                why = raw_id_problem(v)
                if why is not None:
                    fail(source, row, feature.name, f"{why} at position {pos} of the list; {RAW_ID_RULE}")
            elif not raw and (v < 0 or v > INT64_MAX):
                fail(source, row, feature.name, f"{'negative item id' if v < 0 else 'item id'} {v} "
                                                f"{'' if v < 0 else 'is beyond int64 '}at position {pos} of the "
                                                f"list; {ID_RULE}")
        return value
    if not ok(value):
        fail(source, row, feature.name, f"expected {'an' if kind[0] == 'i' else 'a'} {kind}, got "
                                        f"{json_snippet(value)}")
    if raw:
        why = raw_id_problem(value)
        if why is not None:
            fail(source, row, feature.name, f"{why}; {RAW_ID_RULE}")
    elif value < 0:
        fail(source, row, feature.name, f"negative id {value}; {ID_RULE}")
    elif value > INT64_MAX:
        fail(source, row, feature.name, f"id {value} is beyond int64; {ID_RULE}")
    return value


def json_snippet(value, limit: int = 60) -> str:
    import json

    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def json_object(source: str, row: int, line: str) -> dict:
    """Line ``row`` of a JSON-lines file as its object; any other line fails, naming the file and row."""
    import json

    if not line.strip():
        fail(source, row, None, "empty line; every line is one JSON object")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        fail(source, row, None, f"not valid JSON: {e}")
    if not isinstance(obj, dict):
        fail(source, row, None, f"expected a JSON object, got {json_snippet(obj)}")
    return obj


def rows_to_inputs(rows: Sequence[Mapping], features: Sequence[Feature]) -> dict:
    """Checked rows (``{name: id or unpadded history}``) -> ``{name: array}`` of one request.

    A dense history is padded or cut by the spec's sequence rule to its
    ``max_len``; a raw history (shape ``(-1,)``) is left-padded with the raw
    padding value to the batch's longest (the export's graph pads or cuts it).
    """
    out = {}
    for f in features:
        values = [r[f.name] for r in rows]
        if f.shape and f.shape[-1] < 0:  # a raw history: any width, padded to the batch's longest
            pad = "" if f.dtype == "string" else 0  # the raw padding value; the graph pads or cuts
            width = max(1, max(len(seq) for seq in values))
            out[f.name] = np.asarray([[pad] * (width - len(seq)) + list(seq) for seq in values],
                                     dtype=object if f.dtype == "string" else np.int64)
        elif f.shape:
            flat = np.asarray([v for seq in values for v in seq], dtype=np.int64)
            parent = np.repeat(np.arange(len(values), dtype=np.int64), [len(seq) for seq in values])
            out[f.name] = left_pad_recent(flat, parent, len(values), f.shape[0])[0]
        else:
            out[f.name] = np.asarray(values, dtype=object if f.dtype == "string" else np.dtype(f.dtype))
    return out


def iter_jsonl_requests(path: str, features: Sequence[Feature], batch_size: int, stream=None, *,
                        raw: frozenset[str] | None = None) -> Iterator[dict]:
    """Batches of model inputs from JSON lines (``path``, or ``stream`` when given; ``-``: stdin).

    Each line is one JSON object with a key per feature; the history is a
    list of any length, padded or cut by the spec's sequence rule. Keys that
    are not model inputs are ignored. Errors name the source, the row (the
    0-based line number) and the key. ``raw``: the names of the features
    holding raw ids (:func:`check_row_value`'s default when None).
    """
    source = "<stdin>" if path == STDIN else path
    if stream is None:
        stream = sys.stdin if path == STDIN else fileio.open_text(path)
    rows: list[dict] = []

    def flush():
        out = rows_to_inputs(rows, features)
        rows.clear()
        return out

    try:
        for row, line in enumerate(stream):
            obj = json_object(source, row, line)
            values = {}
            for f in features:
                if f.name not in obj:
                    fail(source, row, f.name, f"missing key; the model's inputs are {[g.name for g in features]}")
                values[f.name] = check_row_value(obj[f.name], f, source, row,
                                                 raw=None if raw is None else f.name in raw)
            rows.append(values)
            if len(rows) == batch_size:
                yield flush()
        if rows:
            yield flush()
    finally:
        if stream is not sys.stdin:
            stream.close()


def iter_parquet_requests(path: str, features: Sequence[Feature], batch_size: int) -> Iterator[dict]:
    """Batches of model inputs from a parquet file in the MMCTR layout."""
    import pyarrow.parquet as pq


    pf = pq.ParquetFile(fileio.binary_source(path))
    have = pf.schema_arrow.names
    for f in features:
        if f.name not in have:
            fail(path, None, f.name, f"missing column; the file has columns {have}")
    row = 0
    for rb in pf.iter_batches(batch_size=batch_size, columns=[f.name for f in features]):
        yield arrow_batch_features(rb, features, source=path, first_row=row)
        row += rb.num_rows


def iter_raw_parquet_requests(path: str, features: Sequence[Feature], batch_size: int, *,
                              raw: frozenset[str] | None = None) -> Iterator[dict]:
    """Batches of raw-id model inputs from a parquet file: one column per input, the history a list
    (oldest first, unpadded), checked row by row as JSON lines are (:func:`check_row_value`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(fileio.binary_source(path))
    except (pa.ArrowException, OSError) as e:
        fail(path, None, None, f"not a readable parquet file: {one_line(e)}")
    have = pf.schema_arrow.names
    for f in features:
        if f.name not in have:
            fail(path, None, f.name, f"missing column; the file has columns {have}")
    first = 0
    for rb in pf.iter_batches(batch_size=batch_size, columns=[f.name for f in features]):
        rows = []
        for i, obj in enumerate(rb.to_pylist()):
            values = {}
            for f in features:
                if obj[f.name] is None:
                    fail(path, first + i, f.name, "null value")
                values[f.name] = check_row_value(obj[f.name], f, path, first + i,
                                                 raw=None if raw is None else f.name in raw)
            rows.append(values)
        yield rows_to_inputs(rows, features)
        first += rb.num_rows


def iter_tfrecord_requests(path: str, batch_size: int) -> Iterator[list[bytes]]:
    """Batches of serialized records from a TFRecord file (GZIP when it ends in ``.gz``)."""
    import tensorflow as tf

    ds = tf.data.TFRecordDataset(path, compression_type="GZIP" if path.endswith(".gz") else "")
    for batch in ds.batch(batch_size):
        yield list(batch.numpy())

