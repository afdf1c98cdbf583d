"""pipelines.preprocess: parquet -> TFRecords -> parse back, on crafted rows and on the bundled sample.

The helpers at the top (``write_dataset``, ``read_split``...) are shared with
``test_preprocess_bad_input.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import beamio
from pipelines import preprocess as pp
from pipelines.beamio import beam
from pipelines.example_codec import (GzipTFRecordWriter, crc32c, crc32c_rows, encode_tfrecords,
                                     serialize_int64_examples)
from qin_tf.spec import left_pad_recent
from qin_tf.runtime import import_tensorflow
from qin_tf.spec import FeatureSpec

tf = import_tensorflow()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data", "microlens_sample")
NUM_ITEMS = 10

CONFIG = {
    "name": "tiny",
    "splits": {"train": {"file": "train.parquet"}, "valid": {"file": "valid.parquet"},
               "test": {"file": "test.parquet", "labelled": False}},
    "label": "label", "meta": ["user_id"], "target_item": "item_id", "sequence": "item_seq",
    "context": ["likes_level", "views_level"],
    "item_table": {"file": "item_info.parquet", "id": "item_id", "tags": "item_tags",
                   "embedding": "item_emb_d128"},
    "max_len": 4,
}

SPLIT_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_seq", pa.list_(pa.int64())),
                          ("likes_level", pa.int64()), ("views_level", pa.int64()),
                          ("item_id", pa.int64()), ("label", pa.int64())])


def item_table(n: int = NUM_ITEMS) -> pa.Table:
    """Item i: tags [i % 4, 3i % 7], embedding [i, i + .5, -i]; row 0 zeros."""
    ids = np.arange(n)
    tags = np.stack([ids % 4, (3 * ids) % 7], axis=1)
    emb = np.stack([ids, ids + 0.5, -ids], axis=1).astype(np.float32)
    tags[0] = 0
    emb[0] = 0
    return pa.table({"item_id": pa.array(ids, pa.int64()), "item_tags": pa.array(tags.tolist()),
                     "item_emb_d128": pa.array(emb.tolist(), pa.list_(pa.float32()))})


def row(user=1, seq=(1, 2), item=3, label=1, likes=0, views=1) -> dict:
    return {"user_id": user, "item_seq": None if seq is None else list(seq), "likes_level": likes,
            "views_level": views, "item_id": item, "label": label}


def split_table(rows: list[dict], labelled: bool = True) -> pa.Table:
    schema = SPLIT_SCHEMA if labelled else pa.schema([f for f in SPLIT_SCHEMA if f.name != "label"])
    rows = [{k: v for k, v in r.items() if k in schema.names} for r in rows]
    return pa.Table.from_pylist(rows, schema=schema)


def good_rows(n: int, user0: int = 1) -> list[dict]:
    return [row(user=user0 + i, seq=[(i + j) % 9 + 1 for j in range(i % 3)], item=(i % 9) + 1, label=i % 2,
                likes=i % 3, views=i % 5) for i in range(n)]


def write_dataset(directory, splits: dict | None = None, items: pa.Table | None = None,
                  config: dict | None = None):
    """Writes an MMCTR-layout dataset (parquet files + config JSON); returns (input_dir, config_path)."""
    directory = str(directory)
    input_dir = os.path.join(directory, "raw")
    os.makedirs(input_dir, exist_ok=True)
    config = config or CONFIG
    if splits is None:
        splits = {"train": good_rows(6), "valid": good_rows(3, 100), "test": good_rows(2, 200)}
    for split, rows in splits.items():
        labelled = config["splits"][split].get("labelled", True)
        table = rows if isinstance(rows, pa.Table) else split_table(rows, labelled)
        pq.write_table(table, os.path.join(input_dir, config["splits"][split]["file"]))
    pq.write_table(item_table() if items is None else items, os.path.join(input_dir, "item_info.parquet"))
    config_path = os.path.join(directory, "config.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    return input_dir, config_path


def parse_spec(spec: FeatureSpec, labelled: bool) -> dict:
    """A tf.io.parse_example spec derived from the feature spec only."""
    return {f.name: tf.io.FixedLenFeature(f.shape, tf.as_dtype(f.dtype))
            for f in spec.example_features(labelled)}


def read_split(spec: FeatureSpec, split: str) -> dict[str, np.ndarray]:
    """Every example of a split, in shard order, parsed with tf.io.parse_example."""
    records = list(tf.data.TFRecordDataset(spec.split_files(split), compression_type=spec.compression)
                   .as_numpy_iterator())
    ps = parse_spec(spec, spec.splits[split].labelled)
    if not records:
        return {k: np.zeros((0, *v.shape), np.int64) for k, v in ps.items()}
    return {k: v.numpy() for k, v in tf.io.parse_example(records, ps).items()}


def expected_history(seq, max_len: int) -> list[int]:
    """The rule, written the slow obvious way: drop zeros, keep the last max_len, left-pad."""
    items = [x for x in (seq or []) if x != 0][-max_len:]
    return [0] * (max_len - len(items)) + items


def listing(directory) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, directory)] = fh.read()
    return out


def corrupt_row_group(path, group: int, column: int = 1) -> None:
    """Flips 16 bytes in the middle of a column chunk of one row group of a parquet file."""
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(column)
    data = bytearray(open(path, "rb").read())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    for i in range(middle, middle + 16):
        data[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))


def siblings(output_dir) -> list[str]:
    parent, base = os.path.split(str(output_dir).rstrip("/"))
    return sorted(n for n in os.listdir(parent) if n.startswith(base + ".tmp-") or n.startswith(base + ".old-"))


# --------------------------------------------------------------------------
# The hand-made Example encoder and TFRecord framing
# --------------------------------------------------------------------------


def test_crc32c_check_value():
    # The CRC-32C check value of "123456789" (RFC 3720, B.4).
    assert crc32c(b"123456789") == 0xE3069283
    assert int(crc32c_rows(np.frombuffer(b"123456789", np.uint8)[None, :])[0]) == 0xE3069283


def _import_codec_with(google_crc32c_stub: str) -> subprocess.CompletedProcess:
    """Imports pipelines.example_codec in a fresh interpreter where ``google_crc32c`` is the stub."""
    code = f"import sys, types\n{google_crc32c_stub}\nimport pipelines.example_codec\n"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=60)


def test_record_checksums_use_the_c_crc32c():
    import google_crc32c

    from pipelines import example_codec

    assert google_crc32c.implementation == "c"
    assert example_codec._crc32c_bytes is google_crc32c.value


@pytest.mark.parametrize("stub, message", [
    ("sys.modules['google_crc32c'] = None", "needs google-crc32c (a dependency of qin-tf)"),
    ("m = types.ModuleType('google_crc32c'); m.implementation = 'python'; m.value = len\n"
     "sys.modules['google_crc32c'] = m", "is its pure-Python fallback"),
])
def test_codec_refuses_to_run_without_the_c_crc32c(stub, message):
    # no silent numpy fallback: it made preprocessing about 60 times slower
    proc = _import_codec_with(stub)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: pipelines.example_codec needs google-crc32c"), proc.stderr
    assert message in last


def test_encoded_examples_are_byte_compatible_with_tf():
    rng = np.random.default_rng(0)
    n = 257
    values = {
        "label": rng.integers(0, 2, n),
        "user_id": rng.integers(0, 2**40, n),
        "item_seq": np.where(rng.random((n, 7)) < 0.4, 0, rng.integers(1, 300_000, (n, 7))),
        "small": np.zeros(n, np.int64),
        "extremes": rng.choice(np.array([0, 1, 127, 128, 16383, 16384, 2**63 - 1, -1, -(2**63)]), (n, 3)),
    }
    keys = list(values)
    serialized = serialize_int64_examples(keys, list(values.values()))
    assert len(serialized) == n
    for i in (0, 1, n - 1):
        ex = tf.train.Example()
        for k, v in values.items():
            ex.features.feature[k].int64_list.value.extend(np.atleast_1d(v[i]).tolist())
        assert tf.train.Example.FromString(serialized[i]) == ex
        assert len(serialized[i]) == len(ex.SerializeToString())
    ps = {k: tf.io.FixedLenFeature(v.shape[1:], tf.int64) for k, v in values.items()}
    parsed = tf.io.parse_example(serialized, ps)
    for k, v in values.items():
        np.testing.assert_array_equal(parsed[k].numpy(), v)


def test_gzip_tfrecords_read_back_with_tf(tmp_path):
    a = np.arange(40, dtype=np.int64).reshape(20, 2) * 1000
    b = np.arange(20, dtype=np.int64)
    path = str(tmp_path / "x.tfrecord.gz")
    with open(path, "wb") as f:
        w = GzipTFRecordWriter(f)
        w.write(encode_tfrecords(["a", "b"], [a[:13], b[:13]]))
        w.write(encode_tfrecords(["a", "b"], [a[13:], b[13:]]))
        w.write(encode_tfrecords(["a", "b"], [a[:0], b[:0]]))  # an empty batch writes nothing
        w.close()
    # TFRecordDataset checks both CRCs of every record.
    records = list(tf.data.TFRecordDataset(path, compression_type="GZIP").as_numpy_iterator())
    assert records == serialize_int64_examples(["a", "b"], [a, b])


def test_left_pad_recent_rule():
    seqs = [[], [0, 0, 0], [5], [1, 2, 3, 4, 5, 6], [0] * 95 + [7, 8, 9, 1, 2], [5, 0, 6], [1, 2, 3, 4]]
    lengths = np.array([len(s) for s in seqs])
    flat = np.array([x for s in seqs for x in s], dtype=np.int64)
    parent = np.repeat(np.arange(len(seqs)), lengths)
    out, counts = left_pad_recent(flat, parent, len(seqs), 4)
    assert out.tolist() == [expected_history(s, 4) for s in seqs]
    assert out.tolist()[4] == [8, 9, 1, 2]
    assert counts.tolist() == [0, 0, 1, 6, 5, 2, 4]


@pytest.mark.parametrize("groups,shards,expected", [
    ([10], 3, [(0, 3), (3, 7), (7, 10)]),                      # one row group: equal row ranges
    ([4, 4, 4, 4], 2, [(0, 8), (8, 16)]),                      # snapped to row-group edges
    ([1, 1, 8], 3, [(0, 1), (1, 2), (2, 10)]),                 # one shard per row group
    ([5, 5], 3, [(0, 3), (3, 7), (7, 10)]),                    # fewer groups than shards
    ([2], 5, [(0, 1), (1, 2)]),                                # at most one shard per row
    ([0], 4, [(0, 0)]),                                        # an empty file: one empty shard
])
def test_plan_ranges(groups, shards, expected):
    assert pp.plan_ranges(groups, shards) == expected


# --------------------------------------------------------------------------
# parquet -> TFRecords -> parse back
# --------------------------------------------------------------------------


def test_crafted_rows_round_trip(tmp_path):
    train = [
        row(user=1, seq=[], item=3, label=1, likes=0, views=2),                             # empty history
        row(user=2, seq=[1, 2, 3, 4, 5, 6], item=4, label=0, likes=4, views=7),             # longer than max_len
        row(user=3, seq=[0] * 95 + [7, 8, 9, 1, 2], item=9, label=1, likes=1, views=0),    # challenge style
        row(user=4, seq=[5, 0, 6], item=1, label=0, likes=2, views=3),                      # a 0 inside
        row(user=5, seq=[1, 2, 3, 4], item=2, label=1, likes=3, views=1),                   # exactly max_len
        row(user=6, seq=[9], item=5, label=1, likes=0, views=0),
    ]
    valid = [row(user=7, seq=[2, 3], item=6, label=0, likes=9, views=7),                   # likes OOV
             row(user=8, seq=[0] * 100, item=7, label=1, likes=1, views=8)]                # views OOV
    test = [row(user=9, seq=[4, 5, 6, 7, 8], item=8, likes=5, views=8),
            row(user=10, seq=[3], item=9, likes=0, views=1)]
    input_dir, config = write_dataset(tmp_path, {"train": train, "valid": valid, "test": test})
    out = str(tmp_path / "out")
    spec = pp.preprocess(input_dir, out, config, num_shards=2)

    assert spec == FeatureSpec.load(out)
    assert spec.max_len == 4 and spec.num_items == NUM_ITEMS and spec.num_tags == 2 and spec.mm_dim == 3
    assert spec.tag_vocab_size == 7  # tags are i % 4 and 3i % 7: max 6
    assert dict(zip(spec.context, spec.context_vocab_sizes)) == {"likes_level": 5, "views_level": 8}
    assert spec.splits["train"].files == ("train-00000-of-00002.tfrecord.gz", "train-00001-of-00002.tfrecord.gz")
    assert [spec.splits[s].num_rows for s in ("train", "valid", "test")] == [6, 2, 2]
    assert [spec.splits[s].labelled for s in ("train", "valid", "test")] == [True, True, False]
    assert sorted(os.listdir(out)) == sorted(
        ["feature_spec.json", "item_table.npz", "stats.json", "train-00000-of-00002.tfrecord.gz",
         "train-00001-of-00002.tfrecord.gz", "valid-00000-of-00002.tfrecord.gz",
         "valid-00001-of-00002.tfrecord.gz", "test-00000-of-00002.tfrecord.gz",
         "test-00001-of-00002.tfrecord.gz", pp.MANIFEST_FILENAME])
    assert siblings(out) == []

    for split, rows in (("train", train), ("valid", valid), ("test", test)):
        got = read_split(spec, split)
        assert set(got) == {f.name for f in spec.example_features(spec.splits[split].labelled)}
        assert got["item_seq"].tolist() == [expected_history(r["item_seq"], 4) for r in rows]
        for col in ("user_id", "item_id", "likes_level", "views_level") + (("label",) if split != "test" else ()):
            assert got[col].tolist() == [r[col] for r in rows], (split, col)
    assert "label" not in read_split(spec, "test")
    assert read_split(spec, "train")["item_seq"].tolist() == [
        [0, 0, 0, 0], [3, 4, 5, 6], [8, 9, 1, 2], [0, 0, 5, 6], [1, 2, 3, 4], [0, 0, 0, 9]]

    tags, emb = spec.load_item_table()
    ref = item_table()
    np.testing.assert_array_equal(tags, np.array(ref["item_tags"].to_pylist()))
    np.testing.assert_array_equal(emb, np.array(ref["item_emb_d128"].to_pylist(), np.float32))
    assert tags.dtype == np.int32 and emb.dtype == np.float32

    with open(os.path.join(out, "stats.json")) as f:
        stats = json.load(f)
    tr, va, te = (stats["splits"][s] for s in ("train", "valid", "test"))
    assert (tr["rows_in"], tr["rows_out"], tr["rows_quarantined"]) == (6, 6, 0)
    assert tr["positives"] == 4 and tr["positive_rate"] == pytest.approx(4 / 6)
    assert tr["sequence_length_histogram"] == {"0": 1, "1": 1, "2": 1, "4": 1, "5": 1, "6": 1}
    assert tr["truncated_sequences"] == 2 and tr["sequence_length_max"] == 6
    assert tr["context_out_of_vocab"] == {"likes_level": 0, "views_level": 0}
    assert va["context_out_of_vocab"] == {"likes_level": 1, "views_level": 1}
    assert va["sequence_length_histogram"] == {"0": 1, "2": 1} and va["positive_rate"] == 0.5
    assert te["context_out_of_vocab"] == {"likes_level": 1, "views_level": 1}
    assert te["positive_rate"] is None and te["truncated_sequences"] == 1
    assert stats["vocab_sizes"] == {"likes_level": 5, "views_level": 8, "item_id": 10, "item_tags": 7}
    assert stats["max_len"] == 4 and stats["context_vocab_from"] == ["train"]


def test_an_outlier_context_value_does_not_size_the_vocabulary(tmp_path):
    # one train row with views_level 10**12 once gave context_vocab_sizes [10**12 + 1] and an OOM
    outlier = 10**12
    train = good_rows(6) + [row(user=50, seq=[1], item=2, label=1, likes=0, views=outlier)]
    input_dir, config = write_dataset(tmp_path, {"train": train, "valid": good_rows(3, 100),
                                                 "test": good_rows(2, 200)})
    out = str(tmp_path / "out")
    spec = pp.preprocess(input_dir, out, config, num_shards=1)
    # views_level 0..4 plus the outlier: the default bound (100,000) sends the outlier to the OOV row
    assert dict(zip(spec.context, spec.context_vocab_sizes)) == {"likes_level": 3, "views_level": 5}
    assert read_split(spec, "train")["views_level"].tolist() == [0, 1, 2, 3, 4, 0, outlier]  # the model maps it
    with open(os.path.join(out, "stats.json")) as f:
        stats = json.load(f)
    assert stats["context_vocab"]["views_level"] == {
        "max_size": 100_000, "min_count": 1, "vocab_size": 5, "distinct_values": 6,
        "oov_distinct_values": 1, "oov_rows": 1, "oov_values": {str(outlier): 1}}
    assert stats["context_vocab"]["likes_level"]["oov_rows"] == 0
    assert stats["splits"]["train"]["context_out_of_vocab"] == {"likes_level": 0, "views_level": 1}
    assert stats["splits"]["train"]["context_out_of_vocab_values"] == {"likes_level": {},
                                                                       "views_level": {str(outlier): 1}}
    assert stats["vocab_sizes"]["views_level"] == 5
    # and the CLI's summary line says so
    assert pp._oov_note(stats) == ("; train context values sent to the OOV row (see stats.json): "
                                   "views_level 1 value (1 row)")


def test_context_vocab_bounds_come_from_the_dataset_config(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "MAX_REPORTED_OOV_VALUES", 2)
    config = dict(CONFIG, context_vocab={"likes_level": {"max_size": 2},
                                         "views_level": {"min_count": 2}})
    # views_level: 0 x3, 1 x2, 2 x1, 5 x1, 7 x1 -> vocabulary [0, 2): 2, 5 and 7 go to the OOV row
    views = [0, 0, 0, 1, 1, 2, 5, 7]
    train = [row(user=i + 1, seq=[1], item=2, label=i % 2, likes=i % 3, views=v) for i, v in enumerate(views)]
    input_dir, config_path = write_dataset(tmp_path, {"train": train, "valid": good_rows(3, 100),
                                                      "test": good_rows(2, 200)}, config=config)
    out = str(tmp_path / "out")
    spec = pp.preprocess(input_dir, out, config_path, num_shards=2)
    assert dict(zip(spec.context, spec.context_vocab_sizes)) == {"likes_level": 2, "views_level": 2}
    with open(os.path.join(out, "stats.json")) as f:
        stats = json.load(f)
    views_report = stats["context_vocab"]["views_level"]
    assert (views_report["min_count"], views_report["oov_distinct_values"], views_report["oov_rows"]) == (2, 3, 3)
    assert views_report["oov_values"] == {"2": 1, "5": 1}  # capped at 2, most frequent first, ties by value
    likes_report = stats["context_vocab"]["likes_level"]
    assert (likes_report["max_size"], likes_report["oov_rows"], likes_report["oov_values"]) == (2, 2, {"2": 2})
    # valid: good_rows gives views 0, 1, 2 and likes 0, 1, 2
    assert stats["splits"]["valid"]["context_out_of_vocab"] == {"likes_level": 1, "views_level": 1}


def test_bundled_sample_converts_row_for_row(tmp_path):
    out = str(tmp_path / "sample")
    spec = pp.preprocess(SAMPLE, out, max_len=16, num_shards=3)
    with open(os.path.join(out, "stats.json")) as f:
        stats = json.load(f)
    for split in ("train", "valid", "test"):
        src = pq.read_table(os.path.join(SAMPLE, f"{split}.parquet")).to_pydict()
        n = len(src["label"])
        assert stats["splits"][split]["rows_in"] == stats["splits"][split]["rows_out"] == n
        assert spec.splits[split].num_rows == n and len(spec.splits[split].files) == 3
        got = read_split(spec, split)
        for col in ("label", "user_id", "item_id", "views_level"):
            np.testing.assert_array_equal(got[col], np.array(src[col]))
        assert got["item_seq"].tolist() == [expected_history(s, 16) for s in src["item_seq"]]
        assert stats["splits"][split]["positive_rate"] == 0.5
    items = pq.read_table(os.path.join(SAMPLE, "item_info.parquet")).to_pydict()
    tags, emb = spec.load_item_table()
    np.testing.assert_array_equal(tags, np.array(items["item_tags"]))
    np.testing.assert_array_equal(emb, np.array(items["item_emb_d128"], np.float32))
    assert spec.context_vocab_sizes == (max(pq.read_table(os.path.join(SAMPLE, "train.parquet"))
                                            ["views_level"].to_pylist()) + 1,)


def test_empty_split_gives_one_empty_shard(tmp_path):
    input_dir, config = write_dataset(tmp_path, {"train": good_rows(5), "valid": [], "test": good_rows(2, 200)})
    spec = pp.preprocess(input_dir, str(tmp_path / "out"), config, num_shards=2)
    assert spec.splits["valid"].files == ("valid-00000-of-00001.tfrecord.gz",)
    assert spec.splits["valid"].num_rows == 0
    assert read_split(spec, "valid")["item_seq"].shape == (0, 4)
    assert read_split(spec, "train")["user_id"].tolist() == [1, 2, 3, 4, 5]


def test_item_table_without_padding_row_gets_one(tmp_path):
    full = item_table(NUM_ITEMS + 1)
    input_dir, config = write_dataset(tmp_path, items=full.slice(1))  # ids 1..10
    spec = pp.preprocess(input_dir, str(tmp_path / "out"), config)
    tags, emb = spec.load_item_table()
    assert spec.num_items == NUM_ITEMS + 1
    np.testing.assert_array_equal(tags, np.array(full["item_tags"].to_pylist()))
    np.testing.assert_array_equal(emb, np.array(full["item_emb_d128"].to_pylist(), np.float32))
    with open(tmp_path / "out" / "stats.json") as f:
        assert json.load(f)["item_table"]["padding_row_added"] is True


def test_item_table_row0_is_padding(tmp_path):
    t = item_table()
    tags = t["item_tags"].to_pylist()
    tags[0] = [3, 3]
    t = t.set_column(1, "item_tags", pa.array(tags))
    input_dir, config = write_dataset(tmp_path, items=t)
    spec = pp.preprocess(input_dir, str(tmp_path / "out"), config)
    got_tags, got_emb = spec.load_item_table()
    assert got_tags[0].tolist() == [0, 0] and got_emb[0].tolist() == [0, 0, 0]
    assert got_tags[1:].tolist() == tags[1:]
    with open(tmp_path / "out" / "stats.json") as f:
        assert json.load(f)["item_table"]["padding_row_zeroed"] is True


# --------------------------------------------------------------------------
# Output directory: replaced on success only
# --------------------------------------------------------------------------


def test_rerun_replaces_the_output(tmp_path):
    input_dir, config = write_dataset(tmp_path)
    out = str(tmp_path / "out")
    pp.preprocess(input_dir, out, config, num_shards=3)
    assert len([n for n in os.listdir(out) if n.startswith("train-")]) == 3
    spec = pp.preprocess(input_dir, out, config, num_shards=1, max_len=2)
    assert sorted(os.listdir(out)) == sorted(
        ["feature_spec.json", "item_table.npz", "stats.json", "train-00000-of-00001.tfrecord.gz",
         "valid-00000-of-00001.tfrecord.gz", "test-00000-of-00001.tfrecord.gz", pp.MANIFEST_FILENAME])
    assert spec.max_len == 2 and read_split(spec, "train")["item_seq"].shape == (6, 2)
    assert siblings(out) == []


def test_failure_mid_pipeline_keeps_the_previous_output(tmp_path, monkeypatch):
    input_dir, config = write_dataset(tmp_path)
    out = str(tmp_path / "out")
    pp.preprocess(input_dir, out, config, num_shards=2)
    before = listing(out)

    calls = []
    real = pp.encode_tfrecords

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(pp, "encode_tfrecords", failing)
    with pytest.raises(Exception, match="disk full"):
        pp.preprocess(input_dir, out, config, num_shards=3, max_len=2)
    assert len(calls) >= 3
    assert listing(out) == before
    assert siblings(out) == []

    # Without a previous output, a failed run leaves nothing at all.
    calls.clear()
    fresh = str(tmp_path / "fresh")
    with pytest.raises(Exception, match="disk full"):
        pp.preprocess(input_dir, fresh, config, num_shards=3)
    assert not os.path.exists(fresh) and siblings(fresh) == []


def test_a_work_item_the_runner_loses_fails_the_run(tmp_path, monkeypatch):
    """Shards are written inside workers; a work item that never runs (an element the runner lost) is an error
    naming the shard, not a quietly smaller dataset."""
    input_dir, config = write_dataset(tmp_path)
    real = pp.convert_shard

    def losing(item, job):
        return None if item.split == "valid" else real(item, job)

    monkeypatch.setattr(pp, "convert_shard", losing)
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="shard valid-.* did not complete"):
        pp.preprocess(input_dir, out, config, num_shards=2)
    assert not os.path.exists(out) and siblings(out) == []


def test_refuses_to_replace_an_unrelated_directory(tmp_path):
    input_dir, config = write_dataset(tmp_path)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(pp.PreprocessError, match="not a preprocessing output"):
        pp.preprocess(input_dir, str(precious), config)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(pp.PreprocessError, match="replace the input"):
        pp.preprocess(input_dir, input_dir, config)


def test_rerun_replaces_only_what_preprocessing_wrote(tmp_path):
    """A model dir and notes placed in an earlier output survive a rerun; its old shards do not."""
    input_dir, config = write_dataset(tmp_path)
    out = tmp_path / "out"
    pp.preprocess(input_dir, str(out), config, num_shards=3)
    (out / "model").mkdir()
    (out / "model" / "best.keras").write_bytes(b"weights")
    (out / "NOTES.txt").write_text("keep me")
    spec = pp.preprocess(input_dir, str(out), config, num_shards=1, max_len=2)
    written = ["feature_spec.json", "item_table.npz", "stats.json", "train-00000-of-00001.tfrecord.gz",
               "valid-00000-of-00001.tfrecord.gz", "test-00000-of-00001.tfrecord.gz", pp.MANIFEST_FILENAME]
    assert sorted(os.listdir(out)) == sorted(written + ["NOTES.txt", "model"])
    assert (out / "NOTES.txt").read_text() == "keep me" and (out / "model" / "best.keras").read_bytes() == b"weights"
    assert json.loads((out / pp.MANIFEST_FILENAME).read_text())["files"] == sorted(written)
    assert spec.max_len == 2 and read_split(spec, "train")["item_seq"].shape == (6, 2)
    assert siblings(out) == []

    # An output of a version before manifests: its files are the ones its spec names.
    os.remove(out / pp.MANIFEST_FILENAME)
    pp.preprocess(input_dir, str(out), config, num_shards=2)
    assert sorted(n for n in os.listdir(out) if n.startswith("train-")) == [
        "train-00000-of-00002.tfrecord.gz", "train-00001-of-00002.tfrecord.gz"]
    assert (out / "NOTES.txt").read_text() == "keep me"

    # A kept file with the name of one preprocessing would write: refused, nothing changed.
    (out / "valid-00000-of-00001.tfrecord.gz").write_bytes(b"mine")
    before = listing(out)
    with pytest.raises(pp.PreprocessError, match=r"holds \['valid-00000-of-00001.tfrecord.gz'\], which "
                                                 r"preprocessing did not write"):
        pp.preprocess(input_dir, str(out), config, num_shards=1)
    assert listing(out) == before and siblings(out) == []


def test_killed_runs_leftovers_are_removed_by_the_next_run(tmp_path):
    input_dir, config = write_dataset(tmp_path)
    out = tmp_path / "out"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)

    def leftover(name, pid=None):
        (tmp_path / name / "_parts").mkdir(parents=True)
        if pid is not None:
            (tmp_path / name / pp.MANIFEST_FILENAME).write_text(json.dumps(
                {"tool": "pipelines.preprocess", "host": socket.gethostname(), "pid": pid, "files": None}))

    leftover("out.tmp-0badf00d", dead)  # a killed run's: removed
    leftover("out.tmp-11ve0000", os.getppid())  # a run still going: kept
    leftover("out.tmp-5afe0000")  # no marker, not ours: kept
    leftover("out.old-0badf00d", dead)  # without an output to go with it: kept
    pp.preprocess(input_dir, str(out), config, num_shards=1)
    assert siblings(out) == ["out.old-0badf00d", "out.tmp-11ve0000", "out.tmp-5afe0000"]
    pp.preprocess(input_dir, str(out), config, num_shards=1)  # now the output exists
    assert siblings(out) == ["out.tmp-11ve0000", "out.tmp-5afe0000"]


def test_output_follows_the_umask(tmp_path):
    input_dir, config = write_dataset(tmp_path)
    old = os.umask(0o027)
    try:
        pp.preprocess(input_dir, str(tmp_path / "out"), config, num_shards=1)
    finally:
        os.umask(old)
    modes = {n: os.stat(tmp_path / "out" / n).st_mode & 0o777 for n in os.listdir(tmp_path / "out")}
    assert set(modes.values()) == {0o640} and os.stat(tmp_path / "out").st_mode & 0o777 == 0o750


def test_unknown_beam_arguments_are_rejected(tmp_path):
    input_dir, config = write_dataset(tmp_path)
    with pytest.raises(pp.PreprocessError, match="--max_lne"):
        pp.preprocess(input_dir, str(tmp_path / "out"), config, beam_options=["--max_lne=3"])
    assert not os.path.exists(tmp_path / "out")


def _busy_bundle(_, n, work):
    """One bundle that emits ``n`` elements over a few seconds (longer than Beam's 1 s timed flush)."""
    for i in range(n):
        sum(range(work))
        yield i % 97, i


def test_default_runner_loses_nothing_from_a_long_bundle(tmp_path):
    """Beam's multi_threading data plane flushed every output stream from a timer thread once a second, racing
    the bundle's writer: elements vanished at random from any bundle that outlasted a second (build_examples lost
    users and rows). With the default options every element arrives, run after run."""
    n = 200_000
    for run in range(2):
        out = tmp_path / f"count{run}.txt"
        p = beam.Pipeline(options=beamio.pipeline_options(["--direct_num_workers=1"]))
        _ = (p | beam.Create([0]) | beam.FlatMap(_busy_bundle, n, 500) | beam.GroupByKey()
             | beam.Map(lambda kv: len(kv[1])) | beam.CombineGlobally(sum)
             | beam.Map(lambda total, path: open(path, "w").write(str(total)), str(out)))
        p.run().wait_until_finish()
        assert int(out.read_text()) == n, f"run {run}"


# --------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------


def test_cli_converts_the_sample(tmp_path):
    out = str(tmp_path / "cli")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.preprocess", f"--input_dir={SAMPLE}", f"--output_dir={out}",
         "--max_len=8", "--num_shards=2", "--direct_running_mode=in_memory", "--direct_num_workers=1"],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=120)  # default config found from any cwd
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1
    assert "train 2,622 rows (2 shards)" in proc.stdout and out in proc.stdout
    assert "OOV" not in proc.stdout  # views_level 0..10: nothing beyond the bound
    assert proc.stderr.strip() == ""
    spec = FeatureSpec.load(out)
    assert spec.max_len == 8 and spec.dataset == "microlens50k_mmctr"
    assert [spec.splits[s].num_rows for s in ("train", "valid", "test")] == [2622, 600, 600]


def test_vocabularies_travel_into_the_data_dir_and_spec(tmp_path):
    """The dataset config's vocabularies (paths relative to it) are checked, copied to vocab/ and named in the spec."""
    config = dict(CONFIG, vocabularies={"item_id": {"path": "vocab/item_id.txt", "dtype": "string", "oov_id": 1}})
    os.makedirs(tmp_path / "vocab")
    (tmp_path / "vocab" / "item_id.txt").write_text("".join(f"v{i}\n" for i in range(2, NUM_ITEMS)))
    input_dir, config_path = write_dataset(tmp_path, config=config)
    spec = pp.preprocess(input_dir, str(tmp_path / "out"), config_path)
    assert spec.vocabularies == {"item_id": {"path": "vocab/item_id.txt", "dtype": "string", "oov_id": 1,
                                             "size": NUM_ITEMS}}
    assert spec.read_vocabulary("item_id") == [f"v{i}" for i in range(2, NUM_ITEMS)]
    assert FeatureSpec.load(str(tmp_path / "out")).vocabulary_key(spec.sequence) == "item_id"
    # A spec saved elsewhere (a training run's model_dir) takes its vocabularies with it.
    spec.save(str(tmp_path / "model"))
    assert (tmp_path / "model" / "vocab" / "item_id.txt").read_text() == (tmp_path / "vocab" / "item_id.txt").read_text()

    (tmp_path / "vocab" / "item_id.txt").write_text("v2\nv3\nv2\n")
    with pytest.raises(pp.PreprocessError, match=r"item_id\.txt: row 2: raw id 'v2' repeats line 0"):
        pp.preprocess(input_dir, str(tmp_path / "out2"), config_path)
    assert not (tmp_path / "out2").exists()
