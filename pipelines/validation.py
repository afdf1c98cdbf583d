"""Input checks of the preprocessing pipeline, vectorised over Arrow batches.

Two levels of problems:

* **Schema-level** (a missing column or file, a column of the wrong type, a
  bad item table): the input cannot be read as configured. Always an error,
  whatever ``--on_bad_row`` says; raised before the Beam pipeline starts.
* **Row-level** (a null, a negative id, a target or history item beyond the
  item table, the padding id 0 as target, a label other than 0/1): the row
  is rejected. ``on_bad_row="fail"`` stops with the first such row (in file
  order); ``"quarantine"`` writes it with its reason to a side file and
  keeps the good rows.

Every message names the file, the 0-based row index in that file and the
column, e.g. ``train.parquet: row 17, column `label`: label must be 0 or 1,
got 2``. A row with several problems is reported once, for the first column
in the order label, meta, target item, sequence, context.

Item table rules (``item_info.parquet``): row ``i`` holds item ``i``, so the
ids must be exactly ``0..N-1``; a table whose ids are exactly ``1..N`` (no
padding row) gets an all-zero padding row 0 prepended. Row 0 is padding:
whatever it holds is replaced by zeros (``stats.json`` says whether it held
anything). Every row has the same number of tags (>= 1, ids >= 0) and the
same embedding width (>= 1, finite floats); no nulls; at least one item
besides the padding row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import re
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qin_tf.spec import left_pad_recent, negative_ids  # noqa: F401  (the spec's rules; re-exported)

#: Row-level rejection reasons (the keys counted in ``stats.json``).
NULL = "null"
#: Not a row's fault but the file's: bytes that do not decode (always an error).
CORRUPT = "corrupt"
NEGATIVE_ID = "negative_id"
PADDING_TARGET = "padding_target"
ITEM_OUT_OF_RANGE = "item_out_of_range"
BAD_LABEL = "bad_label"
REASONS = (NULL, NEGATIVE_ID, PADDING_TARGET, ITEM_OUT_OF_RANGE, BAD_LABEL)


class PreprocessError(ValueError):
    """The input cannot be converted; the message names file, row and column."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 column: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.file, self.row, self.column, self.reason = file, row, column, reason


def where(file: str, row: int | None = None, column: str | None = None) -> str:
    """``"file: row r, column `c`"``, with the parts that are known."""
    rest = ([f"row {row}"] if row is not None else []) + ([f"column `{column}`"] if column else [])
    return file + (": " + ", ".join(rest) if rest else "")


def fail(file: str, row: int | None, column: str | None, text: str, reason: str | None = None):
    raise PreprocessError(f"{where(file, row, column)}: {text}", file=file, row=row,
                          column=column, reason=reason)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (Arrow's and TensorFlow's span several)."""
    return " ".join(str(e).split())


#: Beam's note on the step a worker's error came from (``... [while running 'MakeExamples']``).
_WHILE_RUNNING = re.compile(r"( \[while running '[^']*'\])+$")


def unwrap_beam_error(e: BaseException, classes: Sequence[type]) -> BaseException | None:
    """The project's own error that a Beam worker raised, rebuilt from the runner's wrapper, or None.

    A runner (Beam's in-process FnApiRunner among them) reports an error
    raised in a worker as a ``RuntimeError`` whose text is the worker's whole
    traceback, ending ``pipelines.validation.PreprocessError: <message>
    [while running '<step>']``; the exception object itself does not travel.
    This finds the last such line for one of ``classes`` (matched by
    name) and returns ``cls(message)``, without Beam's step note, so the
    user sees the same one line as when the check runs in the launching
    process.

    >>> e = RuntimeError("Traceback ...\\npipelines.validation.PreprocessError: f: row 1: bad [while running 'X']")
    >>> str(unwrap_beam_error(e, [PreprocessError]))
    'f: row 1: bad'
    """
    if isinstance(e, tuple(classes)):
        return e
    text = str(e)
    found = None
    for cls in classes:
        for m in re.finditer(rf"^(?:[\w.]+\.)?{re.escape(cls.__qualname__)}: (.+)$", text, re.M):
            if found is None or m.start() > found[0]:
                found = (m.start(), cls, _WHILE_RUNNING.sub("", m.group(1)).strip())
    return None if found is None else found[1](found[2])


@contextlib.contextmanager
def beam_worker_errors_unlogged():
    """Keeps Beam's runner from printing a worker's error with its traceback while a pipeline runs.

    The in-process runner prints what a worker raised to ``sys.stderr`` and logs
    it (``bundle_processor``, at ERROR), the whole traceback each time, before
    it re-raises it; the launcher reports it as one line
    (:func:`unwrap_beam_error`). So while the pipeline runs, ``sys.stderr`` is
    set aside and the runner's log keeps CRITICAL only; ``QIN_TF_VERBOSE=1``
    keeps both.
    """
    if os.environ.get("QIN_TF_VERBOSE"):
        yield
        return
    log = logging.getLogger("apache_beam.runners")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def beam_failure(e: BaseException) -> str:
    """One line for a Beam pipeline's failure that is none of the project's own errors: the worker's
    last exception line (``TypeError: ...``) without the traceback and Beam's step note."""
    lines = [x for x in str(e).splitlines() if x.strip() and not x.startswith(" ")]
    last = lines[-1] if lines else type(e).__name__
    return f"the Beam pipeline failed: {_WHILE_RUNNING.sub('', last).strip()}"


def iter_row_groups(pf, file: str, columns: Sequence[str], batch_size: int,
                    row_groups: Sequence[int] | None = None, use_threads: bool = True,
                    ) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Yields ``(file row of the batch's first row, batch)`` of a ``pyarrow.parquet.ParquetFile``.

    Reads one row group at a time (all of them, or ``row_groups``), so that
    bytes that do not decode are reported with the row group and its rows:
    ``train.parquet: row group 3 (rows 300..399): corrupt parquet (...)``.

    Raises:
        PreprocessError: ``reason="corrupt"``, ``row`` = the first row of the row group.
    """
    md = pf.metadata
    starts = np.concatenate([[0], np.cumsum([md.row_group(g).num_rows for g in range(md.num_row_groups)])])
    for g in range(md.num_row_groups) if row_groups is None else row_groups:
        row = int(starts[g])
        batches = pf.iter_batches(batch_size=batch_size, row_groups=[g], columns=list(columns),
                                  use_threads=use_threads)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as e:
                raise PreprocessError(f"{file}: row group {g} (rows {int(starts[g])}..{int(starts[g + 1]) - 1}): "
                                      f"corrupt parquet ({one_line(e)})", file=file, row=int(starts[g]),
                                      reason=CORRUPT) from None
            yield row, batch
            row += batch.num_rows


# --------------------------------------------------------------------------
# Schema-level checks
# --------------------------------------------------------------------------


def is_int_type(t: pa.DataType) -> bool:
    """Signed integers and unsigned ones that fit int64."""
    return pa.types.is_integer(t) and not pa.types.is_uint64(t)


def _list_value_type(t: pa.DataType) -> pa.DataType | None:
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return t.value_type
    return None


def is_int_list_type(t: pa.DataType) -> bool:
    v = _list_value_type(t)
    return v is not None and is_int_type(v)


def is_float_list_type(t: pa.DataType) -> bool:
    v = _list_value_type(t)
    return v is not None and pa.types.is_floating(v)


def check_columns(file: str, schema: pa.Schema, expected: dict[str, tuple[str, Callable[[pa.DataType], bool], str]]):
    """Checks that ``schema`` has every column of ``expected`` with an accepted type.

    Args:
        expected: column -> (role, type predicate, description of the type).
    """
    names = schema.names
    for column, (role, ok, kind) in expected.items():
        if column not in names:
            fail(file, None, column, f"missing column (the dataset config names it as the {role}); "
                                     f"the file has columns {names}")
        t = schema.field(column).type
        if not ok(t):
            fail(file, None, column, f"has type {t}; expected {kind}")


INT = "an integer type (int8..int64, uint8..uint32)"
INT_LIST = "a list of integers"
FLOAT_LIST = "a list of floats"


def split_columns(cfg, labelled: bool) -> dict[str, tuple[str, Callable, str]]:
    """The columns a split must have, with their roles and types, in spec order."""
    cols: dict[str, tuple[str, Callable, str]] = {}
    if labelled:
        cols[cfg.label] = ("label", is_int_type, INT)
    for m in cfg.meta:
        cols[m] = ("meta column", is_int_type, INT)
    cols[cfg.target_item] = ("target item", is_int_type, INT)
    cols[cfg.sequence] = ("behaviour sequence", is_int_list_type, INT_LIST)
    for c in cfg.context:
        cols[c] = ("context feature", is_int_type, INT)
    return cols


# --------------------------------------------------------------------------
# Item table
# --------------------------------------------------------------------------


@dataclasses.dataclass
class ItemTable:
    """The validated item table: row ``i`` is item ``i``; row 0 is padding (zeros)."""

    tags: np.ndarray  # int32 [num_items, num_tags]
    embedding: np.ndarray  # float32 [num_items, mm_dim]
    rows_in: int  # rows of the parquet file
    padding_row_added: bool  # the file's ids were 1..N; row 0 was prepended
    padding_row_zeroed: bool  # the file's row 0 held non-zero values, now zeros

    @property
    def num_items(self) -> int:
        return self.tags.shape[0]

    @property
    def tag_vocab_size(self) -> int:
        return int(self.tags.max()) + 1 if self.tags.size else 1


def _fixed_width(file: str, column: str, arr: pa.Array, what: str) -> tuple[np.ndarray, int]:
    """Flattens a list column whose rows all have the same width, or fails at the first odd row."""
    if arr.null_count:
        fail(file, int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0]), column, "null value",
             NULL)
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    values = arr.flatten()
    if values.null_count:
        bad = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        row = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        fail(file, row, column, "null value inside the list", NULL)
    widths, counts = np.unique(lengths, return_counts=True)
    width = int(widths[np.argmax(counts)])
    if len(widths) > 1:
        row = int(np.flatnonzero(lengths != width)[0])
        fail(file, row, column, f"has {lengths[row]} {what}, but most rows have {width}; "
                                f"every row must have the same number")
    if width < 1:
        fail(file, 0, column, f"rows have no {what}; at least one is needed")
    return values.to_numpy(zero_copy_only=False).reshape(len(arr), width), width


def item_table_columns(cfg) -> dict[str, tuple[str, Callable, str]]:
    """The item table's columns (``cfg``: an ItemTableConfig), with roles and types."""
    return {
        cfg.id: ("item id", is_int_type, INT),
        cfg.tags: ("item tags", is_int_list_type, INT_LIST),
        cfg.embedding: ("item embedding", is_float_list_type, FLOAT_LIST),
    }


def read_item_table(file: str, table: pa.Table, cfg) -> ItemTable:
    """Validates the item table read from ``file`` (columns named by ``cfg``, an ItemTableConfig)."""
    check_columns(file, table.schema, item_table_columns(cfg))
    n = table.num_rows
    if n == 0:
        fail(file, None, None, "the item table is empty")
    ids_arr = table[cfg.id].combine_chunks()
    if ids_arr.null_count:
        fail(file, int(np.flatnonzero(ids_arr.is_null().to_numpy(zero_copy_only=False))[0]), cfg.id,
             "null value", NULL)
    ids = ids_arr.cast(pa.int64()).to_numpy()
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if dup.size:
        rows = order[dup + 1]
        row = int(rows.min())
        first = int(order[np.searchsorted(ids[order], ids[row])])
        fail(file, row, cfg.id, f"duplicate item id {ids[row]} (also at row {first}); item ids must be unique")
    offset = 1 if ids[0] == 1 else 0
    bad = np.flatnonzero(ids != np.arange(n) + offset)
    if bad.size:
        row = int(bad[0])
        fail(file, row, cfg.id, f"expected item id {row + offset}, found {ids[row]}: row i must hold item i "
                                f"(ids 0..N-1 with row 0 the padding row, or 1..N without it)")
    if n + offset < 2:
        fail(file, None, None, "the item table has no items besides the padding row 0")

    tags, _ = _fixed_width(file, cfg.tags, table[cfg.tags].combine_chunks(), "tags")
    neg = np.flatnonzero(negative_ids(tags).any(axis=1))
    if neg.size:
        row = int(neg[0])
        fail(file, row, cfg.tags, f"negative tag id {int(tags[row].min())}", NEGATIVE_ID)
    if tags.max(initial=0) > np.iinfo(np.int32).max:
        row = int(np.flatnonzero(tags.max(axis=1) > np.iinfo(np.int32).max)[0])
        fail(file, row, cfg.tags, f"tag id {int(tags[row].max())} does not fit int32")
    emb, _ = _fixed_width(file, cfg.embedding, table[cfg.embedding].combine_chunks(), "embedding values")
    nonfinite = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if nonfinite.size:
        fail(file, int(nonfinite[0]), cfg.embedding, "non-finite embedding value (nan or inf)")
    tags = tags.astype(np.int32)
    emb = emb.astype(np.float32)
    zeroed = False
    if offset:
        tags = np.concatenate([np.zeros_like(tags[:1]), tags])
        emb = np.concatenate([np.zeros_like(emb[:1]), emb])
    elif tags[0].any() or emb[0].any():
        tags[0] = 0
        emb[0] = 0
        zeroed = True
    return ItemTable(tags=tags, embedding=emb, rows_in=n, padding_row_added=bool(offset),
                     padding_row_zeroed=zeroed)


# --------------------------------------------------------------------------
# Row-level checks and conversion of one Arrow batch
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Columns:
    """The roles of a split's columns, as the workers need them (picklable)."""

    label: str | None  # None: an unlabelled split
    meta: tuple[str, ...]
    target_item: str
    sequence: str
    context: tuple[str, ...]

    @property
    def all(self) -> tuple[str, ...]:
        head = (self.label,) if self.label else ()
        return (*head, *self.meta, self.target_item, self.sequence, *self.context)


@dataclasses.dataclass
class BadRow:
    row: int  # 0-based row index in the file
    column: str
    reason: str
    text: str
    values: dict[str, Any]  # the row's original values of the split's columns

    def message(self, file: str) -> str:
        return f"{where(file, self.row, self.column)}: {self.text}"


@dataclasses.dataclass
class Converted:
    """The good rows of a batch, as arrays, and the bad rows."""

    features: dict[str, np.ndarray]  # column -> int64 [m] or [m, max_len]
    seq_lengths: np.ndarray  # non-zero history items of each good row, before truncation
    bad: list[BadRow]

    @property
    def num_rows(self) -> int:
        return len(self.seq_lengths)


def _ints(arr: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """int64 values (nulls as 0) and the null mask (None when there are none)."""
    nulls = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else None
    if arr.null_count:
        arr = arr.fill_null(0)
    return arr.cast(pa.int64()).to_numpy(zero_copy_only=False), nulls


def convert_batch(batch: pa.RecordBatch, first_row: int, cols: Columns, num_items: int,
                  max_len: int) -> Converted:
    """Checks a batch of rows and returns the good ones as id arrays.

    Args:
        batch: rows ``first_row, first_row + 1, ...`` of a split file.
        cols: the roles of the columns.
        num_items: rows of the item table; item ids must be in ``[1, num_items)``
            for the target and ``[0, num_items)`` in the history.
        max_len: length of the history matrix.
    """
    n = batch.num_rows
    problem = np.full(n, -1, dtype=np.int32)
    found: list[tuple[str, str, Callable[[int], str]]] = []

    def flag(mask, column, reason, text):
        new = mask & (problem < 0)
        if new.any():
            problem[new] = len(found)
            found.append((column, reason, text))

    scalars: dict[str, np.ndarray] = {}

    def scalar(column: str, label: bool = False, target: bool = False):
        v, nulls = _ints(batch.column(column))
        scalars[column] = v
        if nulls is not None:
            flag(nulls, column, NULL, lambda i: "null value")
        if label:
            flag((v != 0) & (v != 1), column, BAD_LABEL, lambda i: f"label must be 0 or 1, got {v[i]}")
            return
        flag(negative_ids(v), column, NEGATIVE_ID, lambda i: f"negative id {v[i]}")
        if target:
            flag(v == 0, column, PADDING_TARGET, lambda i: "target item id is 0, the padding id")
            flag(v >= num_items, column, ITEM_OUT_OF_RANGE,
                 lambda i: f"item id {v[i]} is beyond the item table (num_items={num_items})")

    if cols.label:
        scalar(cols.label, label=True)
    for m in cols.meta:
        scalar(m)
    scalar(cols.target_item, target=True)

    # The behaviour sequence: checked per element, reported per row.
    seq = batch.column(cols.sequence)
    if seq.null_count:
        null_rows = seq.is_null().to_numpy(zero_copy_only=False)
        flag(null_rows, cols.sequence, NULL, lambda i: "null value")
    lengths = pc.list_value_length(seq).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat, elem_nulls = _ints(seq.flatten())
    parent = np.repeat(np.arange(n, dtype=np.int64), lengths)
    starts = np.cumsum(lengths) - lengths

    def element_check(bad_elems, reason, describe):
        if not bad_elems.any():
            return
        idx = np.flatnonzero(bad_elems)
        rows, first = np.unique(parent[idx], return_index=True)
        first_elem = dict(zip(rows.tolist(), idx[first].tolist()))
        mask = np.zeros(n, dtype=bool)
        mask[rows] = True
        flag(mask, cols.sequence, reason,
             lambda i: describe(first_elem[i] - starts[i], flat[first_elem[i]]))

    if elem_nulls is not None:
        element_check(elem_nulls, NULL, lambda p, x: f"null value at position {p} of the list")
    element_check(negative_ids(flat), NEGATIVE_ID, lambda p, x: f"negative item id {x} at position {p} of the list")
    element_check(flat >= num_items, ITEM_OUT_OF_RANGE,
                  lambda p, x: f"item id {x} at position {p} of the list is beyond the item table "
                               f"(num_items={num_items})")
    for c in cols.context:
        scalar(c)

    bad: list[BadRow] = []
    if found:
        names = list(cols.all)
        for i in np.flatnonzero(problem >= 0).tolist():
            column, reason, text = found[problem[i]]
            values = {c: batch.column(c)[i].as_py() for c in names}
            bad.append(BadRow(row=first_row + i, column=column, reason=reason, text=text(i), values=values))

    good = problem < 0
    all_good = bool(good.all())
    keep_rows = None if all_good else np.flatnonzero(good)
    if all_good:
        history, counts = left_pad_recent(flat, parent, n, max_len)
    else:
        # Build the history of the good rows only, re-numbering them 0..m-1.
        new_index = np.cumsum(good) - 1
        keep_elem = good[parent]
        history, counts = left_pad_recent(flat[keep_elem], new_index[parent[keep_elem]],
                                          len(keep_rows), max_len)
    features = {}
    for c in cols.all:
        if c == cols.sequence:
            features[c] = history
        else:
            features[c] = scalars[c] if all_good else scalars[c][keep_rows]
    return Converted(features=features, seq_lengths=counts, bad=bad)
