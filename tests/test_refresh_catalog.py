"""export.refresh_catalog: new items served from a newer catalog, nothing retrained, old scores bit for bit."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

from export import exporter, refresh_catalog as rc
from qin_tf.spec import FeatureSpec
from tests.test_export import make_model_dir, make_raw_spec, split_rows

#: The item whose catalog vector changes in the refresh.
CHANGED = 7
NEW_WITH_VECTOR, NEW_BARE = "zz-new-b", "zz-new-a"


def make_tagged_spec(sample_spec: FeatureSpec, directory: str) -> FeatureSpec:
    """The raw-id spec of tests.test_export plus a tag vocabulary ``tag-<d>`` (line n: dense tag n + 1)."""
    spec = make_raw_spec(sample_spec, directory)
    with open(os.path.join(directory, "vocab", "tags.txt"), "w") as f:
        f.write("".join(f"tag-{d}\n" for d in range(2, spec.tag_vocab_size)))
    spec = dataclasses.replace(spec, vocabularies={**spec.vocabularies, "tags": {
        "path": "vocab/tags.txt", "dtype": "string", "oov_id": 1, "size": spec.tag_vocab_size}})
    spec.save(directory)
    return FeatureSpec.load(directory)


@pytest.fixture(scope="module")
def refreshed(sample_spec, tmp_path_factory):
    """(spec, export base, old version dir, new version dir, catalog vectors) of a tiny QIN refreshed once."""
    tmp = tmp_path_factory.mktemp("refresh")
    spec = make_tagged_spec(sample_spec, str(tmp / "data"))
    make_model_dir(spec, str(tmp / "model"), seed=11)
    base = str(tmp / "export")
    old = exporter.export_from_model_dir(str(tmp / "model"), base)
    tags, emb = spec.load_item_table()
    rng = np.random.default_rng(0)
    new_vec = rng.normal(0.0, 3.0, spec.mm_dim).astype(np.float32)
    catalog = {f"item-{d}": ([f"tag-{t}" for t in tags[d] if t], emb[d]) for d in range(2, 40)}
    catalog[f"item-{CHANGED}"] = (catalog[f"item-{CHANGED}"][0], emb[CHANGED] + 1.0)
    catalog[NEW_WITH_VECTOR] = (["tag-2", "no-such-tag", "tag-3"], new_vec)
    catalog[NEW_BARE] = ([], None)
    new = rc.refresh_catalog(str(tmp / "model"), base, catalog)
    return spec, base, old, new, str(tmp / "model")


def _serve(version_dir, signature, inputs):
    loaded = tf.saved_model.load(version_dir, tags=["serve"])
    return loaded.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})["ctr"].numpy()


def test_new_version_next_to_the_old_one_with_the_grown_vocabulary(refreshed):
    spec, base, old, new, _ = refreshed
    assert exporter.servable_versions(base) == [1, 2] and new == os.path.join(base, "2")
    assert sorted(os.listdir(base)) == ["1", "2"]  # no temporary directory left
    new_spec = FeatureSpec.load(os.path.join(new, "assets", "feature_spec.json"))
    vocab = rc._read_lines(rc.export_vocabulary_path(new, new_spec, "item_id"))
    assert vocab == spec.read_vocabulary("item_id") + [NEW_BARE, NEW_WITH_VECTOR]  # existing dense ids kept
    assert new_spec.num_items == spec.num_items + 2
    assert rc._read_lines(rc.export_vocabulary_path(new, new_spec, "tags")) == spec.read_vocabulary("tags")


def test_rows_of_unchanged_items_score_bitwise_as_before(refreshed, sample_spec):
    spec, _, old, new, _ = refreshed
    features = split_rows(sample_spec, "test")[0]
    touched = ((features[spec.target_item] == CHANGED) | (features[spec.sequence] == CHANGED).any(axis=1))
    assert touched.any() and not touched.all()
    before, after = _serve(old, "serving_default", features), _serve(new, "serving_default", features)
    np.testing.assert_array_equal(after[~touched], before[~touched])
    assert not np.array_equal(after[touched], before[touched])  # the changed vector is served
    raw, _ = exporter.raw_rows(spec, features)
    np.testing.assert_array_equal(_serve(new, "serving_raw", raw)[~touched], _serve(old, "serving_raw", raw)[~touched])


def test_a_new_item_is_scored_with_its_vector_and_tags(refreshed, sample_spec):
    spec, _, old, new, model_dir = refreshed
    features = split_rows(sample_spec, "test")[0]
    raw = {k: v[:4] for k, v in exporter.raw_rows(spec, features)[0].items()}
    scores = {}
    for target in (NEW_WITH_VECTOR, NEW_BARE, "never-seen"):
        raw[spec.target_item] = np.asarray([target] * 4, dtype=object)
        scores[target] = _serve(new, "serving_raw", raw)
    # Before the refresh the new item was an unknown raw id: the OOV item.
    raw[spec.target_item] = np.asarray([NEW_WITH_VECTOR] * 4, dtype=object)
    np.testing.assert_array_equal(_serve(old, "serving_raw", raw), scores["never-seen"])
    assert not np.allclose(scores[NEW_WITH_VECTOR], scores[NEW_BARE])
    # The served vector of the new item: the OOV id row, the mean of its known tags, its vector projected.
    from export.exporter import load_keras_model
    from qin_tf.layers.embedding import ItemEmbedding

    trained = next(layer for layer in load_keras_model(model_dir).layers if isinstance(layer, ItemEmbedding))
    loaded = tf.saved_model.load(new, tags=["serve"])
    table = next(v for v in loaded.model_variables if "precomputed_vectors" in v.name).numpy()
    e = trained.embedding_dim
    want_id = np.asarray(trained.id_embeddings)[1]
    want_tags = np.asarray(trained.tag_embeddings)[[2, 3]].mean(axis=0)
    new_dense = spec.num_items + 1
    np.testing.assert_allclose(table[new_dense, :e], want_id, rtol=1e-6)
    np.testing.assert_allclose(table[new_dense, e:2 * e], want_tags, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(table[new_dense - 1, e:], 0.0)  # the bare item: no tags, zero vector


def test_a_failed_refresh_leaves_no_new_version(refreshed, monkeypatch):
    _, base, _, _, model_dir = refreshed

    def broken(*args, **kwargs):
        raise exporter.ExportError("verification failed (injected)")

    monkeypatch.setattr(exporter, "_verify", broken)
    with pytest.raises(exporter.ExportError, match="injected"):
        rc.refresh_catalog(model_dir, base, {"zz-other": ([], None)})
    assert sorted(os.listdir(base)) == ["1", "2"]


def _wait_for_version(client, version: int, timeout_s: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if [s.version for s in client.model_status().model_version_status] == [version]:
            return
        time.sleep(0.2)
    raise AssertionError(f"the server did not switch to version {version} within {timeout_s} s")


def test_local_server_switches_to_the_refreshed_version_without_a_restart(refreshed, sample_spec, tmp_path):
    import shutil

    from tensorflow_serving.apis import predict_pb2

    from export.client import ServingClient
    from export.local_server import LocalServer

    spec, _, old, new, model_dir = refreshed
    base = str(tmp_path / "base")
    shutil.copytree(old, os.path.join(base, "1"))
    features = split_rows(sample_spec, "test")[0]
    raw = {k: v[:4] for k, v in exporter.raw_rows(spec, features)[0].items()}
    raw[spec.target_item] = np.asarray([NEW_WITH_VECTOR] * 4, dtype=object)
    lines = []
    with LocalServer(base, port=0, poll_interval_s=0.2, log=lines.append) as local:
        with ServingClient(local.address, "qin") as client:
            assert [s.version for s in client.model_status().model_version_status] == [1]
            np.testing.assert_array_equal(client.predict(raw, "serving_raw"), _serve(old, "serving_raw", raw))
            catalog = {NEW_WITH_VECTOR: (["tag-2", "tag-3"], np.asarray(
                np.random.default_rng(0).normal(0.0, 3.0, spec.mm_dim), np.float32))}
            written = rc.refresh_catalog(model_dir, base, catalog)
            _wait_for_version(client, 2)
            np.testing.assert_array_equal(client.predict(raw, "serving_raw"), _serve(written, "serving_raw", raw))
            assert not np.array_equal(client.predict(raw, "serving_raw"), _serve(old, "serving_raw", raw))
            req = predict_pb2.PredictRequest()
            req.model_spec.name, req.model_spec.signature_name = "qin", "serving_raw"
            for k, v in raw.items():
                req.inputs[k].CopyFrom(tf.make_tensor_proto(v))
            assert client._predict.Predict(req, timeout=30).model_spec.version.value == 2
    assert any("version 2 (was version 1)" in line for line in lines), lines


def test_a_bad_catalog_row_is_one_line_naming_file_row_and_column(tmp_path):
    from pipelines.log_readers import read_catalog
    from pipelines.logs_config import LogsConfig
    from pipelines.validation import PreprocessError

    (tmp_path / "items.csv").write_text("item,title\n5,a # b\n6,c\n5,again\n")
    cfg = LogsConfig.from_dict({"name": "x", "events": {"files": "e.csv", "user": "u", "item": "i"},
                                "catalog": {"files": "items.csv", "item": "item",
                                            "tags": {"column": "title", "hashtags": True}}}, base=str(tmp_path))
    with pytest.raises(PreprocessError, match=r"items.csv: row 2, column `item`: duplicate item id 5"):
        read_catalog(cfg)
    (tmp_path / "items.csv").write_text("item,title\n5,a # b # c\n6,\n")
    assert read_catalog(cfg) == {5: (["b", "c"], None), 6: ([], None)}


def test_cli_errors_are_one_line(refreshed, tmp_path):
    import subprocess
    import sys

    from tests.test_export import REPO

    _, base, _, _, model_dir = refreshed
    config = os.path.join(REPO, "configs", "logs", "microlens_sample.json")
    proc = subprocess.run([sys.executable, "-m", "export.refresh_catalog", f"--model_dir={model_dir}",
                           f"--export_base={tmp_path / 'typo'}", f"--config={config}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'typo'}: no such directory; pass the export "
                                                "base that `python -m export.exporter --export_base=...` wrote."]
