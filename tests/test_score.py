"""Batch scoring with the SavedModel alone: parquet and TFRecords, formats, metrics, bad input."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from export import exporter
from qin_tf.rows import PreprocessError
from export import readers, score
from qin_tf import metrics
from tests.cli_in_process import run_main
from tests.test_export import REPO, SAMPLE_DIR, assert_scores_equal, keras_scores, make_model_dir, split_rows

TEST_PARQUET = os.path.join(SAMPLE_DIR, "test.parquet")


@pytest.fixture(scope="module")
def scored(sample_spec, tmp_path_factory):
    """(export base, expected scores of the test split, labels, user ids)."""
    tmp = tmp_path_factory.mktemp("score")
    model = make_model_dir(sample_spec, str(tmp / "model"), seed=5)
    base = str(tmp / "export")
    exporter.export_from_model_dir(str(tmp / "model"), base, data_dir=sample_spec.base_dir)
    features, labels, _ = split_rows(sample_spec, "test")
    users = pq.read_table(TEST_PARQUET, columns=["user_id"])["user_id"].to_numpy()
    return base, keras_scores(model, features), labels, users


def test_sequence_to_dense_golden():
    lists = pa.array([[5, 0, 7, 8], [], None, [0, 3], [1, 2, 3, 4, 5, 6]], pa.list_(pa.int64()))
    np.testing.assert_array_equal(readers.sequence_to_dense(lists, 3),
                                  [[5, 7, 8], [0, 0, 0], [0, 0, 0], [0, 0, 3], [4, 5, 6]])
    # A slice (non-zero offset) of a list array, as iter_batches hands out.
    np.testing.assert_array_equal(readers.sequence_to_dense(lists.slice(3, 2), 2), [[0, 3], [5, 6]])


def test_parquet_scores_equal_in_process_and_auc(scored, sample_spec, tmp_path):
    base, want, labels, users = scored
    out = tmp_path / "scores.parquet"
    lines = []
    result = score.score(base, TEST_PARQUET, str(out), fmt="parquet", batch_size=64, log=lines.append)
    assert result["num_rows"] == 600 and result["saved_model"] == os.path.join(base, "1")
    assert_scores_equal(result["scores"], want)
    # The metrics of these scores; float rounding may reorder near-ties against Keras' own scores.
    assert result["auc"] == metrics.auc(labels, result["scores"])
    assert result["auc"] == pytest.approx(metrics.auc(labels, want), abs=1e-3)
    assert result["gauc"] == metrics.gauc(labels, result["scores"], users)
    assert result["logloss"] == pytest.approx(metrics.logloss(labels, want), rel=1e-5)
    table = pq.read_table(out)
    assert table.column_names == ["row", *sample_spec.meta, sample_spec.label, "ctr"]
    np.testing.assert_array_equal(table["row"].to_numpy(), np.arange(600))
    np.testing.assert_array_equal(table[sample_spec.meta[0]].to_numpy(), users)
    np.testing.assert_array_equal(table[sample_spec.label].to_numpy(), labels)
    assert_scores_equal(table["ctr"].to_numpy(), want)
    assert "scored 600 rows" in lines[-1]
    assert sorted(os.listdir(tmp_path)) == ["scores.parquet"]  # no temporary file left


def test_tfrecord_glob_scores_equal_in_process(scored, sample_spec, tmp_path):
    base, want, labels, _ = scored
    pattern = os.path.join(sample_spec.base_dir, "test-*.tfrecord.gz")
    result = score.score(os.path.join(base, "1"), pattern, str(tmp_path / "s.csv"), fmt="csv", batch_size=50,
                         log=lambda line: None)
    assert_scores_equal(result["scores"], want)
    assert result["auc"] == metrics.auc(labels, result["scores"])
    with open(tmp_path / "s.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["row", *sample_spec.meta, sample_spec.label, "ctr"]
    assert [int(r[0]) for r in rows[1:]] == list(range(600))
    assert_scores_equal([float(r[3]) for r in rows[1:]], want)


def test_challenge_format_and_batch_size_invariance(scored, tmp_path):
    base, want, _, _ = scored
    out = tmp_path / "submission.csv"
    score.score(base, TEST_PARQUET, str(out), fmt="challenge", batch_size=7, log=lambda line: None)
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ID", "Task2"]
    assert [int(r[0]) for r in rows[1:]] == list(range(600))
    assert_scores_equal([float(r[1]) for r in rows[1:]], want)


def test_unlabelled_input_and_ids_across_files(scored, tmp_path):
    """The challenge's test set has no label: no metrics; IDs continue across the files of a glob."""
    base, want, _, _ = scored
    table = pq.read_table(TEST_PARQUET).drop_columns(["label"])
    pq.write_table(table.slice(0, 250), tmp_path / "part-0.parquet")
    pq.write_table(table.slice(250), tmp_path / "part-1.parquet")
    out = tmp_path / "out" / "submission.csv"
    result = score.score(base, str(tmp_path / "part-*.parquet"), str(out), fmt="challenge",
                         log=lambda line: None)
    assert "auc" not in result and result["num_rows"] == 600
    with open(out) as f:
        rows = list(csv.reader(f))[1:]
    assert [int(r[0]) for r in rows] == list(range(600))
    assert_scores_equal([float(r[1]) for r in rows], want)


def _corrupt(tmp_path, column, row, value):
    table = pq.read_table(TEST_PARQUET)
    values = table[column].to_pylist()
    values[row] = value
    table = table.set_column(table.column_names.index(column), column, pa.array(values, table[column].type))
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path, row_group_size=100)
    return str(path)


@pytest.mark.parametrize("column,row,value,message", [
    ("item_seq", 437, [3, None, 5], "row 437, column `item_seq`: null value at position 1 of the list"),
    ("item_seq", 5, [3, -2], "row 5, column `item_seq`: negative item id -2 at position 1 of the list"),
    ("item_id", 123, 10**6, "row 123, column `item_id`: item id 1000000 is beyond the item table"),
    ("item_id", 0, 0, "row 0, column `item_id`: target item id is 0, the padding id"),
    ("views_level", 599, None, "row 599, column `views_level`: null value"),
    ("label", 77, 3, "row 77, column `label`: label must be 0 or 1, got 3"),
])
def test_bad_rows_name_file_row_and_column(scored, tmp_path, column, row, value, message):
    path = _corrupt(tmp_path, column, row, value)
    out = tmp_path / "scores.parquet"
    with pytest.raises(PreprocessError) as err:
        score.score(scored[0], path, str(out), batch_size=64, log=lambda line: None)
    assert str(err.value).startswith(f"{path}: {message}")
    assert (err.value.file, err.value.row, err.value.column) == (path, row, column)
    assert sorted(os.listdir(tmp_path)) == ["bad.parquet"]  # no partial output


def test_schema_problems(scored, tmp_path):
    table = pq.read_table(TEST_PARQUET)
    pq.write_table(table.drop_columns(["views_level"]), tmp_path / "a.parquet")
    with pytest.raises(PreprocessError, match=r"a\.parquet: column `views_level`: missing column"):
        score.score(scored[0], str(tmp_path / "a.parquet"), None, log=lambda line: None)
    as_float = table.set_column(table.column_names.index("item_id"), "item_id", table["item_id"].cast(pa.float64()))
    pq.write_table(as_float, tmp_path / "b.parquet")
    with pytest.raises(PreprocessError, match=r"b\.parquet: column `item_id`: has type double"):
        score.score(scored[0], str(tmp_path / "b.parquet"), None, log=lambda line: None)
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(PreprocessError, match="unknown input type"):
        score.score(scored[0], str(tmp_path / "c.txt"), None, log=lambda line: None)
    with pytest.raises(PreprocessError, match="no such file"):
        score.score(scored[0], str(tmp_path / "none-*.parquet"), None, log=lambda line: None)


def test_malformed_tfrecord_row_is_named(scored, sample_spec, tmp_path):
    import tensorflow as tf

    rows = exporter.read_examples(sample_spec, 30, ["test"])
    example = tf.train.Example.FromString(rows[21])
    del example.features.feature[sample_spec.sequence]
    rows[21] = example.SerializeToString()
    path = tmp_path / "bad.tfrecord.gz"
    with tf.io.TFRecordWriter(str(path), options="GZIP") as w:
        for r in rows:
            w.write(r)
    with pytest.raises(PreprocessError, match=rf"bad\.tfrecord\.gz: row 21: .*{sample_spec.sequence}"):
        score.score(scored[0], str(path), None, batch_size=8, log=lambda line: None)


def test_cli_prints_auc_and_writes_the_submission(scored, tmp_path):
    base, want, labels, _ = scored
    out = tmp_path / "submission.csv"
    proc = subprocess.run([sys.executable, "-m", "export.score", f"--saved_model={base}", f"--input={TEST_PARQUET}",
                           f"--output={out}", "--format=challenge", "--batch_size=100"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    auc = metrics.auc(labels, score.score(base, TEST_PARQUET, None, log=lambda line: None)["scores"])
    assert f"AUC {auc:.4f}" in proc.stdout
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["ID", "Task2"] and len(rows) == 601

    bad = _corrupt(tmp_path, "item_seq", 9, None)  # the same main in process (bad rows launched: test_output_paths)
    proc = run_main("export.score", f"--saved_model={base}", f"--input={bad}", f"--output={tmp_path / 'never.csv'}")
    assert proc.returncode != 0
    assert f"{bad}: row 9, column `item_seq`: null value" in proc.stderr
    assert not (tmp_path / "never.csv").exists()


# --------------------------------------------------------------------------
# The output: never an input, never replaced unasked, temp files, permissions
# --------------------------------------------------------------------------


def test_output_that_is_an_input_or_exists_is_refused(scored, tmp_path):
    base = scored[0]
    inp = tmp_path / "in.parquet"
    inp.write_bytes(open(TEST_PARQUET, "rb").read())
    before = inp.read_bytes()
    for pattern in (str(inp), str(tmp_path / "*.parquet")):
        for overwrite in (False, True):
            with pytest.raises(PreprocessError, match="the output is one of the inputs"):
                score.score(base, pattern, str(inp), overwrite=overwrite, log=lambda line: None)
    assert inp.read_bytes() == before

    out = tmp_path / "scores.csv"
    out.write_text("keep me\n")
    with pytest.raises(PreprocessError, match=r"scores\.csv: the output exists; pass --overwrite"):
        score.score(base, str(inp), str(out), fmt="csv", log=lambda line: None)
    assert out.read_text() == "keep me\n"
    score.score(base, str(inp), str(out), fmt="csv", overwrite=True, log=lambda line: None)
    with open(out) as f:
        assert len(list(csv.reader(f))) == 601


def test_output_that_cannot_be_created_fails_before_any_work(tmp_path):
    """A directory, or a path under a file: refused before the export is even loaded."""
    no_export = str(tmp_path / "no-export")  # loading it would raise FileNotFoundError
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(PreprocessError, match=r"adir: the output is a directory"):
        score.score(no_export, TEST_PARQUET, str(tmp_path / "adir"), log=lambda line: None)
    with pytest.raises(PreprocessError, match=r"afile/sub/s\.csv: cannot create the output: .*afile is a file"):
        score.score(no_export, TEST_PARQUET, str(tmp_path / "afile" / "sub" / "s.csv"), log=lambda line: None)
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile"]


def test_stale_temp_files_are_removed_and_the_output_follows_the_umask(scored, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".s.csv.score-{dead}-0123abcd.tmp"  # a killed run's
    live = tmp_path / f".s.csv.score-{os.getppid()}-0123abcd.tmp"  # a running process's: kept
    other = tmp_path / ".s.csv.notes.tmp"  # not the scorer's: kept
    for f in (stale, live, other):
        f.write_text("partial")
    old = os.umask(0o027)
    try:
        score.score(scored[0], TEST_PARQUET, str(tmp_path / "s.csv"), fmt="csv", log=lambda line: None)
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name, "s.csv"])
    assert os.stat(tmp_path / "s.csv").st_mode & 0o777 == 0o640


def test_corrupt_parquet_names_the_row_group(scored, tmp_path):
    from tests.test_preprocess import corrupt_row_group

    path = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(TEST_PARQUET), path, row_group_size=100)
    corrupt_row_group(path, 3)
    with pytest.raises(PreprocessError, match=r"bad\.parquet: row group 3 \(rows 300\.\.399\): corrupt parquet \("):
        score.score(scored[0], str(path), str(tmp_path / "s.parquet"), log=lambda line: None)
    assert sorted(os.listdir(tmp_path)) == ["bad.parquet"]


def test_cli_refuses_to_write_over_its_input_and_names_a_corrupt_file(scored, tmp_path):
    inp = tmp_path / "in.parquet"
    pq.write_table(pq.read_table(TEST_PARQUET), inp, row_group_size=100)
    before = inp.read_bytes()
    # the same main in process (launched: test_output_paths.py); the corrupt file below is launched
    proc = run_main("export.score", f"--saved_model={scored[0]}", f"--input={inp}", f"--output={inp}")
    assert proc.returncode == 1
    assert proc.stderr == f"score: error: {inp}: the output is one of the inputs; write the scores to another file\n"
    assert inp.read_bytes() == before

    from tests.test_preprocess import corrupt_row_group

    corrupt_row_group(inp, 2)
    proc = subprocess.run([sys.executable, "-m", "export.score", f"--saved_model={scored[0]}", f"--input={inp}",
                           f"--output={tmp_path / 's.csv'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"score: error: {inp}: row group 2 (rows 200..299): corrupt parquet (")
    assert proc.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["in.parquet"]


# --------------------------------------------------------------------------
# Raw ids (--raw_ids): parquet or JSON lines through the export's serving_raw
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_scored(scored, sample_spec, tmp_path_factory):
    """(raw-id export base, dense-id rows, the raw ids of the same rows, labels) of the scored model."""
    from tests.test_export import make_raw_spec

    tmp = tmp_path_factory.mktemp("raw_score")
    spec = make_raw_spec(sample_spec, str(tmp / "data"))
    model = exporter.load_keras_model(os.path.join(os.path.dirname(scored[0]), "model"))
    base = str(tmp / "export")
    exporter.export_model(model, spec, base)
    features, labels, _ = split_rows(sample_spec, "test")
    features[spec.target_item][:3] = 1  # the OOV item: a raw id the vocabulary lacks
    raw, dense = exporter.raw_rows(spec, features)
    return base, spec, raw, dense, labels


def _raw_records(spec, raw, labels):
    return [{spec.target_item: raw[spec.target_item][i],
             spec.sequence: [x for x in raw[spec.sequence][i].tolist() if x != ""],
             **{c: int(raw[c][i]) for c in spec.context}, spec.label: int(labels[i]), "user_id": i}
            for i in range(len(labels))]


def test_raw_id_parquet_and_json_lines_score_bitwise_as_dense_ids(raw_scored, tmp_path):
    import json

    base, spec, raw, dense, labels = raw_scored
    records = _raw_records(spec, raw, labels)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "raw.parquet")
    with open(tmp_path / "raw.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    pq.write_table(pa.table({"user_id": np.arange(len(labels)), "item_seq": [[x for x in row if x] for row in
                                                                             dense[spec.sequence].tolist()],
                             **{c: dense[c] for c in spec.context}, "item_id": dense[spec.target_item],
                             "label": labels.astype(np.int64)}), tmp_path / "dense.parquet")
    want = score.score(base, str(tmp_path / "dense.parquet"), log=lambda line: None)
    for name in ("raw.parquet", "raw.jsonl"):
        got = score.score(base, str(tmp_path / name), str(tmp_path / f"{name}.scores.parquet"), batch_size=97,
                          raw_ids=True, log=lambda line: None)
        assert got["num_rows"] == 600
        np.testing.assert_array_equal(got["scores"], want["scores"])
        assert got["auc"] == want["auc"]
        table = pq.read_table(tmp_path / f"{name}.scores.parquet")
        assert table.column_names == ["row", "user_id", "label", "ctr"]
        np.testing.assert_array_equal(table["label"].to_numpy(), labels)


def test_raw_id_input_errors_name_file_row_and_column(raw_scored, scored, tmp_path):
    import json

    base, spec, raw, _, labels = raw_scored
    records = _raw_records(spec, raw, labels)[:5]
    records[3][spec.target_item] = 17
    with open(tmp_path / "bad.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with pytest.raises(PreprocessError, match=r"bad.jsonl: row 3, column `item_id`: expected a raw string id"):
        score.score(base, str(tmp_path / "bad.jsonl"), raw_ids=True, log=lambda line: None)
    with pytest.raises(PreprocessError, match="no `serving_raw` signature"):
        score.score(scored[0], str(tmp_path / "bad.jsonl"), raw_ids=True, log=lambda line: None)
