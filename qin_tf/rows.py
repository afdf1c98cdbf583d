"""The row contract: how a row of the logs is checked, converted and, when bad, reported.

Shared by the pipelines (``pipelines.preprocess``, ``pipelines.build_examples``)
and the serving side (``export.score``, ``export.client``), so a bad row gets
the same one line wherever it is read:

* :class:`PreprocessError` and :func:`fail`: the error that names the file,
  the 0-based row in that file and the column (:func:`where`), e.g.
  ``train.parquet: row 17, column `label`: label must be 0 or 1, got 2``;
  :func:`one_line` puts any exception's text on one line.
* The row-level rejection reasons (:data:`NULL`, :data:`NEGATIVE_ID`,
  :data:`PADDING_TARGET`, :data:`ITEM_OUT_OF_RANGE`, :data:`BAD_LABEL`; and
  :data:`CORRUPT`, the file's fault), the keys counted in ``stats.json``.
* Column kinds (:data:`INT`, :data:`INT_LIST`, :data:`FLOAT_LIST`) and
  :func:`check_columns`; :func:`split_columns`, the columns of a split.
* :class:`Columns`, :func:`convert_batch` (a batch of rows -> the good rows
  as id arrays, :class:`Converted`, and the :class:`BadRow` s) and
  :func:`iter_row_groups` (a parquet file read one row group at a time, a
  corrupt one named).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qin_tf.spec import left_pad_recent, negative_ids

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
# Column kinds
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


class _Problems:
    """The first problem of each row of a batch: ``problem[i]`` indexes ``found`` (-1: none yet)."""

    def __init__(self, n: int):
        self.problem = np.full(n, -1, dtype=np.int32)
        self.found: list[tuple[str, str, Callable[[int], str]]] = []

    def flag(self, mask: np.ndarray, column: str, reason: str, text: Callable[[int], str]) -> None:
        """Marks the rows of ``mask`` that have no problem yet with this one."""
        new = mask & (self.problem < 0)
        if new.any():
            self.problem[new] = len(self.found)
            self.found.append((column, reason, text))


def _check_scalar(batch: pa.RecordBatch, column: str, problems: _Problems, num_items: int, *,
                  label: bool = False, target: bool = False) -> np.ndarray:
    """Checks one integer column (a label, a meta column, the target item, a context feature); its int64 values."""
    v, nulls = _ints(batch.column(column))
    if nulls is not None:
        problems.flag(nulls, column, NULL, lambda i: "null value")
    if label:
        problems.flag((v != 0) & (v != 1), column, BAD_LABEL, lambda i: f"label must be 0 or 1, got {v[i]}")
        return v
    problems.flag(negative_ids(v), column, NEGATIVE_ID, lambda i: f"negative id {v[i]}")
    if target:
        problems.flag(v == 0, column, PADDING_TARGET, lambda i: "target item id is 0, the padding id")
        problems.flag(v >= num_items, column, ITEM_OUT_OF_RANGE,
                      lambda i: f"item id {v[i]} is beyond the item table (num_items={num_items})")
    return v


def _check_sequence(batch: pa.RecordBatch, column: str, problems: _Problems,
                    num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Checks the behaviour sequence per element, reported per row; ``(flat item ids, row of each)``."""
    n = batch.num_rows
    seq = batch.column(column)
    if seq.null_count:
        null_rows = seq.is_null().to_numpy(zero_copy_only=False)
        problems.flag(null_rows, column, NULL, lambda i: "null value")
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
        problems.flag(mask, column, reason, lambda i: describe(first_elem[i] - starts[i], flat[first_elem[i]]))

    if elem_nulls is not None:
        element_check(elem_nulls, NULL, lambda p, x: f"null value at position {p} of the list")
    element_check(negative_ids(flat), NEGATIVE_ID, lambda p, x: f"negative item id {x} at position {p} of the list")
    element_check(flat >= num_items, ITEM_OUT_OF_RANGE,
                  lambda p, x: f"item id {x} at position {p} of the list is beyond the item table "
                               f"(num_items={num_items})")
    return flat, parent


def _bad_rows(batch: pa.RecordBatch, first_row: int, cols: Columns, problems: _Problems) -> list[BadRow]:
    """The rows with a problem, each with its first problem and its original values."""
    bad: list[BadRow] = []
    if problems.found:
        names = list(cols.all)
        for i in np.flatnonzero(problems.problem >= 0).tolist():
            column, reason, text = problems.found[problems.problem[i]]
            values = {c: batch.column(c)[i].as_py() for c in names}
            bad.append(BadRow(row=first_row + i, column=column, reason=reason, text=text(i), values=values))
    return bad


def _good_rows(scalars: dict[str, np.ndarray], flat: np.ndarray, parent: np.ndarray, good: np.ndarray,
               cols: Columns, max_len: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The good rows' columns as arrays (the history ``[m, max_len]``) and their history lengths."""
    n = good.shape[0]
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
    return features, counts


def convert_batch(batch: pa.RecordBatch, first_row: int, cols: Columns, num_items: int,
                  max_len: int) -> Converted:
    """Checks a batch of rows and returns the good ones as id arrays.

    A row with several problems is reported once, for the first column in the
    order label, meta, target item, sequence, context.

    Args:
        batch: rows ``first_row, first_row + 1, ...`` of a split file.
        cols: the roles of the columns.
        num_items: rows of the item table; item ids must be in ``[1, num_items)``
            for the target and ``[0, num_items)`` in the history.
        max_len: length of the history matrix.
    """
    problems = _Problems(batch.num_rows)
    scalars: dict[str, np.ndarray] = {}
    if cols.label:
        scalars[cols.label] = _check_scalar(batch, cols.label, problems, num_items, label=True)
    for m in cols.meta:
        scalars[m] = _check_scalar(batch, m, problems, num_items)
    scalars[cols.target_item] = _check_scalar(batch, cols.target_item, problems, num_items, target=True)
    flat, parent = _check_sequence(batch, cols.sequence, problems, num_items)
    for c in cols.context:
        scalars[c] = _check_scalar(batch, c, problems, num_items)
    bad = _bad_rows(batch, first_row, cols, problems)
    features, counts = _good_rows(scalars, flat, parent, problems.problem < 0, cols, max_len)
    return Converted(features=features, seq_lengths=counts, bad=bad)
