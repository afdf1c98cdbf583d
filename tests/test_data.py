"""The tf.data reader: values, order, sharding, batching, unlabelled splits."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from qin_tf import data
from qin_tf.spec import FeatureSpec, SplitInfo, SpecError

MAX_LEN = 4


def _spec(tmp_path, splits) -> FeatureSpec:
    return FeatureSpec(
        dataset="crafted", label="label", meta=("user_id",), target_item="item_id",
        sequence="item_seq", context=("views_level",), context_vocab_sizes=(11,),
        max_len=MAX_LEN, num_items=100, num_tags=2, tag_vocab_size=5, mm_dim=3,
        splits=splits, base_dir=str(tmp_path))


def _rows(start, n):
    """Row r: user r, item r % 100, label r % 2, views r % 11, seq [0, .., r%100]."""
    rows = []
    for r in range(start, start + n):
        seq = [0] * (MAX_LEN - 2) + [(r + 1) % 100, r % 100]
        rows.append(dict(label=r % 2, user_id=r, item_id=r % 100, views_level=r % 11, item_seq=seq))
    return rows


def _write(path, rows, labelled=True):
    with tf.io.TFRecordWriter(str(path), options="GZIP") as w:
        for row in rows:
            feats = {k: tf.train.Feature(int64_list=tf.train.Int64List(value=v if isinstance(v, list) else [v]))
                     for k, v in row.items() if labelled or k != "label"}
            w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())


@pytest.fixture
def crafted(tmp_path):
    """Split `train` in 4 shards of 25 rows, `test` unlabelled in 1 shard."""
    files = []
    for i in range(4):
        name = f"train-{i:05d}-of-00004.tfrecord.gz"
        _write(tmp_path / name, _rows(25 * i, 25))
        files.append(name)
    _write(tmp_path / "test-00000-of-00001.tfrecord.gz", _rows(1000, 10), labelled=False)
    return _spec(tmp_path, {"train": SplitInfo(tuple(files), 100),
                            "test": SplitInfo(("test-00000-of-00001.tfrecord.gz",), 10, labelled=False)})


def _collect(ds):
    feats, labels = {}, []
    for x, y in ds:
        for k, v in x.items():
            feats.setdefault(k, []).append(v.numpy())
        labels.append(y.numpy())
    return {k: np.concatenate(v) for k, v in feats.items()}, np.concatenate(labels)


def test_eval_gives_back_every_value_in_order(crafted):
    x, y = _collect(data.make_dataset(crafted, "train", 16, training=False, with_meta=True))
    expected = _rows(0, 100)
    np.testing.assert_array_equal(x["user_id"], [r["user_id"] for r in expected])
    np.testing.assert_array_equal(x["item_id"], [r["item_id"] for r in expected])
    np.testing.assert_array_equal(x["views_level"], [r["views_level"] for r in expected])
    np.testing.assert_array_equal(x["item_seq"], [r["item_seq"] for r in expected])
    np.testing.assert_array_equal(y, [r["label"] for r in expected])
    assert y.dtype == np.float32 and x["item_seq"].dtype == np.int64
    assert x["item_seq"].shape == (100, MAX_LEN)


def test_meta_is_left_out_unless_asked(crafted):
    x, _ = next(iter(data.make_dataset(crafted, "train", 8, training=False)))
    assert set(x) == set(crafted.model_feature_names) == {"item_id", "item_seq", "views_level"}


def test_training_shuffles_deterministically_with_a_seed(crafted):
    a, _ = _collect(data.make_dataset(crafted, "train", 16, training=True, seed=7, with_meta=True))
    b, _ = _collect(data.make_dataset(crafted, "train", 16, training=True, seed=7, with_meta=True))
    np.testing.assert_array_equal(a["user_id"], b["user_id"])
    assert sorted(a["user_id"]) == list(range(100))
    assert list(a["user_id"]) != list(range(100))


@pytest.mark.parametrize("num_pipelines", [2, 3, 8])
def test_input_context_shards_without_loss_or_overlap(crafted, num_pipelines):
    """4 files: 2 pipelines shard by file; 3 by file too; 8 (> files) by record."""
    seen = []
    for pid in range(num_pipelines):
        ctx = tf.distribute.InputContext(num_input_pipelines=num_pipelines, input_pipeline_id=pid,
                                         num_replicas_in_sync=num_pipelines)
        ds = data.make_dataset(crafted, "train", 8 * num_pipelines, training=False,
                               input_context=ctx, with_meta=True)
        batches = list(ds)
        assert all(x["item_id"].shape[0] <= 8 for x, _ in batches)
        seen.append(np.concatenate([x["user_id"].numpy() for x, _ in batches]))
    allv = np.concatenate(seen)
    assert sorted(allv) == list(range(100))


def test_unlabelled_split_yields_features_only(crafted):
    batch = next(iter(data.make_dataset(crafted, "test", 4, training=False)))
    assert isinstance(batch, dict) and "label" not in batch
    np.testing.assert_array_equal(batch["item_id"], [r["item_id"] for r in _rows(1000, 4)])


def test_file_pattern_and_repeat(crafted, tmp_path):
    ds = data.make_dataset(crafted, str(tmp_path / "train-0000[01]-*"), 10, training=False, repeat=True)
    ids = np.concatenate([x["item_id"].numpy() for x, _ in ds.take(10)])
    np.testing.assert_array_equal(ids, np.tile(np.arange(50), 2))


def test_unknown_split_is_a_clear_error(crafted):
    with pytest.raises(SpecError, match="neither a split"):
        data.make_dataset(crafted, "nope", 4, training=False)
    with pytest.raises(ValueError, match="batch_size"):
        data.make_dataset(crafted, "train", 0, training=False)


def test_model_inputs_drops_meta(crafted):
    x, _ = next(iter(data.make_dataset(crafted, "train", 4, training=False, with_meta=True)))
    assert set(data.model_inputs(crafted, x)) == set(crafted.model_feature_names)


# --------------------------------------------------------------------------
# Training in memory: a full random permutation per pass
# --------------------------------------------------------------------------


def _user_ids(ds, n=None):
    ds = ds if n is None else ds.take(n)
    return np.concatenate([x["user_id"].numpy() for x, _ in ds])


def test_training_reads_in_memory_with_a_fresh_permutation_per_pass(crafted):
    ds = data.make_dataset(crafted, "train", 16, training=True, seed=3, with_meta=True, repeat=True)
    stream = _user_ids(ds, 13)                       # 208 records: passes 0, 1 and 8 of pass 2
    first, second = stream[:100], stream[100:200]
    assert sorted(first) == sorted(second) == list(range(100))       # each pass: every row once
    assert list(first) != list(second) and list(first) != list(range(100))
    again = _user_ids(data.make_dataset(crafted, "train", 16, training=True, seed=3, with_meta=True,
                                        repeat=True), 13)
    np.testing.assert_array_equal(stream, again)                      # the seed fixes the order
    other = _user_ids(data.make_dataset(crafted, "train", 16, training=True, seed=4, with_meta=True))
    assert sorted(other) == list(range(100)) and list(other) != list(first)
    # values travel with their row
    x, y = next(iter(data.make_dataset(crafted, "train", 100, training=True, seed=3, with_meta=True)))
    rows = {r["user_id"]: r for r in _rows(0, 100)}
    for i, u in enumerate(x["user_id"].numpy()):
        assert x["item_id"][i] == rows[u]["item_id"] and y[i] == rows[u]["label"]
        assert list(x["item_seq"][i].numpy()) == rows[u]["item_seq"]


def test_training_in_memory_equals_streaming_in_content(crafted):
    stream = data.make_dataset(crafted, "train", 7, training=True, seed=1, with_meta=True, cache=False)
    memory = data.make_dataset(crafted, "train", 7, training=True, seed=1, with_meta=True, cache=True)
    a, b = _user_ids(stream), _user_ids(memory)
    assert sorted(a) == sorted(b) == list(range(100))
    dropped = data.make_dataset(crafted, "train", 16, training=True, seed=1, with_meta=True, drop_remainder=True)
    assert [x["user_id"].shape[0] for x, _ in dropped] == [16] * 6


@pytest.mark.parametrize("num_pipelines", [2, 8])
def test_training_in_memory_shards_without_loss_or_overlap(crafted, num_pipelines):
    seen = []
    for pid in range(num_pipelines):
        ctx = tf.distribute.InputContext(num_input_pipelines=num_pipelines, input_pipeline_id=pid,
                                         num_replicas_in_sync=num_pipelines)
        seen.append(_user_ids(data.make_dataset(crafted, "train", 4 * num_pipelines, training=True, seed=5,
                                                input_context=ctx, with_meta=True)))
    assert sorted(np.concatenate(seen)) == list(range(100))


def test_training_in_memory_rereads_files_that_changed(crafted, tmp_path):
    before = _user_ids(data.make_dataset(crafted, "train", 50, training=True, seed=2, with_meta=True))
    assert sorted(before) == list(range(100))
    _write(tmp_path / "train-00000-of-00004.tfrecord.gz", _rows(500, 25))   # same file, new rows
    after = _user_ids(data.make_dataset(crafted, "train", 50, training=True, seed=2, with_meta=True))
    assert sorted(after) == list(range(25, 100)) + list(range(500, 525))


def test_find_unreadable_record_names_file_and_record(crafted):
    import dataclasses

    assert data.find_unreadable_record(crafted) is None
    # Uncompressed shards: the record is exact. Flip a byte inside record 3 of shard 2.
    records = [r.numpy() for r in tf.data.TFRecordDataset(crafted.split_files("train")[2], compression_type="GZIP")]
    spec = dataclasses.replace(crafted, compression="")
    for path in spec.split_files("train"):
        with tf.io.TFRecordWriter(path) as w:
            for r in records:
                w.write(r)
    path = spec.split_files("train")[2]
    raw = bytearray(open(path, "rb").read())
    offset = sum(len(r) + 16 for r in records[:3]) + 12 + len(records[3]) // 2  # 12: length + its CRC
    raw[offset] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(raw))
    found = data.find_unreadable_record(spec, ["train"])
    assert found is not None and found[:2] == (path, 3)
    assert "corrupted record" in found[2] and "\n" not in found[2] and "function_node" not in found[2]
