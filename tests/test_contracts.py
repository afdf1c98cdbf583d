"""The shared contracts (issue 21): one home each, the same objects everywhere.

* ``qin_tf.rows``: the row contract; ``pipelines.validation`` re-exports the
  same objects (one error class, one ``convert_batch``).
* ``qin_tf.signatures``: one set of input suffixes for batch scoring and the
  client (``.ndjson`` is JSON lines for both).
* ``qin_tf.cli``: one TensorFlow-error translator, one ``<tool>: error:`` exit.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from qin_tf import rows, signatures
from qin_tf.cli import error_line, exit_error


def test_the_row_contract_has_one_home():
    """pipelines.validation keeps the item-table rules; what it uses of the row contract is qin_tf.rows' own
    objects (no copy), and the rest it does not carry at all (importers take it from qin_tf.rows)."""
    from pipelines import validation

    for name in ("PreprocessError", "fail", "where", "one_line", "convert_batch", "Columns", "check_columns",
                 "iter_row_groups", "split_columns", "INT", "INT_LIST", "FLOAT_LIST", "NULL", "CORRUPT"):
        assert not hasattr(validation, name) or getattr(validation, name) is getattr(rows, name), name
    assert not hasattr(validation, "PreprocessError") and not hasattr(validation, "convert_batch")


def test_convert_batch_keeps_good_rows_and_names_each_bad_rows_first_problem():
    cols = rows.Columns(label="label", meta=("user_id",), target_item="item_id", sequence="item_seq",
                        context=("views_level",))
    batch = pa.RecordBatch.from_pydict({
        "label": [1, 0, 2, 1, 0],
        "user_id": [7, 8, 9, -1, 10],
        "item_id": [3, 0, 4, 5, 6],
        "item_seq": [[1, 2, 0, 4], [2], [9, 1], [1], [3, 99, 1]],
        "views_level": [1, 2, 3, 4, 5],
    })
    conv = rows.convert_batch(batch, 100, cols, num_items=10, max_len=3)
    assert [(b.row, b.column, b.reason, b.text) for b in conv.bad] == [
        (101, "item_id", rows.PADDING_TARGET, "target item id is 0, the padding id"),
        (102, "label", rows.BAD_LABEL, "label must be 0 or 1, got 2"),
        (103, "user_id", rows.NEGATIVE_ID, "negative id -1"),
        (104, "item_seq", rows.ITEM_OUT_OF_RANGE,
         "item id 99 at position 1 of the list is beyond the item table (num_items=10)")]
    np.testing.assert_array_equal(conv.features["item_seq"], [[1, 2, 4]])
    np.testing.assert_array_equal(conv.features["item_id"], [3])
    np.testing.assert_array_equal(conv.seq_lengths, [3])


def test_score_and_client_take_the_same_suffixes(tmp_path):
    from export import readers

    path = tmp_path / "rows.ndjson"
    path.write_text("{}\n")
    assert readers.input_files(str(path), raw_ids=True) == ([str(path)], "jsonl")
    assert ".ndjson" in signatures.JSONL_SUFFIXES
    with pytest.raises(rows.PreprocessError, match=r"unknown input type; expected parquet \(\.parquet, \.pq\) "
                                                   r"or JSON lines \(\.jsonl, \.json, \.ndjson\) with --raw_ids"):
        readers.input_files(_touch(tmp_path / "x.txt"), raw_ids=True)


def _touch(path) -> str:
    path.write_text("")
    return str(path)


def test_error_line_is_one_plain_line_for_every_kind_of_error():
    message = ("Graph execution error:\n\nDetected at node x defined at (most recent call last):\n"
               "  File \"a.py\", line 3, in f\n\n{{function_node __inference_serve_1}} indices[0] = 5 is not in "
               "[0, 1)\n\t [[{{node GatherV2}}]] [Op:__inference_serve_9] name: ")
    assert error_line(message) == "indices[0] = 5 is not in [0, 1)"
    assert error_line(ValueError("a.parquet: row 3, column `x`: null value")) == \
        "a.parquet: row 3, column `x`: null value"
    assert error_line(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")) == \
        "the input holds bytes that are not a serialized tf.train.Example."
    assert error_line("") == "error" and error_line(KeyError()) == "KeyError"


def test_exit_error_is_the_tools_one_line():
    with pytest.raises(SystemExit) as e:
        exit_error("score", ValueError("{{function_node f}} bad id\n\t [[{{node Lookup}}]]"))
    assert e.value.code == "score: error: bad id"
