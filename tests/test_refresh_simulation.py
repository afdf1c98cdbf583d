"""scripts/refresh_simulation.py: the reduced inputs of `prepare` and the raw-id rows of `evaluate`."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.conftest import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "refresh_simulation.py")

#: user -> items in time order; item 20 is in the catalog only, item 30 in the log only.
SEQUENCES = {1: [10, 11, 12, 13, 14, 11], 2: [11, 15, 10, 16], 3: [12, 13], 4: [17, 10, 11, 12, 18, 19, 30],
             5: [13, 14, 15, 16, 17], 6: [18, 19, 10]}
CATALOG = list(range(10, 21))


@pytest.fixture
def logs(tmp_path):
    """A hand-made sequences log, a hashtag catalog and a vector file; returns the log config's path."""
    (tmp_path / "events.tsv").write_text("".join(f"{u}\t{' '.join(map(str, s))}\n" for u, s in SEQUENCES.items()))
    (tmp_path / "titles.csv").write_text("item,title\n" + "".join(f'{i},"t{i}, a # tag{i % 3}"\n' for i in CATALOG))
    pq.write_table(pa.table({"item_id": CATALOG, "emb": [[float(i), 1.0] for i in CATALOG]}),
                   tmp_path / "vectors.parquet")
    config = {"name": "tiny", "events": {"files": "events.tsv", "format": "sequences", "user": "user",
                                         "item": "item"},
              "catalog": {"files": "titles.csv", "format": "csv", "item": "item",
                          "tags": {"column": "title", "hashtags": True},
                          "vector": {"files": "vectors.parquet", "format": "parquet", "item": "item_id",
                                     "column": "emb"}},
              "split": {"method": "leave_last_out"}, "shards": 1}
    (tmp_path / "logs.json").write_text(json.dumps(config))
    return str(tmp_path / "logs.json")


def train_counts(config_path: str) -> Counter:
    """``(user, item) -> training-period events`` by build_examples' own reader and per-user split."""
    from apache_beam.pvalue import TaggedOutput

    from pipelines import log_readers, user_examples
    from pipelines.logs_config import LogsConfig

    cfg = LogsConfig.load(config_path)
    files = log_readers.match_files(cfg.events.source, "the event log")
    per_user: dict = {}
    for element in enumerate(files):
        for x in log_readers.ReadEvents(cfg).process(element):
            if not isinstance(x, TaggedOutput):
                per_user.setdefault(x[0], []).append(x[1])
    counts: Counter = Counter()
    for user, parts in per_user.items():
        for x in user_examples.UserEvents(cfg, dict(enumerate(files))).process((user, {"events": parts, "user": []})):
            if isinstance(x, TaggedOutput) and x.tag == "item_counts":
                counts.update({(user, item): n for item, n in x.value})
    return counts


def test_prepare_removes_a_seeded_sample_from_every_input_and_only_shrinks_training(logs, tmp_path):
    from pipelines.log_readers import read_catalog
    from pipelines.logs_config import LogsConfig

    rs = load_script("refresh_simulation")
    stats = rs.prepare(logs, str(tmp_path / "w0"), fraction=0.3, seed=0)
    removed = {int(x) for x in (tmp_path / "w0" / "removed_items.txt").read_text().split()}
    # R: 30% of the 10 items both in the log and in the catalog (not 20: catalog only; not 30: log only).
    assert len(removed) == 3 and removed <= set(range(10, 20)) and stats["removed_items"] == 3
    reduced = str(tmp_path / "w0" / "logs_config.json")
    cfg = LogsConfig.load(reduced)
    assert all(os.path.isabs(f) and f.startswith(str(tmp_path / "w0")) for f in cfg.events.source.files)
    lines = (tmp_path / "w0" / "raw" / "events" / "events.tsv").read_text().splitlines()
    got = {int(u): [int(x) for x in s.split()] for u, s in (line.split("\t") for line in lines)}
    assert got == {u: [x for x in s if x not in removed] for u, s in SEQUENCES.items()}  # order kept
    assert stats["events"]["rows_removed"] == sum(x in removed for s in SEQUENCES.values() for x in s)
    catalog = read_catalog(cfg)
    assert set(catalog) == set(CATALOG) - removed
    assert catalog[20][0] == ["tag2"]  # rows kept intact (a quoted title with the delimiter)
    np.testing.assert_array_equal(catalog[20][1], [20.0, 1.0])  # the vector file's row of a kept item
    vectors = pq.read_table(tmp_path / "w0" / "raw" / "vectors" / "vectors.parquet")
    assert set(vectors.column("item_id").to_pylist()) == set(CATALOG) - removed
    # Every reduced training event is a training event of the full log: no later event enters training.
    full, red = train_counts(logs), train_counts(reduced)
    assert all(n <= full[key] for key, n in red.items()) and sum(red.values()) < sum(full.values())
    assert not any(item in removed for _, item in red)
    # Seeded: the same seed draws the same items, another seed others; an existing output is refused.
    rs.prepare(logs, str(tmp_path / "w0b"), fraction=0.3, seed=0)
    rs.prepare(logs, str(tmp_path / "w1"), fraction=0.3, seed=1)
    text = {w: (tmp_path / w / "removed_items.txt").read_text() for w in ("w0", "w0b", "w1")}
    assert text["w0"] == text["w0b"] and text["w0"] != text["w1"]
    with pytest.raises(rs.SimulationError, match="already exists; pass --overwrite"):
        rs.prepare(logs, str(tmp_path / "w1"), fraction=0.3, seed=2)
    assert (tmp_path / "w1" / "removed_items.txt").read_text() == text["w1"]


def test_evaluate_rows_map_dense_ids_back_to_raw_ids_and_part_them_by_target(tmp_path):
    rs = load_script("refresh_simulation")
    (tmp_path / "vocab").mkdir()
    (tmp_path / "vocab" / "item_id.txt").write_text("100\n200\n300\n400\n")  # dense 2..5
    (tmp_path / "dataset_config.json").write_text(json.dumps({
        "name": "x", "splits": {"test": {"file": "test.parquet"}}, "context": ["views_level"],
        "vocabularies": {"item_id": {"path": "vocab/item_id.txt", "dtype": "int64", "oov_id": 1}}}))
    pq.write_table(pa.table({"user_id": [7, 7, 8, 9], "item_seq": [[2, 3], [2, 3], [4, 1], [5]],
                             "views_level": [4, 2, 6, 9], "item_id": [3, 5, 2, 4], "label": [1, 0, 1, 0]}),
                   tmp_path / "test.parquet")
    rows, masks, _ = rs.raw_split_rows(str(tmp_path), "test", {200, 400}, level_name="views_level")
    assert rows[2] == {"item_id": 100, "item_seq": [300, 401], "views_level": 6, "label": 1, "user_id": 8}
    assert [r["item_id"] for r in rows] == [200, 400, 100, 300]
    assert [r["views_level"] for r in rows] == [0, 0, 6, 9]  # a removed target: unseen in training
    np.testing.assert_array_equal(masks["removed"], [True, True, False, False])
    np.testing.assert_array_equal(masks["kept"], [False, False, True, True])
    np.testing.assert_array_equal(masks["untouched"], [False, False, True, False])  # row 3's history has 400
    rows, _, _ = rs.raw_split_rows(str(tmp_path), "test", {200, 400}, level_name="views_level",
                                   new_item_level="full")
    assert [r["views_level"] for r in rows] == [4, 2, 6, 9]
