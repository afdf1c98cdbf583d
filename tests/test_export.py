"""The SavedModel export: layout, signatures, TF Serving's loader path, warmup, no-Python load."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from export import exporter
from qin_tf.cli import error_line
from qin_tf.config import ModelConfig
from qin_tf.data import make_dataset
from qin_tf.model import build_model
from qin_tf.spec import FeatureSpec
from tests.cli_in_process import run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(REPO, "data", "microlens_sample")
#: A tiny QIN: every part (ASTA, QNN with R=2, batch norm, dropout) at small width.
TINY_QIN = ModelConfig(embedding_dim=8, num_layers=2, num_row=2, dropout=0.2, batch_norm=True)
TINY_DIN = ModelConfig(model="din", embedding_dim=8, din_attention_units=(16,), din_dnn_units=(16,),
                       dropout=0.2, batch_norm=True)
#: The challenge winner's Transformer + DCNv2 (keras-rs FeatureCross) at toy width.
TINY_TRANSFORMER_DCN = ModelConfig(model="transformer_dcn", embedding_dim=4, transformer_heads=2,
                                   transformer_ff_units=8, transformer_last_k=4, cross_layers=2,
                                   din_dnn_units=(16,), head_mlp_units=(8,), dropout=0.2, batch_norm=True)


# --------------------------------------------------------------------------
# Helpers shared with test_serving.py and test_score.py
# --------------------------------------------------------------------------


def make_model_dir(spec: FeatureSpec, directory: str, config: ModelConfig = TINY_QIN, seed: int = 0):
    """A model_dir as qin_tf.train leaves it (best.keras, feature_spec.json, config.json), untrained.

    Batch-norm moving statistics are set away from their initial values, so
    that a graph using batch statistics (training mode) would score differently.
    """
    keras.utils.set_random_seed(seed)
    model = build_model(spec, config)
    rng = np.random.default_rng(seed)
    for v in model.non_trainable_variables:
        if v.path.endswith("moving_mean"):
            v.assign(rng.normal(0.0, 0.5, v.shape).astype("float32"))
        elif v.path.endswith("moving_variance"):
            v.assign(rng.uniform(0.5, 2.0, v.shape).astype("float32"))
    os.makedirs(directory, exist_ok=True)
    model.save(os.path.join(directory, exporter.MODEL_FILENAME))
    spec.save(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model": dict(vars(config))}, f, default=list)
    return model


def split_rows(spec: FeatureSpec, split: str):
    """All rows of a split: (model features, labels, serialized examples), in file order."""
    features, labels = next(iter(make_dataset(spec, split, 100_000, training=False)))
    features = {k: v.numpy() for k, v in features.items()}
    serialized = exporter.read_examples(spec, 100_000, [split])
    return features, labels.numpy(), serialized


def keras_scores(model, features) -> np.ndarray:
    return np.asarray(model({k: tf.constant(v) for k, v in features.items()}, training=False)).reshape(-1)


def assert_scores_equal(got, want):
    np.testing.assert_allclose(np.asarray(got).reshape(-1), np.asarray(want).reshape(-1), rtol=1e-5, atol=1e-6)


def read_signature_defs(version_dir: str) -> dict:
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    (graph,) = proto.meta_graphs
    assert list(graph.meta_info_def.tags) == ["serve"]
    return dict(graph.signature_def), graph


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(sample_spec, tmp_path_factory):
    """(model_dir, Keras model) of a tiny QIN on the sample."""
    model_dir = str(tmp_path_factory.mktemp("run") / "model")
    return model_dir, make_model_dir(sample_spec, model_dir)


@pytest.fixture(scope="module")
def exported(sample_spec, trained, tmp_path_factory):
    """(export_base, version_dir) of the tiny QIN, warmup rows from the sample's test split."""
    base = str(tmp_path_factory.mktemp("export") / "qin")
    version_dir = exporter.export_from_model_dir(trained[0], base, data_dir=sample_spec.base_dir)
    return base, version_dir


@pytest.fixture(scope="module")
def test_rows(sample_spec):
    return split_rows(sample_spec, "test")


# --------------------------------------------------------------------------
# Layout and versions
# --------------------------------------------------------------------------


def test_layout_spec_asset_and_versions(sample_spec, trained, exported):
    base, version_dir = exported
    assert version_dir == os.path.join(base, "1")
    for path in ("saved_model.pb", "variables/variables.index", exporter.SPEC_ASSET_PATH, exporter.WARMUP_PATH):
        assert os.path.isfile(os.path.join(version_dir, path)), path
    asset = FeatureSpec.load(os.path.join(version_dir, exporter.SPEC_ASSET_PATH))
    assert asset.to_dict() == sample_spec.to_dict()

    # Next free version, an explicit one, and never an overwrite.
    model = trained[1]
    assert exporter.export_model(model, sample_spec, base) == os.path.join(base, "2")
    assert exporter.export_model(model, sample_spec, base, version=7) == os.path.join(base, "7")
    assert exporter.export_model(model, sample_spec, base) == os.path.join(base, "8")
    with pytest.raises(exporter.ExportError, match="already exists"):
        exporter.export_model(model, sample_spec, base, version=2)
    with pytest.raises(exporter.ExportError, match="version"):
        exporter.export_model(model, sample_spec, base, version=0)
    assert exporter.list_versions(base) == [1, 2, 7, 8]
    assert sorted(os.listdir(base)) == ["1", "2", "7", "8"]  # no temporary directory left
    assert exporter.latest_version_dir(base) == os.path.join(base, "8")


def test_failed_export_leaves_nothing(sample_spec, trained, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise exporter.ExportError("verification failed (simulated)")

    monkeypatch.setattr(exporter, "_verify", broken)
    base = tmp_path / "base"
    with pytest.raises(exporter.ExportError, match="simulated"):
        exporter.export_model(trained[1], sample_spec, str(base))
    assert os.listdir(base) == []


def test_rejects_a_model_of_another_spec(sample_spec, tmp_path):
    x = keras.Input((), dtype="int64", name="some_other_id")
    y = keras.layers.Reshape((), name="ctr")(keras.layers.Dense(1, activation="sigmoid")(
        keras.ops.expand_dims(keras.ops.cast(x, "float32"), -1)))
    with pytest.raises(exporter.ExportError, match="feature spec"):
        exporter.export_model(keras.Model(x, y), sample_spec, str(tmp_path))
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------
# Signatures: names, dtypes, shapes, method
# --------------------------------------------------------------------------


def test_signature_defs_are_named_from_the_spec(sample_spec, exported):
    defs, _ = read_signature_defs(exported[1])
    assert set(defs) == {"serving_default", "predict_examples", "__saved_model_init_op"}
    serving, examples = defs["serving_default"], defs["predict_examples"]
    for sig in (serving, examples):
        assert sig.method_name == "tensorflow/serving/predict"
        assert list(sig.outputs) == ["ctr"]
        assert sig.outputs["ctr"].dtype == types_pb2.DT_FLOAT
        assert [d.size for d in sig.outputs["ctr"].tensor_shape.dim] == [-1]

    assert sorted(serving.inputs) == sorted(sample_spec.model_feature_names)
    for f in sample_spec.model_features:
        info = serving.inputs[f.name]
        assert info.dtype == types_pb2.DT_INT64
        assert [d.size for d in info.tensor_shape.dim] == [-1, *f.shape]
    assert [d.size for d in serving.inputs[sample_spec.sequence].tensor_shape.dim] == [-1, 16]

    assert list(examples.inputs) == ["examples"]
    assert examples.inputs["examples"].dtype == types_pb2.DT_STRING
    assert [d.size for d in examples.inputs["examples"].tensor_shape.dim] == [-1]


def test_inference_graph_has_no_training_branches(exported):
    """No dropout (random ops) and no batch-norm statistics updates in the served graph."""
    _, graph = read_signature_defs(exported[1])
    ops = {n.op for n in graph.graph_def.node}
    for fn in graph.graph_def.library.function:
        ops |= {n.op for n in fn.node_def}
    assert "ParseExampleV2" in ops and "MatMul" in ops
    assert not [op for op in ops if "Random" in op], sorted(ops)
    assert not ops & {"AssignSubVariableOp", "AssignAddVariableOp", "FusedBatchNormV3"}, sorted(ops)
    # Nothing pinned to an accelerator: an export made on a GPU machine loads on a CPU-only server.
    devices = {n.device for n in graph.graph_def.node}
    for fn in graph.graph_def.library.function:
        devices |= {n.device for n in fn.node_def}
    assert not [d for d in devices if "GPU" in d.upper() or "TPU" in d.upper()], devices


# --------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------


def test_tf1_session_loader_matches_keras(exported, trained, test_rows):
    """TF Serving's path: the C++/TF1 loader, a Session, signature tensors run by name."""
    features, _, serialized = test_rows
    want = keras_scores(trained[1], features)
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], exported[1])
        sig = meta.signature_def["serving_default"]
        got = sess.run(sig.outputs["ctr"].name, {sig.inputs[k].name: v for k, v in features.items()})
        sig = meta.signature_def["predict_examples"]
        got_examples = sess.run(sig.outputs["ctr"].name, {sig.inputs["examples"].name: serialized})
    assert got.shape == got_examples.shape == (600,)
    assert_scores_equal(got, want)
    assert_scores_equal(got_examples, want)
    assert np.std(want) > 1e-3  # the model does discriminate rows: the comparison means something


def test_tf2_signatures_match_keras_any_batch(exported, trained, test_rows):
    features, _, serialized = test_rows
    want = keras_scores(trained[1], features)
    loaded = tf.saved_model.load(exported[1])
    serve, serve_examples = loaded.signatures["serving_default"], loaded.signatures["predict_examples"]
    assert_scores_equal(serve(**{k: tf.constant(v) for k, v in features.items()})["ctr"], want)
    for i in (0, 17, 599):  # batch of one == that row of the batch of 600
        one = serve(**{k: tf.constant(v[i:i + 1]) for k, v in features.items()})["ctr"].numpy()
        assert one.shape == (1,)
        assert_scores_equal(one, want[i:i + 1])
        assert_scores_equal(serve_examples(examples=tf.constant(serialized[i:i + 1]))["ctr"], want[i:i + 1])


def test_qnn_rows_are_folded_at_export(sample_spec, exported, trained, test_rows, tmp_path):
    """The served QNN reads [D, D] kernels (sum of the R rows); scores equal the unfolded model's."""
    model = trained[1]
    d = 8 * len(sample_spec.context) + 6 * 8  # QNN input: context embeddings | x_t | interest
    trained_shapes = {v.path: tuple(v.shape) for v in model.weights if "quadratic" in v.path}
    assert trained_shapes == {"qnn/quadratic_0/kernel": (d, 2 * d), "qnn/quadratic_0/bias": (2 * d,),
                              "qnn/quadratic_1/kernel": (d, 2 * d), "qnn/quadratic_1/bias": (2 * d,)}
    loaded = tf.saved_model.load(exported[1])
    served = {v.name.split(":")[0]: tuple(v.shape) for v in loaded.model_variables if "quadratic" in v.name}
    assert served == {"qnn/quadratic_0/kernel": (d, d), "qnn/quadratic_0/bias": (d,),
                      "qnn/quadratic_1/kernel": (d, d), "qnn/quadratic_1/bias": (d,)}
    unfolded = exporter.export_model(model, sample_spec, str(tmp_path), fold_qnn=False)
    features = test_rows[0]
    want = keras_scores(model, features)
    for version_dir in (exported[1], unfolded):
        sig = tf.saved_model.load(version_dir).signatures["serving_default"]
        assert_scores_equal(sig(**{k: tf.constant(v) for k, v in features.items()})["ctr"], want)


def test_asta_and_item_vectors_are_folded_at_export(sample_spec, exported, trained, test_rows, tmp_path):
    """The served ASTA holds W_q W_k^T / sqrt(A) and W_v W_o, [D, D] each, the item embedding one table of
    every item's vector; scores equal the unfolded export's."""
    model = trained[1]
    d = 3 * 8  # item vector width 3E, attention_dim 2D
    assert {v.path: tuple(v.shape) for v in model.weights if v.path.startswith("asta/")} == {
        "asta/W_q": (d, 2 * d), "asta/W_k": (d, 2 * d), "asta/W_v": (d, 2 * d), "asta/W_o": (2 * d, d)}
    loaded = tf.saved_model.load(exported[1])
    served = {v.name.split(":")[0]: tuple(v.shape) for v in loaded.model_variables
              if v.name.startswith(("asta/", "item_embedding/"))}
    assert served == {"asta/W_qk": (d, d), "asta/W_vo": (d, d),
                      "item_embedding/precomputed_vectors": (sample_spec.num_items, d)}
    folded = exporter.fold_for_inference(model)
    assert [v.path for v in folded.get_layer("item_embedding").weights] == ["item_embedding/precomputed_vectors"]
    np.testing.assert_allclose(folded.get_layer("item_embedding").precomputed_vectors.numpy(),
                               model.get_layer("item_embedding").all_item_vectors().numpy(), rtol=1e-6)
    np.testing.assert_allclose(folded.get_layer("asta").W_qk.numpy(),
                               model.get_layer("asta").W_q.numpy() @ model.get_layer("asta").W_k.numpy().T
                               / np.sqrt(2 * d), rtol=1e-4, atol=1e-6)
    assert model.get_layer("asta").folded is False                    # the trained model is left as it was
    unfolded = exporter.export_model(model, sample_spec, str(tmp_path), fold_qnn=False, fold_attention=False,
                                     fold_item_vectors=False)
    assert {v.name.split(":")[0] for v in tf.saved_model.load(unfolded).model_variables
            if v.name.startswith("asta/")} == {"asta/W_q", "asta/W_k", "asta/W_v", "asta/W_o"}
    features = test_rows[0]
    want = keras_scores(model, features)
    for version_dir in (exported[1], unfolded):
        sig = tf.saved_model.load(version_dir).signatures["serving_default"]
        assert_scores_equal(sig(**{k: tf.constant(v) for k, v in features.items()})["ctr"], want)


def test_the_rebuild_behind_folding_and_the_float32_copy_refuses_other_variables(trained):
    """exporter._rebuild (the one rebuild-and-assign step of fold_for_inference and float32_copy) copies
    the weights by path, and refuses a set of variables or a shape other than the one asked for."""
    model = trained[1]
    clone = exporter._rebuild(model, model.get_config(), what="a copy")
    for a, b in zip(model.weights, clone.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    path = model.get_layer("asta").W_q.path
    with pytest.raises(exporter.ExportError, match="^folding: `asta/W_q` has shape .* the new value \\(3, 3\\); fix it\\.$"):
        exporter._rebuild(model, model.get_config(), {path: np.zeros((3, 3))}, what="folding", remedy="; fix it")
    with pytest.raises(exporter.ExportError, match="^folding changed the model's variables unexpectedly\\.$"):
        exporter._rebuild(model, model.get_config(), dropped={path}, what="folding")


def test_unseen_ids_are_served_as_padding_and_oov(sample_spec, exported, trained, test_rows):
    """Ids beyond the item table score as padding; context ids beyond the vocabulary as the OOV row."""
    features = {k: v[:20].copy() for k, v in test_rows[0].items()}
    serve = tf.saved_model.load(exported[1]).signatures["serving_default"]

    def run(feats):
        return serve(**{k: tf.constant(v) for k, v in feats.items()})["ctr"].numpy()

    beyond = dict(features, **{sample_spec.target_item: np.full(20, sample_spec.num_items + 5, np.int64)})
    padding = dict(features, **{sample_spec.target_item: np.zeros(20, np.int64)})
    assert_scores_equal(run(beyond), run(padding))
    ctx = sample_spec.context[0]
    vocab = sample_spec.context_vocab_size(ctx)
    assert_scores_equal(run(dict(features, **{ctx: np.full(20, vocab + 100, np.int64)})),
                        run(dict(features, **{ctx: np.full(20, vocab, np.int64)})))
    assert_scores_equal(run(features), keras_scores(trained[1], features))


#: QIN with a DNN tower beside QNN (--head=qnn_dnn); its QNN rows are folded at export like QIN's.
TINY_QNN_DNN = dataclasses.replace(TINY_QIN, head="qnn_dnn", din_dnn_units=(16,))


@pytest.mark.parametrize("config", [TINY_DIN, TINY_QNN_DNN], ids=["din", "qnn_dnn"])
def test_din_and_qnn_dnn_export_too(sample_spec, tmp_path, test_rows, config):
    model = make_model_dir(sample_spec, str(tmp_path / "model"), config, seed=1)
    version_dir = exporter.export_from_model_dir(str(tmp_path / "model"), str(tmp_path / "export"),
                                                 data_dir=sample_spec.base_dir)
    features, _, serialized = test_rows
    loaded = tf.saved_model.load(version_dir)
    want = keras_scores(model, features)
    assert_scores_equal(loaded.signatures["serving_default"](
        **{k: tf.constant(v) for k, v in features.items()})["ctr"], want)
    assert_scores_equal(loaded.signatures["predict_examples"](examples=tf.constant(serialized))["ctr"], want)


@pytest.mark.parametrize("config", [TINY_QIN, TINY_TRANSFORMER_DCN], ids=["qin", "transformer_dcn"])
def test_a_mixed_bfloat16_model_serves_in_float32(sample_spec, tmp_path, test_rows, config):
    """Trained in mixed_bfloat16, the export computes in float32: no bfloat16 in its graph, and it scores
    as the export of the float32 model with the same weights does, bit for bit."""
    model = make_model_dir(sample_spec, str(tmp_path / "model"), dataclasses.replace(config, dtype_policy="mixed_bfloat16"),
                           seed=2)
    assert any(layer.dtype_policy.compute_dtype == "bfloat16" for layer in model.layers)
    reference = build_model(sample_spec, config)          # float32, the same weights
    reference.set_weights(model.get_weights())
    copy = exporter.float32_copy(model)
    assert sorted(v.path for v in copy.weights) == sorted(v.path for v in model.weights)
    assert all(layer.dtype_policy.compute_dtype == "float32" for layer in copy.layers)
    assert exporter.float32_copy(reference) is reference
    features, _, serialized = test_rows
    want = keras_scores(reference, features)
    np.testing.assert_array_equal(keras_scores(copy, features), want)
    assert np.max(np.abs(keras_scores(model, features) - want)) > 1e-6    # bfloat16 arithmetic rounds otherwise
    served = []
    for which in (model, reference):
        version_dir = exporter.export_model(which, sample_spec, str(tmp_path / "export"))
        _, graph = read_signature_defs(version_dir)
        dtypes = {attr.type for f in graph.graph_def.library.function for node in f.node_def
                  for attr in node.attr.values()} | {attr.type for node in graph.graph_def.node
                                                     for attr in node.attr.values()}
        assert types_pb2.DT_BFLOAT16 not in dtypes and types_pb2.DT_FLOAT in dtypes
        loaded = tf.saved_model.load(version_dir)
        served.append(loaded.signatures["predict_examples"](examples=tf.constant(serialized))["ctr"].numpy())
    np.testing.assert_array_equal(served[0], served[1])
    np.testing.assert_allclose(served[0], want, rtol=1e-4, atol=1e-5)   # folding rounds in float32


# --------------------------------------------------------------------------
# Warmup
# --------------------------------------------------------------------------


def test_warmup_records_are_real_rows_for_both_signatures(sample_spec, exported, test_rows):
    features, _, serialized = test_rows
    path = os.path.join(exported[1], exporter.WARMUP_PATH)
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    n = exporter.DEFAULT_WARMUP_ROWS
    assert [(log.predict_log.request.model_spec.signature_name,
             log.predict_log.request.inputs[next(iter(log.predict_log.request.inputs))].tensor_shape.dim[0].size)
            for log in logs] == [("serving_default", 1), ("predict_examples", 1),
                                 ("serving_default", n), ("predict_examples", n)]
    loaded = tf.saved_model.load(exported[1])
    for log in logs:
        req = log.predict_log.request
        assert req.model_spec.name == "qin"
        inputs = {k: tf.make_ndarray(v) for k, v in req.inputs.items()}
        rows = len(next(iter(inputs.values())))
        if req.model_spec.signature_name == "serving_default":
            assert sorted(inputs) == sorted(sample_spec.model_feature_names)
            for k, v in inputs.items():  # the first rows of the test split
                np.testing.assert_array_equal(v, features[k][:rows])
        else:
            assert list(inputs["examples"]) == serialized[:rows]
        # Each record is a valid request (TF Serving replays them at load time).
        out = loaded.signatures[req.model_spec.signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        assert out["ctr"].shape == (rows,)


def test_warmup_without_data_uses_valid_synthetic_rows(sample_spec, trained, tmp_path):
    """A model_dir's spec copy has no TFRecords beside it: warmup rows are synthetic but valid."""
    version_dir = exporter.export_from_model_dir(trained[0], str(tmp_path))
    path = os.path.join(version_dir, exporter.WARMUP_PATH)
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    assert len(logs) == 4
    req = logs[2].predict_log.request
    seq = tf.make_ndarray(req.inputs[sample_spec.sequence])
    target = tf.make_ndarray(req.inputs[sample_spec.target_item])
    assert seq.shape == (exporter.DEFAULT_WARMUP_ROWS, 16)
    assert (target >= 1).all() and (target < sample_spec.num_items).all()
    assert (seq >= 0).all() and (seq < sample_spec.num_items).all() and (seq[:, -1] > 0).all()


# --------------------------------------------------------------------------
# Loading needs no project code
# --------------------------------------------------------------------------

_NO_PROJECT_CODE = textwrap.dedent("""
    import importlib.abc, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf   # TF itself imports Keras' core; nothing of ours
    PRELOADED = set(sys.modules)
    BLOCKED = ("qin_tf", "pipelines", "export", "keras", "tf_keras", "keras_rs")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED and name not in PRELOADED:
                raise ImportError("blocked: " + name)
            return None

    sys.meta_path.insert(0, Block())
    for name in ("qin_tf", "pipelines", "export", "keras_rs", "keras.saving.custom_objects_for_qin_tf"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit("project code is importable: " + name)
    assert not [m for m in sys.modules if m.split(".")[0] in ("qin_tf", "pipelines", "export", "keras_rs")]

    version_dir, inputs_npz, out_npz = sys.argv[1:4]
    loaded = tf.saved_model.load(version_dir)
    data = np.load(inputs_npz, allow_pickle=True)
    feats = {k: tf.constant(data[k]) for k in data.files if k != "examples"}
    ctr = loaded.signatures["serving_default"](**feats)["ctr"].numpy()
    ctr_ex = loaded.signatures["predict_examples"](examples=tf.constant(list(data["examples"])))["ctr"].numpy()
    new = sorted(m for m in set(sys.modules) - PRELOADED if m.split(".")[0] in BLOCKED)
    np.savez(out_npz, ctr=ctr, ctr_examples=ctr_ex, new_modules=np.array(new, dtype=object))
""")


@pytest.fixture(scope="module")
def exported_transformer_dcn(sample_spec, tmp_path_factory):
    """(version_dir, Keras model) of the tiny Transformer + DCNv2, exported with the sample's test rows."""
    model_dir = str(tmp_path_factory.mktemp("transformer_dcn") / "model")
    model = make_model_dir(sample_spec, model_dir, TINY_TRANSFORMER_DCN, seed=2)
    base = str(tmp_path_factory.mktemp("export_transformer_dcn") / "transformer_dcn")
    return exporter.export_from_model_dir(model_dir, base, data_dir=sample_spec.base_dir), model


def test_transformer_dcn_exports_with_named_signatures(sample_spec, exported_transformer_dcn, test_rows):
    """The winner's model (FeatureCross from keras-rs inside) exports through the same signatures."""
    version_dir, model = exported_transformer_dcn
    defs, _ = read_signature_defs(version_dir)
    assert sorted(defs["serving_default"].inputs) == sorted(sample_spec.model_feature_names)
    assert list(defs["serving_default"].outputs) == ["ctr"] and list(defs["predict_examples"].outputs) == ["ctr"]
    features, _, serialized = test_rows
    loaded = tf.saved_model.load(version_dir)
    want = keras_scores(model, features)
    assert len(np.unique(want)) > 100
    assert_scores_equal(loaded.signatures["serving_default"](
        **{k: tf.constant(v) for k, v in features.items()})["ctr"], want)
    assert_scores_equal(loaded.signatures["predict_examples"](examples=tf.constant(serialized))["ctr"], want)


@pytest.mark.parametrize("which", ["qin", "transformer_dcn"])
def test_loads_and_scores_without_project_code(which, request, test_rows, tmp_path):
    """Neither qin_tf nor keras (nor keras_rs, whose FeatureCross the winner's model holds) is importable."""
    if which == "qin":
        version_dir, model = request.getfixturevalue("exported")[1], request.getfixturevalue("trained")[1]
    else:
        version_dir, model = request.getfixturevalue("exported_transformer_dcn")
    features, _, serialized = test_rows
    np.savez(tmp_path / "inputs.npz", examples=np.array(serialized, dtype=object), **features)
    script = tmp_path / "load.py"
    script.write_text(_NO_PROJECT_CODE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([sys.executable, "-I", str(script), version_dir, str(tmp_path / "inputs.npz"),
                           str(tmp_path / "out.npz")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz", allow_pickle=True)
    assert list(out["new_modules"]) == []
    want = keras_scores(model, features)
    assert_scores_equal(out["ctr"], want)
    assert_scores_equal(out["ctr_examples"], want)


# --------------------------------------------------------------------------
# CLI and serving configuration files
# --------------------------------------------------------------------------


def test_cli_exports_a_given_version(sample_spec, trained, tmp_path):
    base = tmp_path / "base"
    proc = subprocess.run([sys.executable, "-m", "export.exporter", f"--model_dir={trained[0]}",
                           f"--export_base={base}", "--version=3", f"--data_dir={sample_spec.base_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(base / "3")
    assert sorted(os.listdir(base)) == ["3"]
    defs, _ = read_signature_defs(str(base / "3"))
    assert {"serving_default", "predict_examples"} <= set(defs)


def test_models_config_parses_as_model_server_config():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    with open(os.path.join(REPO, "export", "models.config")) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("qin", "/models/qin", "tensorflow")
    assert model.model_version_policy.latest.num_versions == 1


def test_batching_parameters_parse():
    """Parsed as TF Serving's BatchingParameters (its Int64Value fields, rebuilt here)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
    from google.protobuf import wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    fd = descriptor_pb2.FileDescriptorProto(name="batching.proto", package="t",
                                            dependency=["google/protobuf/wrappers.proto"])
    msg = fd.message_type.add(name="BatchingParameters")
    for i, name in enumerate(("max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
                              "num_batch_threads"), start=1):
        msg.field.add(name=name, number=i, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                      type_name=".google.protobuf.Int64Value",
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool.Add(fd)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("t.BatchingParameters"))
    with open(os.path.join(REPO, "export", "batching_parameters.txt")) as f:
        params = text_format.Parse(f.read(), cls())
    from export.client import DEFAULT_BATCH_SIZE

    assert params.max_batch_size.value >= DEFAULT_BATCH_SIZE
    assert params.batch_timeout_micros.value == 2000
    assert params.num_batch_threads.value >= 1 and params.max_enqueued_batches.value >= 1


@pytest.mark.parametrize("case", ["missing_model_dir", "not_a_model_dir", "missing_data_dir"])
def test_cli_bad_paths_are_one_line_with_the_right_hint(case, trained, tmp_path):
    args = {"missing_model_dir": [f"--model_dir={tmp_path / 'typo'}"],
            "not_a_model_dir": [f"--model_dir={tmp_path}"],
            "missing_data_dir": [f"--model_dir={trained[0]}", f"--data_dir={tmp_path / 'typo'}"]}[case]
    args = [f"--export_base={tmp_path / 'base'}", *args]
    if case == "missing_data_dir":  # launched once; the other cases run the same main in process
        proc = subprocess.run([sys.executable, "-m", "export.exporter", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
    else:
        proc = run_main("export.exporter", *args)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    want = {"missing_model_dir": f"{tmp_path / 'typo'}: no such directory",
            "not_a_model_dir": "not a training run's directory",
            "missing_data_dir": f"{tmp_path / 'typo'}: no such file or directory"}[case]
    assert want in proc.stderr and "preprocess" not in proc.stderr, proc.stderr
    assert not (tmp_path / "base").exists() or os.listdir(tmp_path / "base") == []


def test_negative_ids_are_refused_inside_the_graph(sample_spec, exported, test_rows):
    """The spec's id rule is in both signatures, so TF Serving refuses a negative id too."""
    from qin_tf.spec import ID_RULE

    features, _, serialized = test_rows
    loaded = tf.saved_model.load(exported[1])
    bad = {k: tf.constant(v[:3]) for k, v in features.items()}
    seq = features[sample_spec.sequence][:3].copy()
    seq[1, -1] = -4
    with pytest.raises(tf.errors.InvalidArgumentError, match=ID_RULE.replace("(", r"\(").replace(")", r"\)")):
        loaded.signatures["serving_default"](**dict(bad, **{sample_spec.sequence: tf.constant(seq)}))
    example = tf.train.Example.FromString(serialized[0])
    example.features.feature[sample_spec.target_item].int64_list.value[:] = [-2]
    with pytest.raises(tf.errors.InvalidArgumentError, match="ids must be >= 0"):
        loaded.signatures["predict_examples"](examples=tf.constant([example.SerializeToString()]))


def test_latest_version_skips_a_version_without_a_saved_model(exported, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(exported[1], base / "3")
    (base / "4").mkdir()
    lines = []
    assert exporter.latest_version_dir(str(base), log=lines.append) == str(base / "3")
    assert lines == [f"{base / '4'}: skipped, no saved_model.pb in this version directory."]
    with pytest.raises(exporter.ExportError, match="no such directory"):
        exporter.latest_version_dir(str(tmp_path / "typo"))


# --------------------------------------------------------------------------
# Raw ids at the serving boundary (vocabularies in the export)
# --------------------------------------------------------------------------


def make_raw_spec(spec: FeatureSpec, directory: str) -> FeatureSpec:
    """The sample's spec with vocabularies: items as strings ``item-<d>``, ``views_level`` as int64 ``10 d + 3``.

    Line n of a vocabulary is dense id n + 1, so dense 1 (here a real item of
    the sample) has no raw id: raw ids the vocabulary lacks map to it.
    """
    import dataclasses

    from qin_tf.spec import SplitInfo

    os.makedirs(os.path.join(directory, "vocab"), exist_ok=True)
    ctx = spec.context[0]
    with open(os.path.join(directory, "vocab", "item_id.txt"), "w") as f:
        f.write("".join(f"item-{d}\n" for d in range(2, spec.num_items)))
    with open(os.path.join(directory, "vocab", f"{ctx}.txt"), "w") as f:
        f.write("".join(f"{10 * d + 3}\n" for d in range(2, spec.context_vocab_size(ctx))))
    raw = dataclasses.replace(
        spec, base_dir=directory, item_table_file=spec.path(spec.item_table_file),
        splits={k: SplitInfo(tuple(spec.split_files(k)), v.num_rows, v.labelled) for k, v in spec.splits.items()},
        vocabularies={"item_id": {"path": "vocab/item_id.txt", "dtype": "string", "oov_id": 1,
                                  "size": spec.num_items},
                      ctx: {"path": f"vocab/{ctx}.txt", "dtype": "int64", "oov_id": 1,
                            "size": spec.context_vocab_size(ctx)}})
    raw.save(directory)
    return FeatureSpec.load(directory)


@pytest.fixture(scope="module")
def raw_exported(sample_spec, trained, tmp_path_factory):
    """(raw-id spec, version dir) of the tiny QIN exported with vocabularies."""
    spec = make_raw_spec(sample_spec, str(tmp_path_factory.mktemp("raw_data")))
    base = str(tmp_path_factory.mktemp("raw_export") / "qin")
    return spec, exporter.export_model(trained[1], spec, base)


def test_raw_signatures_are_named_typed_and_shaped(raw_exported):
    spec, version_dir = raw_exported
    defs, _ = read_signature_defs(version_dir)
    assert set(defs) == {"serving_default", "predict_examples", "serving_raw", "predict_raw_examples",
                         "__saved_model_init_op"}
    raw = defs["serving_raw"]
    assert raw.method_name == "tensorflow/serving/predict" and list(raw.outputs) == ["ctr"]
    got = {k: (v.dtype, [d.size for d in v.tensor_shape.dim]) for k, v in raw.inputs.items()}
    assert got == {"item_id": (types_pb2.DT_STRING, [-1]), "item_seq": (types_pb2.DT_STRING, [-1, -1]),
                   "views_level": (types_pb2.DT_INT64, [-1])}
    assert {k: v.dtype for k, v in defs["predict_raw_examples"].inputs.items()} == {"examples": types_pb2.DT_STRING}
    assert sorted(os.listdir(os.path.join(version_dir, "assets"))) == ["feature_spec.json", "item_id.txt",
                                                                        "views_level.txt"]
    # The dense-id signatures stay as they are.
    assert sorted(defs["serving_default"].inputs) == sorted(spec.model_feature_names)


def test_raw_and_dense_requests_of_the_same_rows_score_bitwise_equal(raw_exported, test_rows):
    spec, version_dir = raw_exported
    features = {k: v.copy() for k, v in test_rows[0].items()}
    features[spec.target_item][:5] = 1                      # the OOV item: an unknown raw id
    features[spec.sequence][5, 0] = spec.num_items + 3      # beyond the vocabulary: OOV too
    raw, dense = exporter.raw_rows(spec, features)
    assert raw[spec.target_item][7] == f"item-{features[spec.target_item][7]}"
    assert (dense[spec.target_item][:5] == 1).all() and dense[spec.sequence][5, 0] == 1
    loaded = tf.saved_model.load(version_dir)
    want = loaded.signatures["serving_default"](**{k: tf.constant(v) for k, v in dense.items()})["ctr"].numpy()
    got = loaded.signatures["serving_raw"](**{k: tf.constant(v) for k, v in raw.items()})["ctr"].numpy()
    np.testing.assert_array_equal(got, want)
    got = loaded.signatures["predict_raw_examples"](examples=tf.constant(exporter.raw_examples(spec, raw)))["ctr"]
    np.testing.assert_array_equal(got.numpy(), want)
    assert np.std(want) > 1e-3


def test_raw_history_is_padded_or_cut_by_the_spec_rule(raw_exported):
    """Unpadded, over-long (cut to the most recent max_len) and zero-holed histories score as their dense rows."""
    from qin_tf.spec import pad_sequence

    spec, version_dir = raw_exported
    serve = tf.saved_model.load(version_dir).signatures["serving_raw"]
    dense_serve = tf.saved_model.load(version_dir).signatures["serving_default"]
    items = [[f"item-{d}" for d in range(2, 2 + n)] for n in (1, 3, spec.max_len + 5)]
    items[1].insert(1, "")                                   # padding inside: dropped
    width = max(len(x) for x in items)
    seq = np.array([[""] * (width - len(x)) + x for x in items], dtype=object)
    got = serve(**{spec.target_item: tf.constant(np.array(["item-9"] * 3, dtype=object)), spec.sequence: tf.constant(seq),
                   spec.context[0]: tf.constant(np.array([23, 33, 43]))})["ctr"].numpy()
    dense_seq = np.stack([pad_sequence([int(x[5:]) if x else 0 for x in r], spec.max_len) for r in items])
    want = dense_serve(**{spec.target_item: tf.constant(np.full(3, 9)), spec.sequence: tf.constant(dense_seq),
                          spec.context[0]: tf.constant(np.array([2, 3, 4]))})["ctr"].numpy()
    np.testing.assert_array_equal(got, want)
    assert len(set(want.tolist())) == 3  # the three histories score differently


def test_raw_warmup_covers_the_raw_signatures(raw_exported):
    _, version_dir = raw_exported
    sigs = []
    for record in tf.data.TFRecordDataset(os.path.join(version_dir, exporter.WARMUP_PATH)):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        sigs.append(log.predict_log.request.model_spec.signature_name)
    assert sorted(set(sigs)) == ["predict_examples", "predict_raw_examples", "serving_default", "serving_raw"]
    assert len(sigs) == 8


# --------------------------------------------------------------------------
# The raw-id rule in the graph (qin_tf.spec.RAW_ID_RULE)
# --------------------------------------------------------------------------


def make_int_raw_spec(spec: FeatureSpec, directory: str) -> FeatureSpec:
    """``make_raw_spec`` with int64 raw item ids, as a build from logs with numeric ids makes them.

    Dense d is raw ``7 d``, except dense 2, raw ``2**63 - 6`` (near the top of int64).
    """
    import dataclasses

    spec = make_raw_spec(spec, directory)
    with open(os.path.join(directory, "vocab", "item_id.txt"), "w") as f:
        f.write("".join(f"{2 ** 63 - 6 if d == 2 else 7 * d}\n" for d in range(2, spec.num_items)))
    spec = dataclasses.replace(spec, vocabularies={**spec.vocabularies, "item_id": {
        **spec.vocabularies["item_id"], "dtype": "int64"}})
    spec.save(directory)
    return FeatureSpec.load(directory)


@pytest.fixture(scope="module")
def int_raw_exported(sample_spec, trained, tmp_path_factory):
    """(int64 raw-id spec, version dir) of the tiny QIN."""
    spec = make_int_raw_spec(sample_spec, str(tmp_path_factory.mktemp("int_raw_data")))
    base = str(tmp_path_factory.mktemp("int_raw_export") / "qin")
    return spec, exporter.export_model(trained[1], spec, base)


def _serve_raw(version_dir, inputs, signature="serving_raw"):
    loaded = tf.saved_model.load(version_dir)
    return loaded.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})["ctr"].numpy()


def test_every_accepted_int_raw_id_scores_as_its_dense_id(int_raw_exported, test_rows):
    from qin_tf.spec import pad_sequence

    spec, version_dir = int_raw_exported
    features = {k: v.copy() for k, v in test_rows[0].items()}
    features[spec.target_item][:3] = 2                       # raw 2**63 - 6
    features[spec.sequence][3, :] = 2
    features[spec.target_item][4] = 1                        # OOV: a raw id the vocabulary lacks
    raw, dense = exporter.raw_rows(spec, features)
    assert raw[spec.target_item][0] == 2 ** 63 - 6 and raw[spec.target_item][9] == 7 * features[spec.target_item][9]
    raw[spec.sequence] = np.concatenate([np.zeros_like(raw[spec.sequence][:, :2]), raw[spec.sequence]], axis=1)
    raw[spec.sequence][:, [3, 7]] = 0                        # raw 0 inside a history: padding, dropped
    to_dense = {0: 0, 2 ** 63 - 6: 2, 2 ** 63 - 5: 1, **{7 * d: d for d in range(3, spec.num_items)}}
    dense[spec.sequence] = np.stack([pad_sequence([to_dense[int(x)] for x in r if x], spec.max_len)
                                     for r in raw[spec.sequence]])
    want = _serve_raw(version_dir, dense, "serving_default")
    np.testing.assert_array_equal(_serve_raw(version_dir, raw), want)
    np.testing.assert_array_equal(
        _serve_raw(version_dir, {"examples": exporter.raw_examples(spec, raw)}, "predict_raw_examples"), want)
    assert np.std(want) > 1e-3


def _bad_raw_request(spec, case):
    """One row of raw ids that the raw-id rule refuses, and the input at fault."""
    is_int = spec.vocabularies["item_id"]["dtype"] == "int64"
    row = {spec.target_item: np.array([14 if is_int else "item-2"], dtype=np.int64 if is_int else object),
           spec.sequence: np.array([[0, 21, 28] if is_int else ["", "item-3", "item-4"]],
                                   dtype=np.int64 if is_int else object),
           spec.context[0]: np.array([23])}
    name, value = {"target 0": (spec.target_item, 0), "target -7": (spec.target_item, -7),
                   "history -3": (spec.sequence, -3), "context 0": (spec.context[0], 0),
                   "context -1": (spec.context[0], -1), 'target ""': (spec.target_item, ""),
                   "history \\n": (spec.sequence, "item-5\nitem-6"), "target \\r": (spec.target_item, "x\r"),
                   "history \\u2028": (spec.sequence, "a\u2028")}[case]
    row[name] = row[name].copy()
    row[name].reshape(-1)[-1] = value
    return row, name


INT_CASES = ["target 0", "target -7", "history -3", "context 0", "context -1"]
STRING_CASES = ['target ""', "history \\n", "target \\r", "history \\u2028"]


@pytest.mark.parametrize("case", INT_CASES + STRING_CASES)
def test_the_graph_refuses_what_the_raw_id_rule_refuses(case, int_raw_exported, raw_exported):
    from qin_tf.spec import RAW_ID_RULE

    spec, version_dir = int_raw_exported if case in INT_CASES else raw_exported
    row, name = _bad_raw_request(spec, case)
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        _serve_raw(version_dir, row)
    assert error_line(err.value) == f"refused by the graph: `{name}`: {RAW_ID_RULE}"
    examples = exporter.raw_examples(spec, row)
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        _serve_raw(version_dir, {"examples": examples}, "predict_raw_examples")
    assert error_line(err.value) == f"refused by the graph: `{name}`: {RAW_ID_RULE}"


def test_error_line_drops_tensorflows_decorations():
    class E(Exception):
        message = ("Graph execution error:\n\nDetected at node x defined at (most recent call last):\n"
                   "  File \"a.py\", line 3, in f\n\n{{function_node __inference_serve_123}} assertion failed: "
                   "[`item_id`: bad] [Condition x == y did not hold element-wise:] [x (Any:0) = ] [1]\n"
                   "\t [[{{node assert_equal_1/Assert/AssertGuard/Assert}}]] [Op:__inference_serve_99]")

    assert error_line(E()) == "refused by the graph: `item_id`: bad"
    E.message = "{{function_node __inference_f_1}} Key: item_seq.  Can't parse serialized Example.\n\t [[{{node p}}]]"
    assert error_line(E()) == "Key: item_seq. Can't parse serialized Example."


@pytest.mark.parametrize("line,why", [("0", "0 is padding, not an id"), ("-4", "-4 is negative"),
                                      (str(2 ** 63), f"{2 ** 63} is beyond int64")])
def test_a_vocabulary_breaking_the_raw_id_rule_is_not_exported(line, why, sample_spec, trained, tmp_path):
    """A vocabulary built before the rule would hold ids the graph refuses: one line naming file and line."""
    from qin_tf.spec import RAW_ID_RULE

    spec = make_int_raw_spec(sample_spec, str(tmp_path / "data"))
    path = os.path.join(str(tmp_path / "data"), "vocab", "item_id.txt")
    with open(path) as f:
        words = f.read().split("\n")
    words[4] = line
    with open(path, "w") as f:
        f.write("\n".join(words))
    with pytest.raises(exporter.ExportError) as err:
        exporter.export_model(trained[1], spec, str(tmp_path / "export"))
    assert str(err.value).startswith(f"{path}: line 5: {why}; {RAW_ID_RULE}. The vocabulary was built before")
    assert not os.path.exists(tmp_path / "export" / "1")
