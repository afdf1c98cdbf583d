"""Bad input to pipelines.build_examples (and the vocabularies pipelines.preprocess reads): one line, nothing left.

The raw-id rule (:data:`qin_tf.spec.RAW_ID_RULE`) on every id, tag and context
value a build puts in a vocabulary or an output; times that are not finite;
bytes that are not UTF-8; malformed catalog vectors; config values of the
wrong type; an impossible ``negatives.per_positive`` and the bounded sampler.
Most cases call the library functions the CLIs wrap and check the error a CLI
prints as its one line (``main`` turns exactly these classes into
``build_examples: error: <message>``, exit 1); a handful run the real CLIs.
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

from pipelines import beamio
from pipelines import build_examples as be
from pipelines import preprocess as pp
from pipelines.build_examples import DATASET_CONFIG_FILENAME, RunnerError, build_examples
from pipelines.logs_config import LogsConfig, LogsConfigError
from pipelines.user_examples import MakeExamples
from qin_tf.rows import PreprocessError, one_line
from pipelines.vocabularies import read_vocab, write_vocab
from qin_tf.spec import RAW_ID_RULE, INT64_MAX, SpecError
from tests.cli_in_process import run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: What build_examples' main turns into one line and exit 1.
CLI_ERRORS = (PreprocessError, LogsConfigError, SpecError, RunnerError, OSError)


def write(d, files: dict, cfg: dict):
    """Writes ``files`` (name -> text, bytes or a pyarrow table) and the log config ``cfg`` into ``d``."""
    os.makedirs(d, exist_ok=True)
    for name, content in files.items():
        path = os.path.join(d, name)
        if isinstance(content, pa.Table):
            pq.write_table(content, path)
        else:
            with open(path, "wb") as f:
                f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
    path = os.path.join(d, "logs.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def string_cfg(**over):
    cfg = {"name": "bad", "id_dtype": "string", "shards": 1,
           "events": {"files": "events.csv", "user": "user", "item": "item", "time": "ts"}}
    cfg.update(over)
    return cfg


EVENTS = "user,item,ts\nu1,i1,1\nu1,i2,2\nu1,i3,3\nu2,i1,1\nu2,i3,2\n"


def fails(tmp_path, files, cfg, message, cls=PreprocessError):
    """Builds into tmp_path/out, expects ``cls`` with ``message`` (a substring) as its one line; nothing left."""
    path = write(str(tmp_path), files, cfg)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(CLI_ERRORS) as e:
        build_examples(path, str(tmp_path / "out"))
    line = one_line(e.value)
    assert isinstance(e.value, cls), (type(e.value), line)
    assert str(e.value) == line and "Traceback" not in line  # already one line: nothing for main to fold
    assert message in line, line
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary directory
    return line


# --------------------------------------------------------------------------
# 1. The raw-id rule, at build time
# --------------------------------------------------------------------------


def int_cfg(**over):
    cfg = {"name": "bad", "shards": 1, "events": {"files": "events.parquet", "user": "uid", "item": "iid"}}
    cfg.update(over)
    return cfg


def int_events(users, items, item_type=pa.int64()):
    return pa.table({"uid": pa.array(users, pa.int64()), "iid": pa.array(items, item_type)})


@pytest.mark.parametrize("users,items,item_type,message", [
    ([1, 1, 1], [5, 0, 6], pa.int64(), "row 1, column `iid`: 0 is padding, not an id"),
    ([1, 1, 1], [5, -7, 6], pa.int64(), "row 1, column `iid`: -7 is negative"),
    ([1, -2, 1], [5, 6, 7], pa.int64(), "row 1, column `uid`: -2 is negative"),
    ([1, 1, 1], [5, 6, 2 ** 63], pa.uint64(), "row 2, column `iid`: 9223372036854775808 is beyond int64"),
])
def test_int64_ids_that_break_the_rule_are_bad_rows(tmp_path, users, items, item_type, message):
    line = fails(tmp_path, {"events.parquet": int_events(users, items, item_type)}, int_cfg(), message)
    assert line.startswith(f"{tmp_path}/events.parquet: ") and line.endswith(RAW_ID_RULE)


@pytest.mark.parametrize("events,message", [
    # a CRLF leftover: build, preprocessing and training took it, the export failed on a duplicate key
    ('user,item,ts\nu1,i1,1\nu1,"i2\r",2\n', "row 1, column `item`: 'i2\\r' holds a control character"),
    # a newline in a user id shifted vocab/user_id.txt by a line
    ('user,item,ts\nu1,i1,1\n"u\n2",i2,2\n', "row 1, column `user`: 'u\\n2' holds a control character"),
    ("user,item,ts\nu1,i1,1\nu1,i2\u2028x,2\n", "row 1, column `item`: 'i2\\u2028x' holds a control character"),
    # beyond int64 in a CSV (int64 ids)
    ("user,item,ts\n1,5,1\n1,9223372036854775808,2\n", "row 1, column `item`: 9223372036854775808 is beyond int64"),
])
def test_csv_ids_that_break_the_rule_are_bad_rows(tmp_path, events, message):
    cfg = string_cfg(id_dtype="int64") if "922337" in events else string_cfg()
    fails(tmp_path, {"events.csv": events}, cfg, f"{tmp_path}/events.csv: {message}")


def catalog_cfg(**catalog):
    return string_cfg(id_dtype="int64", catalog={"files": "items.csv", "item": "item", **catalog})


INT_EVENTS = "user,item,ts\n1,5,1\n1,6,2\n1,7,3\n2,5,1\n2,7,2\n"


@pytest.mark.parametrize("files,cfg,message", [
    ({"items.csv": "item,genres\n5,a\n0,b\n"}, catalog_cfg(tags={"column": "genres"}),
     "items.csv: row 1, column `item`: 0 is padding, not an id"),
    ({"items.csv": "item,genres\n5,a\n6,\"b|c\x01d\"\n"}, catalog_cfg(tags={"column": "genres", "delimiter": "|"}),
     "items.csv: row 1, column `genres`: tag 'c\\x01d' holds a control character"),
    ({"items.csv": "item\n5\n", "vecs.csv": "item,v\n5,\"[1, 2]\"\n-6,\"[1, 2]\"\n"},
     catalog_cfg(vector={"files": "vecs.csv", "item": "item", "column": "v"}),
     "vecs.csv: row 1, column `item`: -6 is negative"),
    ({"users.csv": "user,device\n1,a\n2,\"b\r\"\n"}, string_cfg(id_dtype="int64", users={
        "files": "users.csv", "user": "user", "context": ["device"]}),
     "users.csv: row 1, column `device`: 'b\\r' holds a control character"),
    ({"users.csv": "user,device\n1,a\n0,b\n"}, string_cfg(id_dtype="int64", users={
        "files": "users.csv", "user": "user", "context": ["device"]}),
     "users.csv: row 1, column `user`: 0 is padding, not an id"),
])
def test_catalog_vector_and_user_table_keep_the_rule(tmp_path, files, cfg, message):
    fails(tmp_path, {"events.csv": INT_EVENTS, **files}, cfg, f"{tmp_path}/{message}")


@pytest.mark.parametrize("tags0,vec0,error", [([0, 0], [0.0, 0.0], None),
                                              ([0, 3], [0.0, 0.0], "items.parquet: row 0, column `iid`: 0 is padding"),
                                              ([0, 0], [0.0, 1.0], "items.parquet: row 0, column `iid`: 0 is padding")])
def test_an_item_tables_padding_row_is_skipped_any_other_id_0_is_bad(tmp_path, tags0, vec0, error):
    """The challenge layout's item_info.parquet (a catalog or vector file) starts with a padding row:
    item id 0, no tags, a zero vector. It is no item; an id 0 with content breaks the rule."""
    catalog = pa.table({"iid": pa.array([0, 5, 6, 7], pa.int64()), "tags": [tags0, [1, 2], [2, 0], [3, 0]],
                        "v": [vec0, [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]})
    cfg = int_cfg(catalog={"files": "items.parquet", "item": "iid", "tags": {"column": "tags"},
                           "vector": {"column": "v"}}, negatives={"per_positive": 0})
    files = {"events.parquet": int_events([1, 1, 1, 2, 2], [5, 6, 7, 5, 7]), "items.parquet": catalog}
    if error:
        fails(tmp_path, files, cfg, f"{tmp_path}/{error}")
        return
    path = write(str(tmp_path), files, cfg)
    stats = build_examples(path, str(tmp_path / "out"))
    assert sorted(read_vocab(str(tmp_path / "out" / "vocab" / "item_id.txt"), "int64")) == [5, 6, 7]
    assert stats["bad_rows"] == {} and stats["catalog_rows_in"] == 4


def test_a_context_value_with_a_line_break_is_a_bad_row(tmp_path):
    events = 'user,item,ts,device\nu1,i1,1,a\nu1,i2,2,"b\nc"\n'
    cfg = string_cfg()
    cfg["events"]["context"] = ["device"]
    fails(tmp_path, {"events.csv": events}, cfg,
          f"{tmp_path}/events.csv: row 1, column `device`: 'b\\nc' holds a control character")


def test_drop_counts_rule_breakers_and_keeps_them_out_of_the_vocabularies(tmp_path):
    events = ("user,item,ts\nu1,i1,1\nu1,i2,2\nu1,i3,3\nu1,\"i9\r\",4\nu1,i1,5\nu1,i2,6\n"
              "\"u\n9\",i1,1\n\"u\n9\",i2,2\nu2,i1,1\nu2,i3,2\n")
    path = write(str(tmp_path), {"events.csv": events}, string_cfg(on_bad_row="drop"))
    stats = build_examples(path, str(tmp_path / "out"))
    assert stats["bad_rows"] == {"bad_raw_id": 3}
    assert stats["events_dropped"]["bad_row:bad_raw_id"] == 3
    assert read_vocab(str(tmp_path / "out" / "vocab" / "item_id.txt")) == ["i1", "i2", "i3"]
    assert read_vocab(str(tmp_path / "out" / "vocab" / "user_id.txt")) == ["u1", "u2"]


def test_vocabulary_files_round_trip_every_id_the_rule_accepts(tmp_path):
    strings = ["é", "日本語", "a b", " lead", "tab\u00a0nbsp", "0", "-1", "x" * 300, "😀"]
    ints = [1, 2 ** 62, INT64_MAX]
    write_vocab(str(tmp_path / "s.txt"), strings)
    write_vocab(str(tmp_path / "i.txt"), ints)
    assert read_vocab(str(tmp_path / "s.txt")) == strings
    assert read_vocab(str(tmp_path / "i.txt"), "int64") == ints
    # and through a whole build (a catalog gives every item a dense id): unicode string ids, the largest int64
    events = "user,item,ts\nü,日本,1\nü,😀,2\nü,é,3\nv,日本,1\nv,é,2\n"
    catalog = "".join(json.dumps({"item": x}) + "\n" for x in ("日本", "😀", "é"))
    path = write(str(tmp_path / "s"), {"events.csv": events, "items.jsonl": catalog},
                 string_cfg(negatives={"per_positive": 0}, catalog={"files": "items.jsonl", "item": "item"}))
    build_examples(path, str(tmp_path / "s" / "out"))
    assert sorted(read_vocab(str(tmp_path / "s" / "out" / "vocab" / "item_id.txt"))) == sorted(["日本", "😀", "é"])
    assert read_vocab(str(tmp_path / "s" / "out" / "vocab" / "user_id.txt")) == ["v", "ü"]
    catalog = pa.table({"iid": pa.array([5, 6, INT64_MAX], pa.int64())})
    path = write(str(tmp_path / "i"), {"events.parquet": int_events([1, 1, 1, 2, 2], [INT64_MAX, 5, 6, INT64_MAX, 6]),
                                       "items.parquet": catalog},
                 int_cfg(negatives={"per_positive": 0}, catalog={"files": "items.parquet", "item": "iid"}))
    build_examples(path, str(tmp_path / "i" / "out"))
    assert sorted(read_vocab(str(tmp_path / "i" / "out" / "vocab" / "item_id.txt"), "int64")) == [5, 6, INT64_MAX]


# --------------------------------------------------------------------------
# 1b. Preprocessing refuses a vocabulary file that breaks the rule
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("built")
    events = "user,item,ts\n1,5,1\n1,6,2\n1,7,3\n1,8,4\n2,5,1\n2,7,2\n2,8,3\n"
    path = write(str(d), {"events.csv": events}, string_cfg(id_dtype="int64", negatives={"per_positive": 1}))
    build_examples(path, str(d / "ex"))
    assert read_vocab(str(d / "ex" / "vocab" / "item_id.txt"), "int64") == [5, 6]  # the training period's
    return str(d / "ex")


def _copy_built(built, dst):
    import shutil

    shutil.copytree(built, dst)
    return dst


@pytest.mark.parametrize("lines,message", [
    (["6", "5\r"], "row 1: '5\\r' is not a decimal int64"),
    (["6", "0"], "row 1: 0 is padding, not an id"),
    (["6", "-5"], "row 1: -5 is negative"),
    (["6", "9223372036854775808"], "row 1: 9223372036854775808 is beyond int64"),
    (["6", "6"], "row 1: raw id '6' repeats line 0"),
])
def test_preprocess_refuses_a_vocabulary_that_breaks_the_rule(built, tmp_path, lines, message):
    ex = _copy_built(built, str(tmp_path / "ex"))
    vocab = os.path.join(ex, "vocab", "item_id.txt")
    with open(vocab, "w", newline="") as f:
        f.write("".join(f"{x}\n" for x in lines))
    with pytest.raises(PreprocessError) as e:
        pp.preprocess(ex, str(tmp_path / "data"), os.path.join(ex, DATASET_CONFIG_FILENAME))
    assert str(e.value).startswith(f"{vocab}: {message}"), str(e.value)
    assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["ex"]


def test_preprocess_refuses_a_string_vocabulary_line_with_a_carriage_return(built, tmp_path):
    ex = _copy_built(built, str(tmp_path / "ex"))
    cfg_path = os.path.join(ex, DATASET_CONFIG_FILENAME)
    cfg = json.load(open(cfg_path))
    cfg["vocabularies"]["item_id"]["dtype"] = "string"
    json.dump(cfg, open(cfg_path, "w"))
    vocab = os.path.join(ex, "vocab", "item_id.txt")
    with open(vocab, "w", newline="") as f:
        f.write("6\n5\r\n")
    with pytest.raises(PreprocessError) as e:
        pp.preprocess(ex, str(tmp_path / "data"), cfg_path)
    assert str(e.value) == f"{vocab}: row 1: '5\\r' holds a control character or line break; {RAW_ID_RULE}"


# --------------------------------------------------------------------------
# 2. Times
# --------------------------------------------------------------------------


NAN_EVENTS = "user,item,ts\nu1,i1,1\nu1,i2,nan\nu1,i3,3\nu1,i4,4\nu2,i5,1\nu2,i6,inf\nu2,i7,2\nu2,i8,3\n"


def test_a_non_finite_time_fails_with_one_line(tmp_path):
    fails(tmp_path, {"events.csv": NAN_EVENTS}, string_cfg(),
          f"{tmp_path}/events.csv: row 1, column `ts`: time 'nan' is not a finite number")


def test_a_non_finite_time_is_counted_and_in_no_history_under_drop(tmp_path):
    catalog = "item\n" + "".join(f"i{i}\n" for i in range(1, 9))  # every item gets a dense id
    path = write(str(tmp_path), {"events.csv": NAN_EVENTS, "items.csv": catalog},
                 string_cfg(on_bad_row="drop", negatives={"per_positive": 0},
                            catalog={"files": "items.csv", "item": "item"}))
    stats = build_examples(path, str(tmp_path / "out"))
    assert stats["bad_rows"] == {"non_finite_time": 2}
    assert stats["events_dropped"] == {"bad_row:non_finite_time": 2, "empty_history": 2}
    items = read_vocab(str(tmp_path / "out" / "vocab" / "item_id.txt"))
    seqs = [[items[x - 2] for x in r["item_seq"]] for s in ("train", "valid", "test")
            for r in pq.read_table(str(tmp_path / "out" / f"{s}.parquet")).to_pylist()]
    assert sorted(map(tuple, seqs)) == [("i1",), ("i1", "i3"), ("i5",), ("i5", "i7")]


def test_a_nan_float_time_in_parquet_is_a_bad_row(tmp_path):
    events = pa.table({"user": ["u1", "u1", "u1"], "item": ["a", "b", "c"], "ts": [1.0, float("nan"), 3.0]})
    cfg = string_cfg()
    cfg["events"]["files"] = "events.parquet"
    fails(tmp_path, {"events.parquet": events}, cfg,
          f"{tmp_path}/events.parquet: row 1, column `ts`: time nan is not a finite number")


# --------------------------------------------------------------------------
# 3. Negatives: impossible values refused, the sampler bounded
# --------------------------------------------------------------------------


def test_per_positive_beyond_the_bound_is_refused_by_the_config_check():
    with pytest.raises(LogsConfigError, match=r"^cfg.json: negatives.per_positive must be an integer in "
                                              r"\[0, 1,000\]. Received: 1000000$"):
        LogsConfig.from_dict({"name": "x", "events": {"files": "a.csv", "user": "u", "item": "i"},
                              "negatives": {"per_positive": 1_000_000}}, where="cfg.json")


NEG_EVENTS = "user,item,ts\n1,5,1\n1,6,2\n1,7,3\n1,8,4\n1,9,5\n"  # training period: 5, 6, 7


def test_per_positive_at_the_vocabulary_size_is_refused(tmp_path):
    line = fails(tmp_path, {"events.csv": NEG_EVENTS}, string_cfg(id_dtype="int64", negatives={"per_positive": 3}),
                 "negatives.per_positive must be below the item vocabulary's size (3 items", cls=LogsConfigError)
    assert line.startswith(f"{tmp_path}/logs.json: ") and line.endswith("Received: 3")


class CountingRng:
    """A numpy Generator that counts the draws made through it."""

    def __init__(self, seed):
        self.rng, self.draws = np.random.default_rng(seed), 0

    def integers(self, *a, **k):
        self.draws += 1
        return self.rng.integers(*a, **k)

    def choice(self, *a, **k):
        self.draws += 1
        return self.rng.choice(*a, **k)


@pytest.mark.parametrize("sampling", ["uniform", "popularity"])
@pytest.mark.parametrize("k,free,want", [(3, 5, 3), (5, 5, 5), (9, 5, 5), (900, 1000, 900)])
def test_the_sampler_ends_with_the_documented_number_of_negatives(sampling, k, free, want):
    """A user who touched all items but ``free`` gets ``min(k, free)`` distinct negatives outside them,
    in at most ``4 * want + 64`` single draws and one vectorised draw."""
    n_items = 3618 if free < 1000 else 1200
    cfg = LogsConfig.from_dict({"name": "x", "events": {"files": "a.csv", "user": "u", "item": "i"},
                                "negatives": {"per_positive": k, "sampling": sampling}})
    n_ids = n_items + 2
    rng = np.random.default_rng(0)
    free_ids = set(int(x) for x in rng.choice(np.arange(2, n_ids), free, replace=False))
    own = set(range(1, n_ids)) - free_ids  # OOV 1 too
    w = np.arange(1, n_items + 1, dtype=np.float64)
    items = {"weights": w / w.sum()}
    counting = CountingRng(1)
    out = MakeExamples(cfg)._negatives(counting, own, n_ids, items)
    assert len(out) == want == len(set(out))
    assert set(out) <= free_ids
    assert counting.draws <= 4 * want + 64 + 1


def test_a_user_who_touched_almost_every_item_gets_what_is_left(tmp_path):
    # u1 touched 5 of the catalog's 6 items; 4 negatives per positive: 1 available, 3 unavailable
    events = "user,item,ts\n" + "".join(f"1,{i},{t}\n" for t, i in enumerate([11, 12, 13, 14, 15])) + "2,16,1\n2,11,2\n"
    catalog = "item\n" + "".join(f"{i}\n" for i in range(11, 17))
    path = write(str(tmp_path), {"events.csv": events, "items.csv": catalog},
                 string_cfg(id_dtype="int64", negatives={"per_positive": 4}, catalog={"files": "items.csv",
                                                                                      "item": "item"}))
    stats = build_examples(path, str(tmp_path / "out"))
    vocab = read_vocab(str(tmp_path / "out" / "vocab" / "item_id.txt"), "int64")
    rows = [r for s in ("train", "valid", "test") for r in pq.read_table(str(tmp_path / "out" / f"{s}.parquet"))
            .to_pylist() if r["user_id"] == 1]
    negs = [vocab[r["item_id"] - 2] for r in rows if r["label"] == 0]
    assert negs == [16] * 4  # one per positive with a history: the only item u1 never touched
    assert sum(v["negatives_unavailable"] for v in stats["splits"].values()) == 3 * 4  # u2 gets its 4


# --------------------------------------------------------------------------
# 4. Vectors, bytes, config types: one line each
# --------------------------------------------------------------------------


def test_vectors_of_differing_width_name_both_rows(tmp_path):
    cat = "".join(json.dumps({"item": i, "v": v}) + "\n" for i, v in (("i1", [1, 2]), ("i2", [1, 2, 3])))
    cfg = string_cfg(catalog={"files": "items.jsonl", "item": "item", "vector": {"column": "v"}})
    line = fails(tmp_path, {"events.csv": EVENTS, "items.jsonl": cat}, cfg,
                 f"{tmp_path}/items.jsonl: row 1, column `v`: the item vector has width 3, but the one at "
                 f"{tmp_path}/items.jsonl: row 0, column `v` has width 2")
    assert "while running" not in line and "RuntimeError" not in line


@pytest.mark.parametrize("cell,message", [
    ('"[1, 2"', "the vector must be a JSON list of finite floats: '[1, 2'"),
    ('"[1, ""x""]"', "the vector must be a JSON list of finite floats: '[1, \"x\"]'"),
    ('"[1, NaN]"', "the vector must be a non-empty list of finite floats"),
])
def test_a_malformed_inline_vector_is_a_bad_row(tmp_path, cell, message):
    cat = f"item,v\ni1,\"[1, 2]\"\ni2,{cell}\n"
    cfg = string_cfg(catalog={"files": "items.csv", "item": "item", "vector": {"column": "v"}})
    fails(tmp_path, {"events.csv": EVENTS, "items.csv": cat}, cfg,
          f"{tmp_path}/items.csv: row 1, column `v`: {message}")


@pytest.mark.parametrize("on_bad_row", ["fail", "drop"])
@pytest.mark.parametrize("name,content,over,message", [
    ("events.csv", b"user,item,ts\nu1,i1,1\nu1,i\xff2,2\n", {},
     "events.csv: row 1, column `item`: not UTF-8 text (byte 0xff at offset 4 of line 3)"),
    ("events.jsonl", b'{"user": "u1", "item": "i1", "ts": 1}\n{"user": "u\xc3", "item": "i2", "ts": 2}\n',
     {"files": "events.jsonl"}, "events.jsonl: row 1, column `user`: not UTF-8 text (byte 0xc3"),
    ("events.txt", b"u1\ti1 i2\nu2\ti1 \xfe\n", {"files": "events.txt", "format": "sequences", "time": None},
     "events.txt: row 1, column `item`: not UTF-8 text (byte 0xfe at offset 6 of line 2)"),
])
def test_bytes_that_are_not_utf8_fail_whatever_on_bad_row_says(tmp_path, on_bad_row, name, content, over, message):
    cfg = string_cfg(on_bad_row=on_bad_row)
    cfg["events"].update(over)
    cfg["events"] = {k: v for k, v in cfg["events"].items() if v is not None}
    fails(tmp_path, {name: content}, cfg, f"{tmp_path}/{message}")


def test_a_catalog_that_is_not_utf8_fails(tmp_path):
    cfg = string_cfg(catalog={"files": "items.csv", "item": "item", "tags": {"column": "g"}})
    fails(tmp_path, {"events.csv": EVENTS, "items.csv": b"item,g\ni1,a\ni2,\xe9t\xe9\n"}, cfg,
          f"{tmp_path}/items.csv: row 1, column `g`: not UTF-8 text (byte 0xe9")


BASE = {"name": "x", "events": {"files": "a.csv", "user": "u", "item": "i"}}


@pytest.mark.parametrize("over,message", [
    ({"max_len": "abc"}, "cfg.json: max_len must be an integer >= 1. Received: 'abc'"),
    ({"negatives": {"per_positive": 1.5}}, "cfg.json: negatives.per_positive must be an integer in [0, 1,000]. "
                                           "Received: 1.5"),
    ({"negatives": {"seed": None}}, "cfg.json: negatives.seed must be an integer >= 0. Received: None"),
    ({"history": [1]}, "cfg.json: history: expected a JSON object. Received: [1]"),
    ({"negatives": None}, "cfg.json: negatives: expected a JSON object. Received: None"),
    ({"catalog": ["items.csv"]}, "cfg.json: catalog: expected a JSON object. Received: ['items.csv']"),
    ({"events": {**BASE["events"], "files": 5}}, "cfg.json: events.files must be a glob or a list of globs. "
                                                 "Received: 5"),
    ({"events": {**BASE["events"], "user": ["u"]}}, "cfg.json: events.user must be a non-empty string. "
                                                    "Received: ['u']"),
    ({"events": {**BASE["events"], "delimiter": ";;"}}, "cfg.json: events.delimiter must be a one-character "
                                                        "string. Received: ';;'"),
    ({"events": {**BASE["events"], "header": "yes"}}, "cfg.json: events.header must be true or false. "
                                                      "Received: 'yes'"),
    ({"events": {**BASE["events"], "context": "device"}}, "cfg.json: events.context must be a JSON list. "
                                                          "Received: 'device'"),
    ({"events": {**BASE["events"], "time": "t"}, "split": {"method": "time", "valid_from": "x", "test_from": 2}},
     "cfg.json: split.valid_from must be a finite number. Received: 'x'"),
    ({"name": 3}, "cfg.json: name must be a non-empty string. Received: 3"),
    ({"popularity_level": 1}, "cfg.json: popularity_level must be a non-empty string or null. Received: 1"),
])
def test_config_values_of_the_wrong_type_name_file_and_field(over, message):
    with pytest.raises(LogsConfigError) as e:
        LogsConfig.from_dict({**BASE, **over}, where="cfg.json")
    assert str(e.value) == message


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "logs.json").write_bytes(b'{"name": "\xff"}')
    with pytest.raises(LogsConfigError, match=rf"^{tmp_path}/logs.json: not UTF-8 text \(invalid start byte at "
                                              r"byte 10\)$"):
        LogsConfig.load(str(tmp_path / "logs.json"))


# --------------------------------------------------------------------------
# 5. The real CLIs: exit 1, one line, no traceback, nothing left behind
# --------------------------------------------------------------------------


def _env():
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("QIN_TF_VERBOSE", None)
    return env


def _cli_cases(tmp_path):
    """(name, argv, expected substring of the one line, the output dir that must not exist)."""
    cases = []

    def case(name, files, cfg, expect):
        d = tmp_path / name
        path = write(str(d), files, cfg)
        cases.append((name, ["pipelines.build_examples", f"--config={path}", f"--output_dir={d / 'out'}"],
                      expect, d))

    cat = "".join(json.dumps({"item": i, "v": v}) + "\n" for i, v in (("i1", [1, 2]), ("i2", [1, 2, 3])))
    case("width", {"events.csv": EVENTS, "items.jsonl": cat},
         string_cfg(catalog={"files": "items.jsonl", "item": "item", "vector": {"column": "v"}}),
         "items.jsonl: row 1, column `v`: the item vector has width 3")
    case("utf8", {"events.csv": b"user,item,ts\nu1,i1,1\nu1,i\xff2,2\n"}, string_cfg(on_bad_row="drop"),
         "events.csv: row 1, column `item`: not UTF-8 text")
    case("rawid", {"events.csv": 'user,item,ts\nu1,i1,1\nu1,"i2\r",2\n'}, string_cfg(),
         "events.csv: row 1, column `item`: 'i2\\r' holds a control character")
    case("nan", {"events.csv": NAN_EVENTS}, string_cfg(), "events.csv: row 1, column `ts`: time 'nan' is not")
    case("negatives", {"events.csv": NEG_EVENTS},
         string_cfg(id_dtype="int64", negatives={"per_positive": 3}),
         "logs.json: negatives.per_positive must be below the item vocabulary's size (3 items")
    case("type", {"events.csv": EVENTS}, string_cfg(max_len="abc"), "logs.json: max_len must be an integer >= 1")
    case("bound", {"events.csv": EVENTS}, string_cfg(negatives={"per_positive": 4000}),  # hung before, no output
         "logs.json: negatives.per_positive must be an integer in [0, 1,000]. Received: 4000")
    return cases


def test_cli_sweep_over_malformed_inputs(tmp_path, built):
    cases = _cli_cases(tmp_path)
    ex = _copy_built(built, str(tmp_path / "ex"))
    vocab = os.path.join(ex, "vocab", "item_id.txt")
    with open(vocab, "w", newline="") as f:
        f.write("6\n0\n")
    cases.append(("vocab", ["pipelines.preprocess", f"--input_dir={ex}", f"--output_dir={tmp_path / 'data'}",
                            f"--dataset_config={ex}/{DATASET_CONFIG_FILENAME}"],
                  f"{vocab}: row 1: 0 is padding, not an id", tmp_path))
    # Launched: a bad row, the two checks that stop a sampler that would never end (in a process, a hang is a
    # timeout), and preprocess; started together, each waits mostly on its imports. The other cases run the same
    # main with the same flags in process meanwhile.
    launched = {"width", "negatives", "bound", "vocab"}
    procs = [(name, argv, expect, d, subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=_env(),
                                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for name, argv, expect, d in cases if name in launched]
    results = [(name, argv, expect, d, run_main(*argv)) for name, argv, expect, d in cases if name not in launched]
    for name, argv, expect, d, proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        results.append((name, argv, expect, d, subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)))
    assert sorted(r[0] for r in results) == sorted(c[0] for c in cases)
    for name, argv, expect, d, proc in results:
        stdout, stderr = proc.stdout, proc.stderr
        tool = argv[0].split(".")[-1]
        assert proc.returncode == 1, (name, stderr)
        assert stderr.strip().count("\n") == 0 and stderr.strip(), (name, stderr)
        assert "Traceback" not in stderr and "while running" not in stderr, (name, stderr)
        assert stderr.startswith(f"{tool}: error: ") and expect in stderr, (name, stderr)
        assert stdout == "", (name, stdout)
        left = sorted(x for x in os.listdir(d) if x == "out" or x == "data" or ".tmp-" in x)
        assert left == [], (name, left)


# --------------------------------------------------------------------------
# Beam's wrapper: a worker's own error comes back as itself, quietly
# --------------------------------------------------------------------------


def _raise(x):
    raise PreprocessError("f.csv: row 3, column `x`: bad")


def _raise_type_error(x):
    raise TypeError("odd")


@pytest.mark.parametrize("fn,cls,message", [(_raise, PreprocessError, "f.csv: row 3, column `x`: bad"),
                                             (_raise_type_error, RunnerError,
                                              "the Beam pipeline failed: TypeError: odd")])
def test_run_pipeline_unwraps_a_workers_error(capfd, monkeypatch, fn, cls, message):
    monkeypatch.delenv("QIN_TF_VERBOSE", raising=False)
    p = be.beam.Pipeline(options=beamio.pipeline_options(None))
    _ = p | be.beam.Create([1]) | be.beam.Map(fn)
    with pytest.raises(cls) as e:
        be.run_pipeline(p)
    assert type(e.value) is cls and str(e.value) == message
    assert "Traceback" not in capfd.readouterr().err  # the runner's own printing of it is kept off stderr


def test_preprocess_unwraps_a_workers_error(built, tmp_path, monkeypatch):
    def convert_shard(item, job):
        raise PreprocessError(f"{item.file}: row 0, column `label`: raised in a worker")

    monkeypatch.setattr(pp, "convert_shard", convert_shard)
    with pytest.raises(PreprocessError) as e:
        pp.preprocess(built, str(tmp_path / "data"), os.path.join(built, DATASET_CONFIG_FILENAME))
    assert str(e.value).endswith(".parquet: row 0, column `label`: raised in a worker")
    assert "\n" not in str(e.value) and "while running" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_long_example_making_says_how_far_it_got(capfd):
    cfg = LogsConfig.from_dict({"name": "x", "events": {"files": "a.csv", "user": "u", "item": "i"},
                                "negatives": {"per_positive": 700}})
    fn = MakeExamples(cfg)
    fn.PROGRESS_S = 0.0  # every user is "long" here
    fn._progress()
    fn._progress()
    fn._progress()
    assert capfd.readouterr().err.splitlines() == [
        "build_examples: making examples: 2 users done by this worker (700 negatives per positive)",
        "build_examples: making examples: 3 users done by this worker (700 negatives per positive)"]
