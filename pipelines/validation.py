"""Input checks of the preprocessing pipeline, vectorised over Arrow batches.

The row contract (the error naming file, row and column, the reasons, the
column kinds, :func:`convert_batch`) lives in :mod:`qin_tf.rows`, shared with
the serving side, and is re-exported here; this module keeps the item
table's rules and the Beam error plumbing.

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
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from qin_tf.rows import (FLOAT_LIST, INT, INT_LIST, NEGATIVE_ID, NULL, check_columns, fail, is_float_list_type,
                         is_int_list_type, is_int_type)
from qin_tf.spec import negative_ids

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


