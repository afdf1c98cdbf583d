"""export.refresh_catalog: new items served from a newer catalog, nothing retrained, old scores bit for bit."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

from export import exporter, refresh_catalog as rc
from qin_tf import fingerprint
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
    new = rc.refresh_catalog(str(tmp / "model"), base, refresh_catalog_rows(spec))
    return spec, base, old, new, str(tmp / "model")


def training_catalog(spec: FeatureSpec) -> dict:
    """Catalog rows of items 2..39 exactly as the training item table holds them."""
    tags, emb = spec.load_item_table()
    return {f"item-{d}": ([f"tag-{t}" for t in tags[d] if t], emb[d]) for d in range(2, 40)}


def refresh_catalog_rows(spec: FeatureSpec) -> dict:
    """The fixture's catalog: the training rows, item CHANGED with another vector, two new items."""
    catalog = training_catalog(spec)
    new_vec = np.random.default_rng(0).normal(0.0, 3.0, spec.mm_dim).astype(np.float32)
    catalog[f"item-{CHANGED}"] = (catalog[f"item-{CHANGED}"][0], catalog[f"item-{CHANGED}"][1] + 1.0)
    catalog[NEW_WITH_VECTOR] = (["tag-2", "no-such-tag", "tag-3"], new_vec)
    catalog[NEW_BARE] = ([], None)
    return catalog


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
    from qin_tf.rows import PreprocessError

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
    assert proc.stderr.strip().splitlines() == [f"refresh_catalog: error: {tmp_path / 'typo'}: no such directory; pass the export "
                                                "base that `python -m export.exporter --export_base=...` wrote."]


# --------------------------------------------------------------------------
# A refresh starts from the weights of the version it extends
# --------------------------------------------------------------------------


def _copy_versions(base: str, dst, versions) -> str:
    import shutil

    out = str(dst / "export")
    for v in versions:
        shutil.copytree(os.path.join(base, str(v)), os.path.join(out, str(v)))
    return out


def test_every_export_carries_the_fingerprint_of_its_training_run(refreshed):
    _, _, old, new, model_dir = refreshed
    model = exporter.load_keras_model(model_dir)
    source = fingerprint.model_fingerprint(model, FeatureSpec.load(model_dir))
    assert fingerprint.read_fingerprint(old) == {"source": source, "weights": fingerprint.weights_digest(model),
                                                 "model_dir": os.path.abspath(model_dir)}
    # The refreshed version serves the same run's weights with a grown item table.
    assert fingerprint.read_fingerprint(new)["source"] == source
    assert fingerprint.read_fingerprint(new)["model_dir"] == os.path.abspath(model_dir)
    assert fingerprint.read_fingerprint(new)["weights"] != fingerprint.weights_digest(model)


def test_a_retrained_model_dir_is_refused_naming_both(refreshed, tmp_path):
    """Same data, another seed: refreshing with it would silently change every served score."""
    import shutil

    spec, base, _, _, model_dir = refreshed
    base = _copy_versions(base, tmp_path, [1, 2])
    retrained = str(tmp_path / "retrained")
    shutil.copytree(model_dir, retrained)
    make_model_dir(FeatureSpec.load(model_dir), retrained, seed=12)
    with pytest.raises(exporter.ExportError) as err:
        rc.refresh_catalog(retrained, base, {"zz-other": ([], None)})
    line = str(err.value)
    assert line.startswith(f"{retrained}: its model (fingerprint ") and f"not the one {base}/2 serves" in line
    assert "\n" not in line and sorted(os.listdir(base)) == ["1", "2"]


def test_an_export_without_a_fingerprint_is_refused(refreshed, tmp_path):
    _, base, _, _, model_dir = refreshed
    base = _copy_versions(base, tmp_path, [1])
    os.remove(os.path.join(base, "1", exporter.FINGERPRINT_PATH))
    with pytest.raises(exporter.ExportError, match=r"/1: exported before versions carried a fingerprint"):
        rc.refresh_catalog(model_dir, base, {"zz-other": ([], None)})
    assert sorted(os.listdir(base)) == ["1"]


def test_a_catalog_that_changes_nothing_writes_no_version(refreshed, tmp_path):
    spec, base, _, _, model_dir = refreshed
    lines = []
    only_trained = _copy_versions(base, tmp_path / "a", [1])
    assert rc.refresh_catalog(model_dir, only_trained, training_catalog(spec), log=lines.append) is None
    refreshed_base = _copy_versions(base, tmp_path / "b", [1, 2])
    assert rc.refresh_catalog(model_dir, refreshed_base, refresh_catalog_rows(spec), log=lines.append) is None
    assert rc.refresh_catalog(model_dir, refreshed_base, {}, log=lines.append) is None
    assert sorted(os.listdir(only_trained)) == ["1"] and sorted(os.listdir(refreshed_base)) == ["1", "2"]
    assert lines == [f"{only_trained}/1: nothing changed (38 catalog items, all served with these tags and vectors "
                     "already); no new version written.",
                     f"{refreshed_base}/2: nothing changed (40 catalog items, all served with these tags and "
                     "vectors already); no new version written.",
                     f"{refreshed_base}/2: the catalog is empty; nothing changed, no new version written."]
    # One changed vector is a change.
    catalog = training_catalog(spec)
    catalog["item-3"] = (catalog["item-3"][0], catalog["item-3"][1] + 0.5)
    assert rc.refresh_catalog(model_dir, only_trained, catalog) == os.path.join(only_trained, "2")


def _cli(model_dir, base, *extra):
    import subprocess
    import sys

    from tests.test_export import REPO

    config = os.path.join(REPO, "configs", "logs", "microlens_sample.json")
    return subprocess.run([sys.executable, "-m", "export.refresh_catalog", f"--model_dir={model_dir}",
                           f"--export_base={base}", f"--config={config}", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_refuses_a_retrained_model_dir_and_an_export_without_raw_ids(refreshed, sample_spec, tmp_path):
    import shutil

    _, base, _, _, model_dir = refreshed
    base = _copy_versions(base, tmp_path, [1, 2])
    retrained = str(tmp_path / "retrained")
    shutil.copytree(model_dir, retrained)
    make_model_dir(FeatureSpec.load(model_dir), retrained, seed=12)
    dense_base = str(tmp_path / "dense_export")
    make_model_dir(sample_spec, str(tmp_path / "dense_model"), seed=4)
    exporter.export_from_model_dir(str(tmp_path / "dense_model"), dense_base)
    for run, want in ((_cli(retrained, base), f"refresh_catalog: error: {retrained}: its model (fingerprint "),
                      (_cli(model_dir, dense_base), f"refresh_catalog: error: {dense_base}/1: this version serves no raw item ids")):
        assert run.returncode == 1 and run.stdout == "", run.stderr[-3000:]
        assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith(want), run.stderr[-3000:]
    assert sorted(os.listdir(base)) == ["1", "2"] and sorted(os.listdir(dense_base)) == ["1"]


def test_cli_with_an_empty_catalog_writes_no_version(refreshed, tmp_path):
    _, base, _, _, model_dir = refreshed
    base = _copy_versions(base, tmp_path, [1, 2])
    (tmp_path / "empty.csv").write_text("item,title\n")
    run = _cli(model_dir, base, f"--catalog={tmp_path / 'empty.csv'}")
    assert run.returncode == 0 and run.stdout == "", run.stderr[-3000:]
    assert run.stderr.strip().splitlines() == [f"{base}/2: the catalog is empty; nothing changed, no new version "
                                               "written."]
    assert sorted(os.listdir(base)) == ["1", "2"]
