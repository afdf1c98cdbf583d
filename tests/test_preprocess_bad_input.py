"""pipelines.preprocess on bad input: every class, in both --on_bad_row modes.

Row-level problems: ``fail`` stops with an error naming file, row and column
and leaves no output; ``quarantine`` writes the good rows and sets the bad
one aside with its reason. Schema-level problems fail in both modes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import preprocess as pp
from qin_tf.rows import PreprocessError
from tests.test_preprocess import (CONFIG, NUM_ITEMS, SPLIT_SCHEMA, corrupt_row_group, good_rows, item_table,
                                   listing, read_split, row, siblings, split_table, write_dataset)

BAD_ROW = 2  # the bad row's index in train.parquet; with 2 shards it lies in the second one

ROW_CASES = {  # name: (changes to a good row, column, reason)
    "null_label": ({"label": None}, "label", "null"),
    "label_2": ({"label": 2}, "label", "bad_label"),
    "label_negative": ({"label": -1}, "label", "bad_label"),
    "null_user": ({"user_id": None}, "user_id", "null"),
    "negative_user": ({"user_id": -5}, "user_id", "negative_id"),
    "null_target": ({"item_id": None}, "item_id", "null"),
    "negative_target": ({"item_id": -1}, "item_id", "negative_id"),
    "padding_target": ({"item_id": 0}, "item_id", "padding_target"),
    "target_beyond_table": ({"item_id": NUM_ITEMS}, "item_id", "item_out_of_range"),
    "null_history": ({"item_seq": None}, "item_seq", "null"),
    "null_in_history": ({"item_seq": [1, None, 2]}, "item_seq", "null"),
    "negative_in_history": ({"item_seq": [1, -2]}, "item_seq", "negative_id"),
    "history_beyond_table": ({"item_seq": [0, 1, 2, NUM_ITEMS + 1]}, "item_seq", "item_out_of_range"),
    "null_context": ({"views_level": None}, "views_level", "null"),
    "negative_context": ({"likes_level": -3}, "likes_level", "negative_id"),
}


def _train_with_bad_row(changes: dict) -> list[dict]:
    rows = good_rows(5)
    rows[BAD_ROW] = {**rows[BAD_ROW], **changes}
    return rows


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_bad_row_fails_naming_file_row_and_column(tmp_path, case):
    changes, column, reason = ROW_CASES[case]
    input_dir, config = write_dataset(tmp_path, {"train": _train_with_bad_row(changes),
                                                 "valid": good_rows(3, 100), "test": good_rows(2, 200)})
    out = str(tmp_path / "out")
    with pytest.raises(PreprocessError) as err:
        pp.preprocess(input_dir, out, config, num_shards=2)
    train_file = os.path.join(input_dir, "train.parquet")
    assert str(err.value).startswith(f"{train_file}: row {BAD_ROW}, column `{column}`: ")
    assert (err.value.file, err.value.row, err.value.column, err.value.reason) == (train_file, BAD_ROW, column,
                                                                                   reason)
    assert not os.path.exists(out) and siblings(out) == []


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_bad_row_is_quarantined_and_the_rest_written(tmp_path, case):
    changes, column, reason = ROW_CASES[case]
    train = _train_with_bad_row(changes)
    input_dir, config = write_dataset(tmp_path, {"train": train, "valid": good_rows(3, 100),
                                                 "test": good_rows(2, 200)})
    out = str(tmp_path / "out")
    spec = pp.preprocess(input_dir, out, config, num_shards=2, on_bad_row="quarantine")

    kept = [r for i, r in enumerate(train) if i != BAD_ROW]
    got = read_split(spec, "train")
    assert got["user_id"].tolist() == [r["user_id"] for r in kept]
    assert got["label"].tolist() == [r["label"] for r in kept]
    assert spec.splits["train"].num_rows == 4 and spec.splits["valid"].num_rows == 3

    with open(os.path.join(out, "quarantine", "train.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 1
    q = lines[0]
    assert (q["file"], q["row"], q["column"], q["reason"]) == (os.path.join(input_dir, "train.parquet"),
                                                               BAD_ROW, column, reason)
    assert q["values"] == {k: train[BAD_ROW][k] for k in SPLIT_SCHEMA.names}
    assert q["message"]
    assert os.listdir(os.path.join(out, "quarantine")) == ["train.jsonl"]

    with open(os.path.join(out, "stats.json")) as f:
        stats = json.load(f)["splits"]
    assert (stats["train"]["rows_in"], stats["train"]["rows_out"], stats["train"]["rows_quarantined"]) == (5, 4, 1)
    assert stats["train"]["quarantine_reasons"] == {reason: 1}
    assert stats["train"]["quarantine_columns"] == {column: 1}
    assert stats["valid"]["rows_quarantined"] == 0 and stats["valid"]["quarantine_reasons"] == {}


def test_quarantine_counts_many_bad_rows_across_splits(tmp_path):
    train = good_rows(8)
    for i, name in ((0, "label_2"), (3, "padding_target"), (4, "label_2"), (7, "history_beyond_table")):
        train[i] = {**train[i], **ROW_CASES[name][0]}
    valid = good_rows(4, 100)
    valid[3] = {**valid[3], "item_id": -4, "label": 5}  # two problems: reported once, for the first column
    input_dir, config = write_dataset(tmp_path, {"train": train, "valid": valid, "test": good_rows(2, 200)})
    out = str(tmp_path / "out")
    spec = pp.preprocess(input_dir, out, config, num_shards=3, on_bad_row="quarantine")
    with open(os.path.join(out, "stats.json")) as f:
        stats = json.load(f)["splits"]
    assert stats["train"]["quarantine_reasons"] == {"bad_label": 2, "padding_target": 1, "item_out_of_range": 1}
    assert stats["valid"]["quarantine_reasons"] == {"bad_label": 1}
    with open(os.path.join(out, "quarantine", "train.jsonl")) as f:
        assert [json.loads(line)["row"] for line in f] == [0, 3, 4, 7]  # file order across shards
    assert read_split(spec, "train")["user_id"].tolist() == [train[i]["user_id"] for i in (1, 2, 5, 6)]
    assert spec.splits["valid"].num_rows == 3 and spec.splits["test"].num_rows == 2


def test_bad_row_found_late_keeps_the_previous_output(tmp_path):
    input_dir, config = write_dataset(tmp_path)
    out = str(tmp_path / "out")
    pp.preprocess(input_dir, out, config)
    before = listing(out)
    test = good_rows(4, 200)
    test[3] = {**test[3], "item_seq": [1, NUM_ITEMS]}  # the very last row of the last split
    write_dataset(tmp_path, {"test": test})
    with pytest.raises(PreprocessError, match=r"test\.parquet: row 3, column `item_seq`: item id 10 at position 1"):
        pp.preprocess(input_dir, out, config, num_shards=2)
    assert listing(out) == before and siblings(out) == []


def test_first_bad_row_in_file_order_is_reported(tmp_path):
    train = good_rows(9)
    train[8] = {**train[8], "label": 3}
    train[5] = {**train[5], "item_id": None}
    input_dir, config = write_dataset(tmp_path, {"train": train, "valid": good_rows(2, 100),
                                                 "test": good_rows(2, 200)})
    with pytest.raises(PreprocessError, match="row 5, column `item_id`: null value"):
        pp.preprocess(input_dir, str(tmp_path / "out"), config, num_shards=3)


# --------------------------------------------------------------------------
# Schema-level problems: fail in both modes, before anything is written
# --------------------------------------------------------------------------


def _with_column(table: pa.Table, name: str, array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, array)


def _train_table() -> pa.Table:
    return split_table(good_rows(4))


def _items_with(column: str, values) -> pa.Table:
    t = item_table()
    return _with_column(t, column, values)


def _tags_list():
    return item_table()["item_tags"].to_pylist()


def _emb_list():
    return item_table()["item_emb_d128"].to_pylist()


def _replace(lst, i, value):
    lst = list(lst)
    lst[i] = value
    return lst


SCHEMA_CASES = {  # name: (what to write, expected message fragment)
    "missing_context_column": (lambda: {"train": _train_table().drop_columns(["views_level"])},
                               "train.parquet: column `views_level`: missing column"),
    "missing_label_column": (lambda: {"valid": split_table(good_rows(2), labelled=False)},
                             "valid.parquet: column `label`: missing column"),
    "string_label": (lambda: {"train": _with_column(_train_table(), "label", pa.array(["1", "0", "1", "0"]))},
                     "train.parquet: column `label`: has type string; expected an integer type"),
    "float_target": (lambda: {"train": _with_column(_train_table(), "item_id", pa.array([1.0, 2.0, 3.0, 4.0]))},
                     "train.parquet: column `item_id`: has type double"),
    "history_not_a_list": (lambda: {"train": _with_column(_train_table(), "item_seq", pa.array([1, 2, 3, 4]))},
                           "train.parquet: column `item_seq`: has type int64; expected a list of integers"),
    "history_of_strings": (lambda: {"train": _with_column(_train_table(), "item_seq",
                                                          pa.array([["1"], [], ["2"], ["3"]]))},
                           "column `item_seq`: has type list<element: string>; expected a list of integers"),
    "uint64_meta": (lambda: {"train": _with_column(_train_table(), "user_id", pa.array([1, 2, 3, 4], pa.uint64()))},
                    "column `user_id`: has type uint64"),
    "empty_item_table": (lambda: {"items": item_table().slice(0, 0)}, "item_info.parquet: the item table is empty"),
    "only_padding_row": (lambda: {"items": item_table().slice(0, 1)},
                         "item_info.parquet: the item table has no items besides the padding row 0"),
    "duplicate_item_id": (lambda: {"items": _items_with("item_id", pa.array([0, 1, 2, 3, 4, 5, 3, 7, 8, 9]))},
                          "item_info.parquet: row 6, column `item_id`: duplicate item id 3 (also at row 3)"),
    "item_id_gap": (lambda: {"items": _items_with("item_id", pa.array([0, 1, 2, 3, 4, 5, 7, 8, 9, 10]))},
                    "item_info.parquet: row 6, column `item_id`: expected item id 6, found 7"),
    "null_item_id": (lambda: {"items": _items_with("item_id", pa.array([0, 1, None, 3, 4, 5, 6, 7, 8, 9],
                                                                       pa.int64()))},
                     "item_info.parquet: row 2, column `item_id`: null value"),
    "tag_width": (lambda: {"items": _items_with("item_tags", pa.array(_replace(_tags_list(), 4, [1, 2, 3])))},
                  "item_info.parquet: row 4, column `item_tags`: has 3 tags, but most rows have 2"),
    "embedding_width": (lambda: {"items": _items_with("item_emb_d128", pa.array(
        _replace(_emb_list(), 7, [1.0, 2.0]), pa.list_(pa.float32())))},
        "item_info.parquet: row 7, column `item_emb_d128`: has 2 embedding values, but most rows have 3"),
    "null_tags": (lambda: {"items": _items_with("item_tags", pa.array(_replace(_tags_list(), 5, None)))},
                  "item_info.parquet: row 5, column `item_tags`: null value"),
    "negative_tag": (lambda: {"items": _items_with("item_tags", pa.array(_replace(_tags_list(), 3, [1, -1])))},
                     "item_info.parquet: row 3, column `item_tags`: negative tag id -1"),
    "nan_embedding": (lambda: {"items": _items_with("item_emb_d128", pa.array(
        _replace(_emb_list(), 8, [1.0, float("nan"), 0.0]), pa.list_(pa.float32())))},
        "item_info.parquet: row 8, column `item_emb_d128`: non-finite embedding value"),
    "integer_embedding": (lambda: {"items": _items_with("item_emb_d128", pa.array([[1, 2, 3]] * NUM_ITEMS))},
                          "column `item_emb_d128`: has type list<element: int64>; expected a list of floats"),
    "missing_item_table_column": (lambda: {"items": item_table().drop_columns(["item_tags"])},
                                  "item_info.parquet: column `item_tags`: missing column"),
}


@pytest.mark.parametrize("mode", ["fail", "quarantine"])
@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_schema_problems_fail_in_both_modes(tmp_path, case, mode):
    make, fragment = SCHEMA_CASES[case]
    changes = make()
    items = changes.pop("items", None)
    splits = {"train": good_rows(4), "valid": good_rows(2, 100), "test": good_rows(2, 200), **changes}
    input_dir, config = write_dataset(tmp_path, splits, items=items)
    out = str(tmp_path / "out")
    with pytest.raises(PreprocessError) as err:
        pp.preprocess(input_dir, out, config, on_bad_row=mode)
    assert fragment in str(err.value)
    assert str(err.value).startswith(input_dir)
    assert not os.path.exists(out) and siblings(out) == []


@pytest.mark.parametrize("mode", ["fail", "quarantine"])
def test_missing_or_unreadable_split_file(tmp_path, mode):
    input_dir, config = write_dataset(tmp_path)
    os.remove(os.path.join(input_dir, "valid.parquet"))
    with pytest.raises(PreprocessError, match=r"valid\.parquet: file not found \(split `valid`"):
        pp.preprocess(input_dir, str(tmp_path / "out"), config, on_bad_row=mode)
    with open(os.path.join(input_dir, "valid.parquet"), "wb") as f:
        f.write(b"not parquet at all")
    with pytest.raises(PreprocessError, match=r"valid\.parquet: not a readable parquet file"):
        pp.preprocess(input_dir, str(tmp_path / "out"), config, on_bad_row=mode)
    assert not os.path.exists(tmp_path / "out")


def test_bad_arguments(tmp_path):
    input_dir, config = write_dataset(tmp_path)
    with pytest.raises(PreprocessError, match="`on_bad_row` must be one of"):
        pp.preprocess(input_dir, str(tmp_path / "out"), config, on_bad_row="skip")
    with pytest.raises(PreprocessError, match="`num_shards` must be an integer >= 1"):
        pp.preprocess(input_dir, str(tmp_path / "out"), config, num_shards=0)
    with pytest.raises(PreprocessError, match="input directory not found"):
        pp.preprocess(str(tmp_path / "nowhere"), str(tmp_path / "out"), config)
    assert not os.path.exists(tmp_path / "out")


def test_unlabelled_split_ignores_a_label_column_and_needs_none(tmp_path):
    config = json.loads(json.dumps(CONFIG))
    config["splits"]["valid"]["labelled"] = False
    valid = good_rows(3, 100)
    valid[1] = {**valid[1], "label": 7}  # not read: the split is unlabelled
    input_dir, config_path = write_dataset(tmp_path, {"train": good_rows(4), "valid": split_table(valid),
                                                      "test": good_rows(2, 200)}, config=config)
    spec = pp.preprocess(input_dir, str(tmp_path / "out"), config_path)
    got = read_split(spec, "valid")
    assert "label" not in got and got["user_id"].tolist() == [100, 101, 102]


@pytest.mark.parametrize("on_bad_row", ["fail", "quarantine"])
def test_corrupt_parquet_names_file_and_row_group(tmp_path, on_bad_row):
    input_dir, config = write_dataset(tmp_path, {"train": good_rows(40), "valid": good_rows(3, 100),
                                                 "test": good_rows(2, 200)})
    train_file = os.path.join(input_dir, "train.parquet")
    pq.write_table(split_table(good_rows(40)), train_file, row_group_size=10)
    corrupt_row_group(train_file, 2)
    out = str(tmp_path / "out")
    with pytest.raises(PreprocessError) as err:
        pp.preprocess(input_dir, out, config, num_shards=2, on_bad_row=on_bad_row)
    assert str(err.value).startswith(f"{train_file}: row group 2 (rows 20..29): corrupt parquet (")
    assert "\n" not in str(err.value)
    assert (err.value.file, err.value.row, err.value.reason) == (train_file, 20, "corrupt")
    assert not os.path.exists(out) and siblings(out) == []


def test_corrupt_item_table_is_named(tmp_path):
    input_dir, config = write_dataset(tmp_path)
    table_file = os.path.join(input_dir, "item_info.parquet")
    corrupt_row_group(table_file, 0, column=1)
    with pytest.raises(PreprocessError, match=rf"^{table_file}: corrupt parquet \("):
        pp.preprocess(input_dir, str(tmp_path / "out"), config)


# --------------------------------------------------------------------------
# The CLI: one line, non-zero exit, no traceback
# --------------------------------------------------------------------------


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipelines.preprocess", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    train = good_rows(4)
    train[1] = {**train[1], "label": 9}
    input_dir, config = write_dataset(tmp_path, {"train": train, "valid": good_rows(2, 100),
                                                 "test": good_rows(2, 200)})
    out = str(tmp_path / "out")
    proc = _cli(f"--input_dir={input_dir}", f"--output_dir={out}", f"--dataset_config={config}",
                "--direct_running_mode=in_memory", "--direct_num_workers=1", cwd=str(tmp_path))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"preprocess: error: {input_dir}/train.parquet: row 1, column `label`: "
                                   f"label must be 0 or 1, got 9")
    assert not os.path.exists(out)

    proc = _cli(f"--input_dir={input_dir}", f"--output_dir={out}", f"--dataset_config={config}",
                "--max_lne=3", cwd=str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "unknown arguments ['--max_lne']" in proc.stderr and proc.stderr.strip().count("\n") == 0

    proc = _cli(f"--input_dir={input_dir}", f"--output_dir={out}", f"--dataset_config={config}",
                "--on_bad_row=skip", cwd=str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "on_bad_row" in proc.stderr

    # Flipped bytes in a parquet file: one line naming file and row group, not Beam's tracebacks.
    train_file = os.path.join(input_dir, "train.parquet")
    pq.write_table(split_table(good_rows(40)), train_file, row_group_size=10)
    corrupt_row_group(train_file, 3)
    proc = _cli(f"--input_dir={input_dir}", f"--output_dir={out}", f"--dataset_config={config}",
                "--num_shards=2", cwd=str(tmp_path))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"preprocess: error: {train_file}: row group 3 (rows 30..39): corrupt parquet (")
    assert proc.stderr.count("\n") == 1 and not os.path.exists(out)
