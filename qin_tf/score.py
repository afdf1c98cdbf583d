r"""Batch scoring with an exported SavedModel: no model code, bounded memory.

    python -m qin_tf.score --saved_model=runs/sample/export \
        --input='data/microlens_sample/test.parquet' --output=runs/sample/test_scores.parquet

* ``--saved_model`` is a version directory written by ``export.exporter``, or
  the export base holding numbered versions (the newest is used). It is
  loaded with ``tf.saved_model.load`` alone; the feature spec comes from the
  export's own ``assets/feature_spec.json``.
* ``--input`` is a file or a glob of files, all parquet in the MMCTR layout
  (the raw logs: the same columns ``pipelines.preprocess`` reads) or all
  TFRecords written by the pipeline (``*.tfrecord.gz`` GZIP, ``*.tfrecord``
  uncompressed). Files are read in sorted order, ``--batch_size`` rows at a
  time (``pyarrow`` ``iter_batches`` for parquet, ``tf.data`` for TFRecords),
  so memory does not grow with the input, except for one label and one score
  per row kept for the AUC when the input is labelled.
* Parquet rows are turned into model inputs exactly as preprocessing does
  (:func:`sequence_to_dense`): the behaviour sequence keeps its most recent
  ``max_len`` non-zero items, oldest first, left-padded with 0. TFRecords go
  through the export's ``predict_examples`` signature unchanged.
* ``--format``: ``parquet`` or ``csv`` write one row per input row with the
  columns ``row`` (0-based index over all inputs), the meta columns (e.g.
  ``user_id``) and the label when the input has them, and ``ctr``;
  ``challenge`` writes the MMCTR challenge's submission CSV, ``ID,Task2``
  with ``ID`` the row's 0-based index and ``Task2`` its score. The output is
  written to a temporary file beside ``--output`` (``.{name}.score-{pid}-*.tmp``)
  and renamed when complete: a failed run leaves nothing behind, and a run
  removes the temporary files of killed runs into the same output (those
  whose process is gone). The output follows the umask.
* ``--output`` follows :func:`qin_tf.fileio.check_output_path`, the rule
  ``export.client`` follows too, checked before any work: never one of the
  inputs, never inside the export being read (its base and versions), never
  a directory, a path under a file or a device; an existing regular file is
  replaced only with ``--overwrite`` (the rule of training's ``--model_dir``).
* ``--raw_ids``: the rows hold ids as the log had them (strings, or int64s,
  as the export's vocabularies say): parquet files with one column per
  model input (the history a list, oldest first, unpadded), or JSON lines
  (``*.jsonl``, ``*.json``: one object per line, one key per model input, as
  ``python -m export.client --raw_ids`` sends). They go through the export's
  ``serving_raw`` signature, which maps them to dense ids with the
  vocabularies inside the SavedModel (an unknown id is the OOV id 1) and pads
  or cuts the history by the spec's rule: a row's score is bit for bit the
  score of its dense ids. Ids of inputs with a vocabulary follow the raw-id
  rule (:data:`qin_tf.spec.RAW_ID_RULE`: 0 and ``""`` only as history
  padding), the others the dense :data:`qin_tf.spec.ID_RULE`. The label and
  the meta columns (keys) are carried when the input has them; a meta
  column holds one type (int64 or string) in every row, else the first row
  of the other type is refused.
* When the input has labels, the AUC (and log loss, and the gAUC over the
  first meta column) is printed, from :mod:`qin_tf.metrics`.

Bad input stops the run with an error naming the file, the row (0-based in
that file) and the column: a missing column, a null, a non-integer type, a
negative id, an id beyond int64, a malformed record; a corrupt parquet file
names the row group (``x.parquet: row group 3 (rows 3072..4095): corrupt
parquet (...)``), a corrupt TFRecord file the record, an export version that
cannot be loaded its directory. TensorFlow's own text reaches the user as one
plain line (:func:`tf_error_text`).
"""

from __future__ import annotations

import csv
import glob as globlib
import json
import os
import re
import sys
import tempfile
import time
import uuid
from typing import Iterator, Mapping, Sequence

import numpy as np

from pipelines.validation import (INT, INT_LIST, Columns, PreprocessError, check_columns, convert_batch, fail,
                                  is_int_list_type, is_int_type, iter_row_groups, left_pad_recent, one_line,
                                  split_columns)
from qin_tf import fileio
from qin_tf.runtime import process_alive
from qin_tf.spec import SPEC_FILENAME, Feature, FeatureSpec, negative_ids

#: Rows per batch by default.
DEFAULT_BATCH_SIZE = 1024
FORMATS = ("parquet", "csv", "challenge")
#: Column names of the outputs.
ROW_COLUMN = "row"
SCORE_COLUMN = "ctr"
CHALLENGE_COLUMNS = ("ID", "Task2")
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json")
#: The export's raw-id signature (``export.exporter.RAW_SIGNATURE``).
RAW_SIGNATURE = "serving_raw"
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrecord.gz", ".tfrecords.gz")


#: Bad input: the same error type and messages as ``pipelines.preprocess``.
InputError = PreprocessError


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


_TF_MARKUP = re.compile(r"\{\{function_node [^}]*\}\}|\[\[\{\{node [^}]*\}\}\]\]|\{\{node [^}]*\}\}|"
                        r"\s*\[Op:[^\]]*\]")
_TF_NOISE = ("Graph execution error", "Detected at node", "File ", "[[", "return ", "Traceback", "Stack trace")
_TF_HINTS = re.compile(r"\s*You may be trying to load on a different device.*$|\s*Consider setting the "
                       r"`experimental_io_device`.*$")


def tf_error_text(error: BaseException | str) -> str:
    """A TensorFlow (or protobuf) error, or its text (a gRPC status' details), as one plain line: no
    ``{{function_node ...}}``, ``[[{{node ...}}]]``, ``[Op:...]``, Python frames or loading hints.

    >>> tf_error_text(ValueError("{{function_node __inference_f_1}} bad id\\n\\t [[{{node Lookup}}]]"))
    'bad id'
    """
    text = _TF_MARKUP.sub("", error if isinstance(error, str) else getattr(error, "message", None) or str(error))
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(_TF_NOISE)]
    line = _TF_HINTS.sub("", " ".join(" ".join(lines).split()))
    return line.strip(" :") or ("error" if isinstance(error, str) else type(error).__name__)


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
        return tf.saved_model.load(version_dir, tags=["serve"]), version_dir
    except Exception as e:  # DecodeError (OSError), NotFoundError, ValueError: all mean a broken version
        fail(version_dir, None, None, f"cannot load this SavedModel ({tf_error_text(e)}); re-export it, or "
                                      "remove this version to use the one before")


def load_export(path: str):
    """Returns ``(loaded SavedModel, FeatureSpec from its assets, version dir)``."""
    from qin_tf.spec import SpecError

    loaded, version_dir = load_saved_model(path)
    try:
        spec = FeatureSpec.load(os.path.join(version_dir, "assets", SPEC_FILENAME))
    except (OSError, SpecError, ValueError) as e:
        fail(version_dir, None, None, f"cannot read the export's feature spec (assets/{SPEC_FILENAME}): "
                                      f"{one_line(e)}")
    return loaded, spec, version_dir


# --------------------------------------------------------------------------
# Parquet rows -> model inputs
# --------------------------------------------------------------------------


def sequence_to_dense(lists, max_len: int) -> np.ndarray:
    """A pyarrow list column -> int64 ``[rows, max_len]``, as preprocessing writes it.

    Zeros (padding) are dropped, the most recent ``max_len`` items (the last
    ones: sequences are oldest first) are kept, and the row is left-padded
    with 0: :func:`pipelines.validation.left_pad_recent`, the function the
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
    :func:`pipelines.validation.convert_batch`, which also checks item ids
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

    :func:`pipelines.validation.convert_batch` checks every row (nulls,
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
    from export.exporter import raw_dtype

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
    from export.client import json_object

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
    from export.client import check_row_value, rows_to_inputs

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
                bad = _find_bad_record(serialized.numpy(), extras)
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


def _find_bad_record(serialized: Sequence[bytes], parse_spec) -> tuple[int, str] | None:
    """The first record of a batch that ``parse_spec`` rejects and TF's reason; None if all parse."""
    import tensorflow as tf

    for i, s in enumerate(serialized):
        try:
            tf.io.parse_example(tf.constant([s]), parse_spec)
        except tf.errors.InvalidArgumentError as e:
            return i, e.message.split("\n")[0]
    return None


# --------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------


def check_output(output: str, inputs: Sequence[str], *, overwrite: bool = False,
                 saved_model: str | None = None) -> None:
    """Refuses, before any work, an output that would lose data or cannot be created.

    The rule is :func:`qin_tf.fileio.check_output_path`, the one
    ``export.client`` applies too: never one of ``inputs`` or inside the
    export ``saved_model`` (its base and version directories), never a
    directory or a device, an existing file replaced only with ``overwrite``.

    Raises:
        PreprocessError: naming ``output`` and the reason.
    """
    try:
        fileio.check_output_path(output, inputs, overwrite=overwrite,
                                 read_trees=fileio.export_trees(saved_model) if saved_model else ())
    except fileio.OutputPathError as e:
        fail(output, None, None, e.reason)


def _temp_pattern(path: str) -> re.Pattern:
    """The names of :class:`ScoreWriter`'s temporary files for ``path``; group 1 is the writer's pid."""
    return re.compile(rf"\.{re.escape(os.path.basename(path))}\.score-(\d+)-[0-9a-f]{{8}}\.tmp")


def remove_stale_temp_files(path: str) -> list[str]:
    """Removes the temporary files of killed runs that wrote ``path``; returns their paths.

    Only files named as :class:`ScoreWriter` names them for this output, and
    only those whose writing process is gone (a live run keeps its file).
    """
    directory = os.path.dirname(os.path.abspath(path))
    pattern, removed = _temp_pattern(path), []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        m = pattern.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not process_alive(int(m.group(1))):
            try:
                os.remove(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
            except FileNotFoundError:  # another run cleaned it first
                pass
    return removed


class ScoreWriter:
    """Streams scores to parquet or CSV through a temporary file renamed on :meth:`close`.

    The temporary file (``.{name}.score-{pid}-{random}.tmp`` beside ``path``)
    is created with the umask's permissions, as the output then has; the
    temporary files of killed runs into the same ``path`` are removed first
    (:func:`remove_stale_temp_files`).

    When ``path`` is a URL (``gs://``, ``ram://``), the scores are written to
    a local temporary file, which :meth:`close` copies to the temporary name
    beside ``path`` and renames over ``path`` (a copy and a delete on an
    object store: see :mod:`qin_tf.fileio`). A killed run's temporary object
    there is not removed (whether its writer lives is not known from another
    machine).
    """

    def __init__(self, path: str, fmt: str):
        if fmt not in FORMATS:
            raise ValueError(f"`format` must be one of {FORMATS}. Received: format={fmt!r}")
        self.path = path
        self.fmt = fmt
        self.local = fileio.is_local(path)
        name = f".{os.path.basename(path)}.score-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        if self.local:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            remove_stale_temp_files(path)
            self.tmp = self.file = os.path.join(directory, name)
            os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 & ~umask
        else:
            fileio.gfile().makedirs(os.path.dirname(path))
            self.tmp = os.path.join(os.path.dirname(path), name)
            fd, self.file = tempfile.mkstemp(prefix="qin_score_", suffix=".tmp")  # what pyarrow and csv write
            os.close(fd)
        self._parquet = None
        self._csv_file = None
        self._csv = None

    def write(self, columns: Mapping[str, np.ndarray]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.fmt == "parquet":
            table = pa.table(dict(columns))
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.file, table.schema)
            self._parquet.write_table(table)
            return
        if self._csv is None:
            self._csv_file = open(self.file, "w", newline="")
            self._csv = csv.writer(self._csv_file)
            self._csv.writerow(list(columns))
        cols = [c.tolist() for c in columns.values()]
        self._csv.writerows(zip(*cols))

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._csv_file is not None:
            self._csv_file.close()
        if self.local:
            os.replace(self.tmp, self.path)
            return
        g = fileio.gfile()
        g.copy(self.file, self.tmp, overwrite=True)
        os.remove(self.file)
        g.rename(self.tmp, self.path, overwrite=True)

    def abort(self) -> None:
        for f in (self._parquet, self._csv_file):
            try:
                if f is not None:
                    f.close()
            except Exception:
                pass
        if os.path.exists(self.file):
            os.remove(self.file)
        if not self.local:
            fileio.remove(self.tmp)


def _output_columns(batch: Batch, scores: np.ndarray, row0: int, fmt: str,
                    label_name: str) -> dict[str, np.ndarray]:
    ids = np.arange(row0, row0 + scores.shape[0], dtype=np.int64)
    if fmt == "challenge":
        return {CHALLENGE_COLUMNS[0]: ids, CHALLENGE_COLUMNS[1]: scores}
    cols = {ROW_COLUMN: ids}
    cols.update(batch.meta)
    if batch.label is not None:
        cols[label_name] = batch.label
    cols[SCORE_COLUMN] = scores
    return cols


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------


def score(saved_model: str, input_pattern: str, output: str | None = None, *, fmt: str = "parquet",
          batch_size: int = DEFAULT_BATCH_SIZE, progress_every_s: float = 10.0,
          log=None, overwrite: bool = False, raw_ids: bool = False) -> dict:
    """Scores every row of ``input_pattern`` with the SavedModel; see the module docstring.

    Args:
        saved_model: a version directory or an export base.
        input_pattern: a parquet or TFRecord file, or a glob of them.
        output: where to write the scores (``fmt``); ``None`` writes nothing.
        fmt: ``"parquet"``, ``"csv"`` or ``"challenge"``.
        batch_size: rows per batch.
        progress_every_s: seconds between progress lines on ``log``.
        log: a callable taking one line; default: print to stderr.
        overwrite: replace an existing ``output`` (never one of the inputs).
        raw_ids: the input holds raw ids (parquet or JSON lines), scored
            through the export's ``serving_raw`` signature.

    Returns:
        ``{"num_rows", "saved_model", "scores"}`` plus, for labelled input, the
        metrics of :func:`qin_tf.metrics.evaluate` (``auc``, ``logloss``, ...).
        ``scores`` is the float32 array of all scores.
    """
    import tensorflow as tf

    from qin_tf import metrics

    if fmt not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}. Received: format={fmt!r}")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={batch_size}")
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    files, kind = input_files(input_pattern, raw_ids)
    if output:
        check_output(output, files, overwrite=overwrite, saved_model=saved_model)
    loaded, spec, version_dir = load_export(saved_model)
    serve_examples = loaded.signatures["predict_examples"]
    if raw_ids:
        if RAW_SIGNATURE not in loaded.signatures:
            fail(version_dir, None, None, f"this export has no `{RAW_SIGNATURE}` signature (its feature spec "
                                          "has no vocabularies); score dense ids without --raw_ids")
        serve = loaded.signatures[RAW_SIGNATURE]
        batches = iter_raw(files, kind, spec, batch_size)
    else:
        serve = loaded.signatures["serving_default"]
        batches = (iter_parquet(files, spec, batch_size) if kind == "parquet"
                   else iter_tfrecord(files, spec, batch_size))

    writer = ScoreWriter(output, fmt) if output else None
    all_scores, labels, groups = [], [], []
    labelled = None
    group_name = spec.meta[0] if spec.meta else None
    n, start, last_log = 0, time.monotonic(), time.monotonic()
    try:
        for batch in batches:
            if batch.examples is not None:
                try:
                    out = serve_examples(examples=batch.examples)["ctr"]
                except tf.errors.InvalidArgumentError:
                    bad = _find_bad_record(batch.examples.numpy(), _model_parse_spec(spec))
                    if bad is None:
                        raise
                    fail(batch.source, batch.first_row + bad[0], None, bad[1])
            else:
                try:
                    out = serve(**{k: tf.constant(v) for k, v in batch.features.items()})["ctr"]
                except (tf.errors.OpError, TypeError, ValueError) as e:  # the graph's own checks
                    last = batch.first_row + batch.num_rows - 1
                    fail(batch.source, None, None, f"rows {batch.first_row}..{last}: the model refused "
                                                   f"them: {tf_error_text(e)}")
            scores = out.numpy().astype(np.float32).reshape(-1)
            if labelled is None:
                labelled = batch.label is not None
            elif labelled != (batch.label is not None):
                fail(batch.source, None, spec.label, "this input lacks the label column that the "
                                                     "inputs before it have (or the other way round)")
            if labelled:
                labels.append(batch.label)
                if group_name is not None and group_name in batch.meta:
                    groups.append(batch.meta[group_name])
            if writer is not None:
                writer.write(_output_columns(batch, scores, n, fmt, spec.label))
            all_scores.append(scores)
            n += scores.shape[0]
            now = time.monotonic()
            if now - last_log >= progress_every_s:
                log(f"scored {n:,} rows ({n / (now - start):,.0f} rows/s), at {batch.source}")
                last_log = now
        if n == 0:
            fail(input_pattern, None, None, "no rows to score")
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    elapsed = time.monotonic() - start
    log(f"scored {n:,} rows in {elapsed:.2f} s ({n / elapsed:,.0f} rows/s) with {version_dir}")
    result = {"num_rows": n, "saved_model": version_dir, "scores": np.concatenate(all_scores)}
    if labelled:
        y = np.concatenate(labels)
        g = np.concatenate(groups) if groups and len(groups) == len(labels) else None
        try:
            result.update(metrics.evaluate(y, result["scores"], g))
        except ValueError as e:  # e.g. one class only: AUC undefined; the scores stand
            log(f"no metrics: {e}")
    return result


def _model_parse_spec(spec: FeatureSpec) -> dict:
    from qin_tf.data import example_parse_spec

    return example_parse_spec(spec, labelled=False, with_meta=False)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv):
    del argv
    import tensorflow as tf
    from absl import flags

    FLAGS = flags.FLAGS
    try:
        result = score(FLAGS.saved_model, FLAGS.input, FLAGS.output, fmt=FLAGS.format,
                       batch_size=FLAGS.batch_size, overwrite=FLAGS.overwrite, raw_ids=FLAGS.raw_ids)
    except (InputError, FileNotFoundError) as e:
        sys.exit(f"score: error: {one_line(e)}")
    except tf.errors.OpError as e:  # a TensorFlow filesystem's error (gs://: permission, network)
        sys.exit(f"score: error: {tf_error_text(e)}")
    summary = {k: v for k, v in result.items() if k != "scores"}
    if FLAGS.output:
        summary["output"] = FLAGS.output
    if "auc" in result:
        print(f"AUC {result['auc']:.4f}  logloss {result['logloss']:.4f}"
              + (f"  gAUC {result['gauc']:.4f}" if "gauc" in result else "")
              + f"  ({result['num_examples']:,} rows)")
    print(json.dumps(summary, sort_keys=True))


def _define_flags():
    from absl import flags

    flags.DEFINE_string("saved_model", None, "Version directory written by export.exporter, or the "
                        "export base (newest version).", required=True)
    flags.DEFINE_string("input", None, "Parquet (MMCTR layout) or TFRecord file, or a glob.", required=True)
    flags.DEFINE_string("output", None, "Where to write the scores; none: only metrics are printed.")
    flags.DEFINE_enum("format", "parquet", FORMATS, "Output format: parquet or csv (one row per input row), or "
                      "challenge (the MMCTR submission CSV with the columns ID,Task2).")
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Rows per batch.", lower_bound=1)
    flags.DEFINE_boolean("raw_ids", False, "The input (parquet or JSON lines) holds ids as the log had them; "
                         "score it through the export's serving_raw signature.")
    flags.DEFINE_boolean("overwrite", False, "Replace an existing --output (never one of the inputs).")


if __name__ == "__main__":
    from qin_tf.runtime import run_app

    _define_flags()
    run_app(main, tensorflow=True)
