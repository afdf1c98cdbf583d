"""The dataset configuration and the feature spec: parsing, validation, round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qin_tf.spec import DatasetConfig, FeatureSpec, SplitInfo, SpecError
from tests.conftest import REPO


def _spec(**kw):
    base = dict(dataset="d", label="label", meta=("user_id",), target_item="item_id",
                sequence="item_seq", context=("likes_level", "views_level"),
                context_vocab_sizes=(11, 12), max_len=8, num_items=5, num_tags=2,
                tag_vocab_size=4, mm_dim=3,
                splits={"train": SplitInfo(("train-00000-of-00001.tfrecord.gz",), 10)})
    base.update(kw)
    return FeatureSpec(**base)


@pytest.mark.parametrize("name", ["microlens50k", "mmctr_challenge"])
def test_bundled_dataset_configs_load(name):
    cfg = DatasetConfig.load(f"{REPO}/configs/datasets/{name}.json")
    assert cfg.max_len == 64 and cfg.target_item == "item_id" and cfg.sequence == "item_seq"
    assert cfg.example_columns[0] == "label"


def test_challenge_config_has_both_context_features_and_unlabelled_test():
    cfg = DatasetConfig.load(f"{REPO}/configs/datasets/mmctr_challenge.json")
    assert cfg.context == ("likes_level", "views_level")
    assert cfg.splits["test"].labelled is False and cfg.splits["train"].labelled is True


@pytest.mark.parametrize("change, message", [
    ({"max_len": 0}, "`max_len` must be an integer >= 1"),
    ({"context": ["item_id"]}, "one role only"),
    ({"colour": "red"}, "unknown keys"),
    ({"splits": {}}, "at least one split"),
    ({"context_vocab": {"likes_level": {"max_size": 5}}}, "not context features"),
    ({"context_vocab": {"views_level": {"max_size": 0}}}, "context_vocab.views_level: `max_size` must be"),
    ({"context_vocab": {"views_level": {"min_count": 1.5}}}, "`min_count` must be an integer >= 1"),
    ({"context_vocab": {"views_level": {"size": 5}}}, "must be an object with keys"),
    ({"context_vocab": ["views_level"]}, "`context_vocab` must map"),
])
def test_dataset_config_validation(tmp_path, change, message):
    d = json.loads(open(f"{REPO}/configs/datasets/microlens50k.json").read())
    d.update(change)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(d))
    with pytest.raises(SpecError, match=message):
        DatasetConfig.load(str(p))


def test_context_vocab_bound_round_trips_and_sizes_the_vocabulary():
    d = json.loads(open(f"{REPO}/configs/datasets/microlens50k.json").read())
    cfg = DatasetConfig.from_dict({**d, "context_vocab": {"views_level": {"max_size": 8, "min_count": 2}}})
    assert DatasetConfig.from_dict(cfg.to_dict()) == cfg
    bound = cfg.context_vocab_config("views_level")
    assert (bound.max_size, bound.min_count) == (8, 2)
    # 1 + the largest value seen >= min_count times and below max_size
    assert bound.vocab_size({0: 5, 3: 2, 6: 1, 9: 40, 10**12: 3}) == 4
    assert bound.vocab_size({7: 1}) == 1  # nothing qualifies: only the OOV row is used
    default = DatasetConfig.from_dict(d).context_vocab_config("views_level")
    assert (default.max_size, default.min_count) == (100_000, 1)
    assert default.vocab_size({0: 1, 10: 1, 10**12: 1}) == 11


def test_dataset_config_bad_json_names_the_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{")
    with pytest.raises(SpecError, match="broken.json: not valid JSON"):
        DatasetConfig.load(str(p))


def test_model_features_are_ids_in_fixed_order():
    s = _spec()
    assert s.model_feature_names == ("item_id", "item_seq", "likes_level", "views_level")
    seq = s.model_features[1]
    assert seq.shape == (8,) and seq.dtype == "int64" and seq.vocab_size == 5
    assert [f.name for f in s.example_features()] == ["label", "user_id", *s.model_feature_names]
    assert [f.name for f in s.example_features(labelled=False)][0] == "user_id"
    assert s.context_vocab_size("views_level") == 12


def test_feature_spec_round_trip(tmp_path):
    s = _spec()
    s.save(str(tmp_path))
    loaded = FeatureSpec.load(str(tmp_path))
    assert loaded == s
    assert loaded.base_dir == str(tmp_path)
    assert loaded.split_files("train") == [str(tmp_path / "train-00000-of-00001.tfrecord.gz")]
    with pytest.raises(SpecError, match="split `valid` is not in the feature spec"):
        loaded.split_files("valid")


def test_feature_spec_rejects_other_versions_and_missing_files(tmp_path):
    d = _spec().to_dict()
    d["version"] = 99
    with pytest.raises(SpecError, match="version 99"):
        FeatureSpec.from_dict(d)
    with pytest.raises(SpecError, match="run `python -m pipelines.preprocess` first"):
        FeatureSpec.load(str(tmp_path))


def test_item_table_shapes_are_checked(tmp_path):
    s = _spec(base_dir=str(tmp_path))
    np.savez(tmp_path / "item_table.npz", tags=np.zeros((5, 2)), embedding=np.zeros((5, 3)))
    tags, emb = s.load_item_table()
    assert tags.dtype == np.int32 and emb.dtype == np.float32
    np.savez(tmp_path / "item_table.npz", tags=np.zeros((4, 2)), embedding=np.zeros((5, 3)))
    with pytest.raises(SpecError, match="do not match the spec"):
        s.load_item_table()


def test_the_sequence_rule_pads_and_cuts_one_history():
    from qin_tf.spec import left_pad_recent, pad_sequence

    assert pad_sequence([5, 0, 7, 8], 3).tolist() == [5, 7, 8]        # zeros dropped, most recent kept
    assert pad_sequence([4], 3).tolist() == [0, 0, 4]                 # left-padded
    assert pad_sequence([], 2).tolist() == [0, 0]
    m, c = left_pad_recent(np.array([1, 2, 3, 0, 9]), np.array([0, 0, 0, 2, 2]), 3, 2)
    assert m.tolist() == [[2, 3], [0, 0], [0, 9]] and c.tolist() == [3, 0, 1]


def test_the_id_rule_is_one_function():
    from pipelines import validation
    from qin_tf.spec import first_negative_id, negative_ids

    assert negative_ids([[0, 3], [-1, 2]]).tolist() == [[False, False], [True, False]]
    assert first_negative_id([[0, 3], [2, -7]]) == ((1, 1), -7)
    assert first_negative_id(np.zeros([0], np.int64)) is None
    assert validation.negative_ids is negative_ids  # the item-table rules use the spec's id rule, not a copy


def test_a_missing_path_is_named_without_a_misleading_hint(tmp_path):
    with pytest.raises(SpecError, match="no such file or directory") as err:
        FeatureSpec.load(str(tmp_path / "typo"))
    assert "preprocess" not in str(err.value)
