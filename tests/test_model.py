"""The model family built from a feature spec (QIN, DIN, the challenge winner, any extractor x head):
interface, parity with the pre-refactor builders, invariances, serialization."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import qin_tf.layers  # noqa: F401  (registers the layers, as a server would)
from qin_tf.config import EXTRACTORS, HEADS, ModelConfig
from qin_tf.model import build_din, build_model, build_qin, build_transformer_dcn
from qin_tf.spec import FeatureSpec

NUM_ITEMS, NUM_TAGS, TAG_VOCAB, MM_DIM, MAX_LEN = 30, 3, 9, 6, 5
QIN_CONFIG = ModelConfig(embedding_dim=4, num_layers=2, num_row=3)
DIN_CONFIG = ModelConfig(model="din", embedding_dim=4, din_attention_units=(8, 4), din_dnn_units=(16, 8))
#: The winner's Transformer + DCNv2 at toy width (batch norm on, to exercise its moving statistics).
TDCN_CONFIG = ModelConfig(model="transformer_dcn", embedding_dim=4, transformer_heads=2, transformer_ff_units=8,
                          transformer_last_k=3, cross_layers=2, din_dnn_units=(16, 8), head_mlp_units=(6, 4),
                          dropout=0.2)
GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """A tiny spec with two context features and a random item table (row 0 = padding)."""
    d = tmp_path_factory.mktemp("tiny_spec")
    rng = np.random.default_rng(0)
    tags = rng.integers(0, TAG_VOCAB, (NUM_ITEMS, NUM_TAGS)).astype("int32")
    emb = (0.3 * rng.normal(size=(NUM_ITEMS, MM_DIM))).astype("float32")
    tags[0], emb[0] = 0, 0
    np.savez(d / "item_table.npz", tags=tags, embedding=emb)
    return FeatureSpec(dataset="tiny", label="label", meta=("user_id",), target_item="item_id",
                       sequence="item_seq", context=("views_level", "likes_level"), context_vocab_sizes=(11, 4),
                       max_len=MAX_LEN, num_items=NUM_ITEMS, num_tags=NUM_TAGS, tag_vocab_size=TAG_VOCAB,
                       mm_dim=MM_DIM, base_dir=str(d))


def batch(n, seed=0):
    """A batch in the data contract: left-padded histories of random lengths (some empty)."""
    rng = np.random.default_rng(seed)
    seq = np.zeros((n, MAX_LEN), dtype="int64")
    for i, length in enumerate(rng.integers(0, MAX_LEN + 1, n)):
        if length:
            seq[i, MAX_LEN - length:] = rng.integers(1, NUM_ITEMS, length)
    return {"item_id": rng.integers(1, NUM_ITEMS, n).astype("int64"), "item_seq": seq,
            "views_level": rng.integers(0, 11, n).astype("int64"),
            "likes_level": rng.integers(0, 4, n).astype("int64")}


def predict(model, features):
    return model({k: tf.constant(v) for k, v in features.items()}, training=False).numpy()


@pytest.fixture(scope="module")
def qin(spec):
    keras.utils.set_random_seed(1)
    return build_qin(spec, QIN_CONFIG)


@pytest.fixture(scope="module")
def din(spec):
    keras.utils.set_random_seed(2)
    return build_din(spec, DIN_CONFIG)


@pytest.fixture(scope="module")
def transformer_dcn(spec):
    keras.utils.set_random_seed(4)
    return build_transformer_dcn(spec, TDCN_CONFIG)


# --------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["qin", "din", "transformer_dcn"])
def test_inputs_and_output_follow_the_spec(which, spec, request):
    model = request.getfixturevalue(which)
    assert model.name == which
    assert sorted(t.name for t in model.inputs) == sorted(spec.model_feature_names)
    assert list(model.input) == list(spec.model_feature_names)     # a dict, in spec order
    assert {t.name: (tuple(t.shape), t.dtype) for t in model.inputs} == {
        "item_id": ((None,), "int64"), "item_seq": ((None, MAX_LEN), "int64"),
        "views_level": ((None,), "int64"), "likes_level": ((None,), "int64")}
    assert model.output_names == ["ctr"]
    out = predict(model, batch(7))
    assert out.shape == (7,) and out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1)) and len(np.unique(out)) == 7


def test_item_table_is_loaded_frozen(qin, spec):
    tags, emb = spec.load_item_table()
    layer = qin.get_layer("item_embedding")
    np.testing.assert_array_equal(layer.item_tags.numpy(), tags)
    np.testing.assert_array_equal(layer.item_multimodal.numpy(), emb)
    assert not layer.item_tags.trainable and not layer.item_multimodal.trainable
    trainable = {id(w) for w in qin.trainable_weights}
    assert id(layer.item_tags) not in trainable and id(layer.item_multimodal) not in trainable


def test_qin_widths_follow_the_config(qin):
    e = QIN_CONFIG.embedding_dim
    assert qin.get_layer("asta").W_q.shape == (3 * e, 6 * e)        # attention_dim = 2 * 3E
    assert qin.get_layer("qnn_input").output.shape == (None, 2 * e + 6 * e)   # context | x_t | o
    qnn = qin.get_layer("qnn")
    assert (qnn.num_layers, qnn.num_row, qnn.dropout, qnn.batch_norm) == (2, 3, 0.1, True)


def test_parameter_count_matches_the_released_run():
    """The released QIN run on MicroLens_1M (salmon1802/QIN, FuxiCTR log QIN_variety_v9_9701.log)
    reports 31,244,293 parameters; ours has exactly the two context OOV rows (2 x 128) more."""
    challenge = FeatureSpec(dataset="MicroLens_1M_x1", label="label", meta=("user_id",), target_item="item_id",
                            sequence="item_seq", context=("likes_level", "views_level"), context_vocab_sizes=(11, 11),
                            max_len=64, num_items=91718, num_tags=5, tag_vocab_size=11740, mm_dim=128)
    model = build_qin(challenge, ModelConfig(), load_item_table=False)
    count = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert count == 31_244_293 + 2 * 128


def test_l2_regularisation_on_embeddings_and_projection(spec):
    config = ModelConfig(embedding_dim=4, num_layers=1, embedding_l2=0.3)
    model = build_qin(spec, config)
    item, context = model.get_layer("item_embedding"), model.get_layer("context_embedding")
    tables = [item.id_embeddings, item.tag_embeddings, item.multimodal_kernel, context.embeddings]
    expected = 0.3 / 2 * sum(float(np.sum(w.numpy().astype("float64") ** 2)) for w in tables)
    assert len(model.losses) == 4
    assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-5)
    assert build_qin(spec, ModelConfig(embedding_dim=4, num_layers=1, embedding_l2=0.0)).losses == []


@pytest.mark.parametrize("model", ["qin", "din"])
def test_net_l2_regularises_every_network_kernel_and_nothing_else(spec, model):
    config = ModelConfig(model=model, embedding_dim=4, num_layers=2, din_attention_units=(3, 2),
                         din_dnn_units=(5,), embedding_l2=0.0, net_l2=0.4)
    built = build_model(spec, config)
    net_layers = ["asta", "qnn"] if model == "qin" else ["din_attention", "dnn"]
    kernels = [w for name in net_layers for w in built.get_layer(name).trainable_weights
               if w.path.endswith(("kernel", "W_q", "W_k", "W_v", "W_o"))]
    expected = 0.4 / 2 * sum(float(np.sum(w.numpy().astype("float64") ** 2)) for w in kernels)
    # QIN: 4 ASTA matrices + 2 quadratic kernels + logit; DIN: 3 attention kernels + 2 DNN kernels
    assert len(built.losses) == (7 if model == "qin" else 5)
    assert float(sum(built.losses)) == pytest.approx(expected, rel=1e-5)
    # embeddings stay out of it, and net_l2 = 0 adds nothing
    assert not any("embedding" in w.path for w in kernels)
    assert build_model(spec, dataclasses.replace(config, net_l2=0.0)).losses == []
    with pytest.raises(ValueError, match="net_l2"):
        ModelConfig(net_l2=-1.0)


def test_build_model_dispatches_on_config(spec):
    assert build_model(spec, ModelConfig(model="din", embedding_dim=2, din_attention_units=(2,),
                                         din_dnn_units=(2,))).name == "din"
    assert build_model(spec, ModelConfig(embedding_dim=2, num_layers=1)).name == "qin"
    assert build_model(spec, dataclasses.replace(TDCN_CONFIG, embedding_dim=2, transformer_heads=1)).name == \
        "transformer_dcn"


# --------------------------------------------------------------------------
# The family: presets, parts and parity with the builders before the refactor
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name, builder, config", [("qin", build_qin, QIN_CONFIG), ("din", build_din, DIN_CONFIG)])
def test_presets_build_the_same_graph_and_weights_as_before_the_refactor(spec, name, builder, config):
    """Golden recorded at commit c9d8ad7 (before models were composed from parts): same seed, same
    layer configs, weight paths and values, same outputs."""
    with open(os.path.join(GOLDEN, "model_pre_family.json")) as f:
        want = json.load(f)[name]
    golden = np.load(os.path.join(GOLDEN, "model_pre_family.npz"))
    keras.utils.set_random_seed(7)
    model = builder(spec, config)
    # Keras numbers unnamed op layers (take, not_equal) per process: compare them by kind
    unnumbered = functools.partial(re.sub, r'"(take|not_equal)_\d+"', r'"\1"')
    assert unnumbered(json.dumps(model.get_config(), sort_keys=True)) == unnumbered(
        json.dumps(want["config"], sort_keys=True))
    assert [[w.path, list(w.shape)] for w in model.weights] == want["weights"]
    for i, w in enumerate(model.get_weights()):
        np.testing.assert_array_equal(w, golden[f"{name}_weight_{i}"])
    np.testing.assert_array_equal(predict(model, batch(16, seed=21)), golden[f"{name}_output"])
    assert build_model(spec, dataclasses.replace(config, model=name)).get_config()["name"] == name


PART_LAYERS = {"asta": "AdaptiveSparseTargetAttention", "din_attention": "DINAttention",
               "transformer": "TargetTransformer", "qnn": "QuadraticNeuralNetwork", "dnn": "MLPBlock",
               "dcn_v2": "CrossNetwork", "qnn_dnn": "QuadraticNeuralNetwork"}


@pytest.mark.parametrize("extractor, head", list(itertools.product(EXTRACTORS, HEADS)))
def test_every_extractor_and_head_compose(spec, extractor, head):
    config = dataclasses.replace(TDCN_CONFIG, model="qin", extractor=extractor, head=head, num_layers=1,
                                 din_attention_units=(4,))
    model = build_model(spec, config)
    preset = {("asta", "qnn"): "qin", ("din_attention", "dnn"): "din", ("transformer", "dcn_v2"): "transformer_dcn"}
    assert model.name == preset.get((extractor, head), f"{extractor}__{head}")
    classes = {type(layer).__name__ for layer in model.layers}
    assert {PART_LAYERS[extractor], PART_LAYERS[head]} <= classes
    assert not {PART_LAYERS[e] for e in EXTRACTORS if e != extractor} & classes
    assert model.get_layer(f"{head}_input").output.shape[-1] == 2 * 4 + 12 + (
        (3 + 1) * 24 if extractor == "transformer" else 12)       # context | x_t | interest
    out = predict(model, batch(5, seed=14))
    assert out.shape == (5,) and np.all(np.isfinite(out))


def test_preset_flags_and_overrides(spec):
    """--model names a pair; --extractor / --head override it; bad names are one-line errors."""
    from absl import flags

    from qin_tf import train

    fv = flags.FlagValues()
    train.define_flags(fv)
    fv(["prog", "--model=transformer_dcn", "--head=qnn"])
    config = train.config_from_flags(fv).model
    assert (config.resolved_extractor, config.resolved_head, config.name) == ("transformer", "qnn", "transformer__qnn")
    assert (ModelConfig(model="din").resolved_extractor, ModelConfig(model="din").resolved_head) == (
        "din_attention", "dnn")
    assert ModelConfig(extractor="asta", head="qnn").name == "qin"
    for field in ("extractor", "head", "transformer_layers", "cross_layers", "cross_projection_dim",
                  "head_mlp_units", "head_input_batch_norm", "asta_form", "deduplicate_items"):
        help_text = fv[field].help.removeprefix("[model] ")
        assert help_text[0].isupper() and help_text.endswith(".") and help_text.count(". ") == 0, help_text
    with pytest.raises(ValueError, match="`model` must be one of"):
        ModelConfig(model="dcn")
    with pytest.raises(ValueError, match="`head` must be one of"):
        ModelConfig(head="mlp")
    with pytest.raises(ValueError, match="`transformer_heads` must divide 6 \\* embedding_dim = 24"):
        ModelConfig(model="transformer_dcn", embedding_dim=4, transformer_heads=5)


@pytest.mark.parametrize("sparse, asta, deduplicate", [(True, "projected", None), (False, "projected", False),
                                                   (False, "reassociated", True), (False, "folded", None)])
def test_benchmark_variants_are_flags_with_the_production_outputs(spec, sparse, asta, deduplicate):
    """bench.variants builds its variants from ModelConfig fields (--asta_form, --deduplicate_items)."""
    from bench import variants
    from export.exporter import fold_for_inference

    config = dataclasses.replace(QIN_CONFIG, sparse_history=sparse)
    reference = build_qin(spec, config)
    features = {k: tf.constant(v) for k, v in batch(16, seed=15).items()}
    if asta == "folded":
        model = build_model(spec, dataclasses.replace(config, asta_form="folded"), load_item_table=False)
        model.set_weights(fold_for_inference(reference, qnn=False, item_vectors=False).get_weights())
        assert model.get_layer("asta").folded
    else:
        model = variants.build_variant(spec, config, asta=asta, deduplicate=deduplicate)
        assert model.get_layer("asta").projected == (asta == "projected")
        assert model.get_layer("item_embedding").deduplicate == (sparse if deduplicate is None else deduplicate)
        assert variants.check_same_outputs(model, spec, config, features) <= 1e-4
        model.set_weights(reference.get_weights())
    np.testing.assert_allclose(model(features, training=False).numpy(), reference(features, training=False).numpy(),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="`deduplicate_items=False` needs sparse_history=False"):
        ModelConfig(deduplicate_items=False)
    with pytest.raises(ValueError, match="`asta_form` must be one of"):
        ModelConfig(asta_form="fast")


def test_benchmark_process_levers_swap_the_dropout_and_compile_the_qnn_and_undo_it(spec):
    """bench.variants.process_levers: the dropout lever and XLA for the QNN tower; the QNN FLOP count."""
    from bench import variants
    from qin_tf.layers import Dropout, QuadraticNeuralNetwork

    features = {k: tf.constant(v) for k, v in batch(16, seed=4).items()}
    config = dataclasses.replace(QIN_CONFIG, dropout=0.3)
    keras.utils.set_random_seed(5)
    reference = build_qin(spec, config)
    # D = 8 fields x E 4 = 32 at the head, R 3, 2 layers, dropout on: 6 B D (R D) each
    assert variants.qnn_train_gflop(reference, 1000) == pytest.approx(2 * 6 * 1000 * 32 * 96 / 1e9)
    plain_call, tower_call = Dropout.__dict__["call"], QuadraticNeuralNetwork.__dict__["call"]
    x = tf.fill([4, 4096], tf.constant(1.0, "bfloat16"))
    with variants.process_levers(dropout="keras"):
        assert Dropout.call is keras.layers.Dropout.call
        values = set(np.unique(np.asarray(tf.cast(Dropout(0.1, seed=1, dtype="bfloat16")(x, training=True), "float32"))).tolist())
        assert values == {0.0, 1.109375}                      # Keras: the rescale rounded to bfloat16
    with variants.process_levers(dropout="native_scale"):
        assert not Dropout.rescale_in_float32
    with variants.process_levers(jit_qnn=True):
        model = build_qin(spec, config)
        model.set_weights(reference.get_weights())
        np.testing.assert_allclose(model(features, training=False).numpy(),
                                   reference(features, training=False).numpy(), rtol=1e-5, atol=1e-6)
        assert any(k.startswith("_xla_call_") for k in model.get_layer("qnn").__dict__)
    assert Dropout.__dict__["call"] is plain_call and Dropout.rescale_in_float32
    assert QuadraticNeuralNetwork.__dict__["call"] is tower_call
    with pytest.raises(ValueError, match="`dropout` must be one of"):
        with variants.process_levers(dropout="fast"):
            pass


def test_qnn_dnn_head_adds_a_dnn_tower_beside_qnn(spec, tmp_path):
    """--head=qnn_dnn: logit = QNN(x) + DNN(x) on the same head input x (DCNv2's parallel structure)."""
    config = dataclasses.replace(QIN_CONFIG, head="qnn_dnn", din_dnn_units=(8, 4))
    keras.utils.set_random_seed(11)
    model = build_model(spec, config)
    assert model.name == "asta__qnn_dnn"
    assert model.get_layer("dnn").hidden_units == [8, 4]
    assert model.get_layer("qnn").num_layers == QIN_CONFIG.num_layers
    features = {k: tf.constant(v) for k, v in batch(12, seed=16).items()}
    x = keras.Model(model.inputs, model.get_layer("qnn_dnn_input").output)(features, training=False)
    logit = model.get_layer("qnn")(x, training=False) + model.get_layer("dnn")(x, training=False)
    np.testing.assert_allclose(predict(model, batch(12, seed=16)), tf.sigmoid(logit)[:, 0].numpy(), rtol=1e-6)
    path = str(tmp_path / "qnn_dnn.keras")
    model.save(path)
    np.testing.assert_array_equal(predict(keras.models.load_model(path), batch(12, seed=16)),
                                  predict(model, batch(12, seed=16)))


def test_head_input_batch_norm_normalises_the_head_input(spec):
    model = build_model(spec, dataclasses.replace(QIN_CONFIG, head_input_batch_norm=True))
    norm = model.get_layer("qnn_input_bn")
    assert norm.input.shape[-1] == 2 * 4 + 24
    assert predict(model, batch(4)).shape == (4,)


def test_transformer_dcn_follows_the_winner(transformer_dcn):
    """The winner's structure: the transformer sees 6E-wide pairs; the head's input is
    [context | x_t | last_k * 6E + 6E]; cross and DNN towers side by side, then the MLP to the logit."""
    e = TDCN_CONFIG.embedding_dim
    transformer = transformer_dcn.get_layer("transformer")
    assert (transformer.num_layers, transformer.num_heads, transformer.ff_units, transformer.dropout,
            transformer.last_k) == (2, 2, 8, 0.2, 3)
    width = 2 * e + 3 * e + (3 + 1) * 6 * e
    assert transformer_dcn.get_layer("dcn_v2_input").output.shape == (None, width)
    cross = transformer_dcn.get_layer("cross_network")
    assert cross.num_layers == 2 and [tuple(w.shape) for w in cross.weights] == [(width, width), (width,)] * 2
    assert transformer_dcn.get_layer("dcn_mlp_input").output.shape == (None, width + 8)
    assert transformer_dcn.get_layer("dcn_mlp").hidden_units == [6, 4]
    released = ModelConfig(model="transformer_dcn")
    assert (released.transformer_layers, released.transformer_heads, released.transformer_ff_units,
            released.transformer_dropout, released.transformer_last_k, released.cross_layers,
            released.head_mlp_units, released.din_dnn_units) == (2, 1, 256, 0.2, 16, 3, (64, 32), (1024, 512, 256))


# --------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["qin", "din", "transformer_dcn"])
def test_ids_outside_the_table_in_padded_slots_change_nothing(which, request):
    model = request.getfixturevalue(which)
    clean = batch(16, seed=1)
    noisy = dict(clean)
    seq = clean["item_seq"].copy()
    garbage = np.random.default_rng(2).choice([-5, -1, NUM_ITEMS, NUM_ITEMS + 7, 10 ** 9], size=seq.shape)
    noisy["item_seq"] = np.where(seq == 0, garbage, seq)
    assert (noisy["item_seq"] != clean["item_seq"]).sum() > 10
    np.testing.assert_array_equal(predict(model, noisy), predict(model, clean))


@pytest.mark.parametrize("which", ["qin", "din"])
def test_history_is_a_set_padding_position_does_not_matter(which, request):
    """No positional signal: right-padding or reversing the real items gives the same output."""
    model = request.getfixturevalue(which)
    left = batch(16, seed=3)
    moved = dict(left)
    moved["item_seq"] = np.stack([np.concatenate([row[row != 0][::-1], row[row == 0]]) for row in left["item_seq"]])
    np.testing.assert_allclose(predict(model, moved), predict(model, left), rtol=1e-5, atol=1e-7)


def test_qin_without_history_is_attention_free(qin):
    """An all-padding history gives o = x_t: the output is QNN([context | x_t | x_t])."""
    features = batch(8, seed=4)
    features["item_seq"] = np.zeros_like(features["item_seq"])
    x_t = qin.get_layer("item_embedding").item_vectors(tf.constant(features["item_id"]))
    context = qin.get_layer("context_embedding")([tf.constant(features["views_level"]),
                                                   tf.constant(features["likes_level"])])
    logit = qin.get_layer("qnn")(tf.concat([context, x_t, x_t], axis=-1), training=False)
    expected = tf.sigmoid(logit)[:, 0].numpy()
    np.testing.assert_allclose(predict(qin, features), expected, rtol=1e-6)


@pytest.mark.parametrize("which", ["qin", "din", "transformer_dcn"])
def test_batch_of_one_equals_its_row_in_a_batch(which, request):
    model = request.getfixturevalue(which)
    full = batch(64, seed=5)
    out = predict(model, full)
    for i in (0, 17, 63):
        one = {k: v[i:i + 1] for k, v in full.items()}
        np.testing.assert_allclose(predict(model, one), out[i:i + 1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("builder, config", [(build_qin, QIN_CONFIG), (build_din, DIN_CONFIG),
                                             (build_transformer_dcn, TDCN_CONFIG)], ids=["qin", "din", "transformer_dcn"])
def test_dense_history_path_equals_sparse_and_compiles_with_xla(builder, config, spec):
    sparse = builder(spec, config)
    dense = builder(spec, dataclasses.replace(config, sparse_history=False))
    dense.set_weights(sparse.get_weights())
    assert not sparse.get_layer("item_embedding").supports_jit
    assert all(layer.supports_jit for layer in dense._flatten_layers())
    features = {k: tf.constant(v) for k, v in batch(16, seed=13).items()}
    expected = sparse(features, training=False).numpy()
    np.testing.assert_allclose(dense(features, training=False).numpy(), expected, rtol=1e-5, atol=1e-7)
    compiled = tf.function(lambda x: dense(x, training=False), jit_compile=True)
    np.testing.assert_allclose(compiled(features).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_unknown_context_values_use_the_oov_row(qin):
    features = batch(4, seed=6)
    a, b = dict(features), dict(features)
    a["views_level"] = np.array([11, 12, 99, -1])
    b["views_level"] = np.array([50, 11, 13, 1000])
    np.testing.assert_array_equal(predict(qin, a), predict(qin, b))


def test_training_mode_uses_dropout_and_trains(spec):
    model = build_qin(spec, ModelConfig(embedding_dim=4, num_layers=2, num_row=2, dropout=0.5))
    features = {k: tf.constant(v) for k, v in batch(32, seed=7).items()}
    assert not np.allclose(model(features, training=True).numpy(), model(features, training=False).numpy())
    labels = tf.constant(np.random.default_rng(8).integers(0, 2, 32).astype("float32"))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    before = model.evaluate(features, labels, verbose=0)
    for _ in range(20):
        model.train_on_batch(features, labels)
    after = model.evaluate(features, labels, verbose=0)
    assert np.isfinite(after) and after < before


# --------------------------------------------------------------------------
# Serialization
# --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["qin", "din", "transformer_dcn"])
def test_from_config_round_trip(which, request):
    model = request.getfixturevalue(which)
    clone = keras.Model.from_config(model.get_config())
    features = batch(9, seed=9)
    assert not np.allclose(predict(clone, features), predict(model, features))   # fresh weights
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(predict(clone, features), predict(model, features))


@pytest.mark.parametrize("which", ["qin", "din", "transformer_dcn"])
def test_keras_file_round_trip_without_custom_objects(which, request, tmp_path):
    model = request.getfixturevalue(which)
    path = str(tmp_path / f"{which}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    features = batch(9, seed=10)
    np.testing.assert_array_equal(predict(loaded, features), predict(model, features))
    # the frozen item table travels in the weights
    np.testing.assert_array_equal(loaded.get_layer("item_embedding").item_multimodal.numpy(),
                                  model.get_layer("item_embedding").item_multimodal.numpy())
    assert loaded.output_names == ["ctr"]


# --------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------


@pytest.fixture
def mixed_bfloat16():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("builder, config", [(build_qin, QIN_CONFIG), (build_din, DIN_CONFIG)], ids=["qin", "din"])
def test_mixed_bfloat16_runs_and_outputs_float32(builder, config, spec, mixed_bfloat16):
    model = builder(spec, config)
    assert model.get_layer("asta" if builder is build_qin else "din_attention").compute_dtype == "bfloat16"
    features = {k: tf.constant(v) for k, v in batch(32, seed=11).items()}
    out = model(features, training=False)
    assert out.dtype == tf.float32 and out.shape == (32,)
    assert np.all(np.isfinite(out.numpy()))
    labels = tf.constant(np.random.default_rng(12).integers(0, 2, 32).astype("float32"))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    losses = [float(model.train_on_batch(features, labels)) for _ in range(3)]
    assert np.all(np.isfinite(losses))
    assert all(np.all(np.isfinite(w.numpy())) for w in model.trainable_weights)
    # with the float32 weights, the bfloat16 model tracks the float32 model
    keras.config.set_dtype_policy("float32")
    reference = builder(spec, config)
    reference.set_weights(model.get_weights())
    np.testing.assert_allclose(model(features, training=False).numpy(), reference(features, training=False).numpy(),
                               atol=0.05)


def test_spec_without_context_features(spec):
    bare = dataclasses.replace(spec, context=(), context_vocab_sizes=())
    model = build_qin(bare, QIN_CONFIG)
    assert sorted(t.name for t in model.inputs) == ["item_id", "item_seq"]
    features = {k: v for k, v in batch(3).items() if k in ("item_id", "item_seq")}
    assert predict(model, features).shape == (3,)


def test_dtype_policy_from_the_config_applies_to_this_model_only(spec):
    keras.utils.set_random_seed(3)
    model = build_qin(spec, dataclasses.replace(QIN_CONFIG, dtype_policy="mixed_bfloat16"))
    assert keras.config.dtype_policy().name == "float32"           # the global policy is left alone
    assert model.get_layer("qnn").compute_dtype == "bfloat16"
    assert model.get_layer("asta").compute_dtype == "bfloat16"
    assert all(w.dtype == "float32" for w in model.trainable_weights)
    features = {k: tf.constant(v) for k, v in batch(16, seed=13).items()}
    out = model(features, training=False)
    assert out.dtype == tf.float32
    reference = build_qin(spec, QIN_CONFIG)
    reference.set_weights(model.get_weights())
    assert reference.get_layer("qnn").compute_dtype == "float32"
    np.testing.assert_allclose(out.numpy(), predict(reference, batch(16, seed=13)), atol=0.05)
    clone = keras.Model.from_config(model.get_config())
    assert clone.get_layer("qnn").compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match="`dtype_policy` must be one of"):
        ModelConfig(dtype_policy="float16x")


def test_use_mm_vector_false_ignores_the_multimodal_vectors(spec):
    """The ablation flag `--use_mm_vector=false`: the item table's multimodal vectors change no score."""
    from absl import flags

    from qin_tf import train
    from qin_tf.layers.embedding import ItemEmbedding

    fv = flags.FlagValues()
    train.define_flags(fv)
    train.parse_flags(["train", "--use_mm_vector=false"], fv)
    config = dataclasses.replace(QIN_CONFIG, use_mm_vector=train.config_from_flags(fv).model.use_mm_vector)
    assert config.use_mm_vector is False
    features = batch(32, seed=4)
    for use, changes in ((False, False), (True, True)):
        keras.utils.set_random_seed(3)
        model = build_qin(spec, dataclasses.replace(config, use_mm_vector=use))
        layer = next(x for x in model.layers if isinstance(x, ItemEmbedding))
        before = predict(model, features)
        layer.item_multimodal.assign(np.asarray(layer.item_multimodal) + 5.0)
        after = predict(model, features)
        assert (not np.array_equal(before, after)) == changes
        clone = keras.Model.from_config(model.get_config())  # the flag survives serialisation
        assert next(x for x in clone.layers if isinstance(x, ItemEmbedding)).use_multimodal == use
