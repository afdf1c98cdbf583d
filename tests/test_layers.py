"""The layers: parity with the original PyTorch QIN, hand-checked cases, serialization."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from qin_tf.layers import (AdaptiveSparseTargetAttention, ContextEmbedding, CrossNetwork, DINAttention, Dropout,
                           ItemEmbedding, MLPBlock, QuadraticLayer, QuadraticNeuralNetwork, TargetTransformer)
from qin_tf.layers.dropout import keep_probability, keep_threshold

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")
TOL = {"float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-9, atol=1e-12)}


def golden(name):
    with np.load(os.path.join(GOLDEN, name)) as z:
        return {k: z[k] for k in z.files}


def const(x, dtype):
    return tf.constant(np.asarray(x), dtype=dtype)


# --------------------------------------------------------------------------
# Parity with the original (PyTorch, float64, eval mode)
# --------------------------------------------------------------------------


def golden_asta(dtype):
    g = golden("asta.npz")
    layer = AdaptiveSparseTargetAttention(dtype=dtype)
    layer.build((None, 12), (None, 7, 12))
    layer.set_weights([g["W_q"].T, g["W_k"].T, g["W_v"].T, g["W_o"].T])  # torch (out, in) -> (in, out)
    return g, layer


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("case", ["asta.npz", "asta_noisy_padding.npz"])
def test_asta_matches_original(dtype, training, case):
    g, layer = golden_asta(dtype)
    history = golden(case)["history"]
    expected = golden(case)["output"]
    out = layer(const(g["target"], dtype), const(history, dtype), const(g["mask"], dtype), training=training)
    assert out.dtype == dtype
    np.testing.assert_allclose(out.numpy(), expected, **TOL[dtype])
    # row 3 has no history: o = x_t exactly
    np.testing.assert_array_equal(out.numpy()[3], np.asarray(g["target"][3], dtype=dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", ["asta.npz", "asta_noisy_padding.npz"])
def test_asta_indexed_history_matches_original(dtype, case):
    g, layer = golden_asta(dtype)
    history = golden(case)["history"]
    table = history.reshape(-1, 12)[::-1].copy()                 # any order: the index says where
    index = (len(table) - 1 - np.arange(len(table))).reshape(5, 7)
    out = layer(const(g["target"], dtype), const(table, dtype), const(g["mask"] > 0, "bool"),
                const(index, "int32"))
    np.testing.assert_allclose(out.numpy(), golden(case)["output"], **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", ["asta.npz", "asta_noisy_padding.npz"])
def test_folded_asta_matches_original_dense_and_indexed(dtype, case):
    """Inference form: W_q W_k^T / sqrt(A) and W_v W_o multiplied out, same outputs as the original."""
    g, layer = golden_asta(dtype)
    w_qk, w_vo = layer.folded_weights()
    np.testing.assert_allclose(w_qk, g["W_q"].T @ g["W_k"] / np.sqrt(24), rtol=1e-6)   # A = 2D = 24
    np.testing.assert_allclose(w_vo, g["W_v"].T @ g["W_o"].T, rtol=1e-6)
    folded = AdaptiveSparseTargetAttention(folded=True, dtype=dtype)
    folded.build((None, 12), (None, 7, 12))
    assert [tuple(w.shape) for w in folded.weights] == [(12, 12), (12, 12)]
    folded.set_weights([w_qk, w_vo])
    history, expected = golden(case)["history"], golden(case)["output"]
    out = folded(const(g["target"], dtype), const(history, dtype), const(g["mask"], dtype))
    np.testing.assert_allclose(out.numpy(), expected, **TOL[dtype])
    table = history.reshape(-1, 12)
    index = np.arange(len(table)).reshape(5, 7)
    out = folded(const(g["target"], dtype), const(table, dtype), const(g["mask"] > 0, "bool"), const(index, "int32"))
    np.testing.assert_allclose(out.numpy(), expected, **TOL[dtype])
    clone = AdaptiveSparseTargetAttention.from_config(folded.get_config())
    assert clone.folded and clone.get_config() == folded.get_config()
    with pytest.raises(ValueError, match="already folded"):
        folded.folded_weights()


@pytest.mark.parametrize("case", ["asta.npz", "asta_noisy_padding.npz"])
def test_projected_asta_matches_original_dense_and_indexed(case):
    """The original's order of operations (benchmark form, --asta_form=projected): same outputs."""
    g, _ = golden_asta("float64")
    layer = AdaptiveSparseTargetAttention(projected=True, dtype="float64")
    layer.build((None, 12), (None, 7, 12))
    layer.set_weights([g["W_q"].T, g["W_k"].T, g["W_v"].T, g["W_o"].T])
    history, expected = golden(case)["history"], golden(case)["output"]
    out = layer(const(g["target"], "float64"), const(history, "float64"), const(g["mask"], "float64"))
    np.testing.assert_allclose(out.numpy(), expected, **TOL["float64"])
    table = history.reshape(-1, 12)
    index = np.arange(len(table)).reshape(5, 7)
    out = layer(const(g["target"], "float64"), const(table, "float64"), const(g["mask"] > 0, "bool"),
                const(index, "int32"))
    np.testing.assert_allclose(out.numpy(), expected, **TOL["float64"])
    assert AdaptiveSparseTargetAttention.from_config(layer.get_config()).projected
    assert "projected" not in AdaptiveSparseTargetAttention().get_config()   # production configs unchanged
    with pytest.raises(ValueError, match="choose one"):
        AdaptiveSparseTargetAttention(folded=True, projected=True)


def golden_qnn(dtype):
    g = golden("qnn.npz")
    qnn = QuadraticNeuralNetwork(num_layers=3, num_row=4, dropout=0.1, batch_norm=True, dtype=dtype)
    qnn.build((None, 10))
    for i in range(3):
        qnn.quadratic_layers[i].set_weights([g[f"layer{i}_W"].T, g[f"layer{i}_b"]])
        qnn.norm_layers[i].set_weights([g[f"bn{i}_gamma"], g[f"bn{i}_beta"], g[f"bn{i}_mean"], g[f"bn{i}_var"]])
        qnn.activation_layers[i].set_weights([g[f"prelu{i}_alpha"].reshape(1)])
    qnn.output_layer.set_weights([g["fc_W"].T, g["fc_b"]])
    return g, qnn


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_qnn_matches_original(dtype):
    g, qnn = golden_qnn(dtype)
    out = qnn(const(g["x"], dtype), training=False)
    assert out.shape == (6, 1) and out.dtype == dtype
    np.testing.assert_allclose(out.numpy(), g["logit"], **TOL[dtype])


def test_qnn_recorded_weights_have_the_expected_structure():
    g, qnn = golden_qnn("float64")
    assert qnn.quadratic_layers[0].kernel.shape == (10, 40)
    assert [w.shape for w in qnn.activation_layers[0].weights] == [(1,)]
    assert qnn.norm_layers[0].epsilon == pytest.approx(1e-5)


# --------------------------------------------------------------------------
# QuadraticLayer
# --------------------------------------------------------------------------


def test_quadratic_layer_hand_computed():
    # D = 2, R = 2: y = x W + b has 4 columns = rows r0 = (c0, c1), r1 = (c2, c3)
    layer = QuadraticLayer(num_row=2, dtype="float64")
    layer.build((None, 2))
    w = np.array([[1.0, 2.0, 3.0, 4.0],
                  [0.5, -1.0, 0.0, 2.0]])
    b = np.array([0.1, 0.2, 0.3, 0.4])
    layer.set_weights([w, b])
    x = np.array([[1.0, 2.0]])
    y = x @ w + b                                   # [2.1, 0.2, 3.3, 8.4]
    expected = x * (y[:, :2] + y[:, 2:])             # [1 * 5.4, 2 * 8.6]
    np.testing.assert_allclose(expected, [[5.4, 17.2]])
    np.testing.assert_allclose(layer(const(x, "float64")).numpy(), expected, rtol=1e-12)
    # training with dropout 0 takes the same path
    np.testing.assert_allclose(layer(const(x, "float64"), training=True).numpy(), expected, rtol=1e-12)


def test_quadratic_layer_training_dropout_acts_on_the_linear_map():
    rate = 0.5
    layer = QuadraticLayer(num_row=3, dropout=rate, seed=1, dtype="float64")
    layer.build((None, 4))
    x = np.tile(np.array([[0.5, -1.0, 2.0, 1.5]]), (4000, 1))
    kernel, bias = (v.numpy() for v in layer.weights)
    y = (x[:1] @ kernel + bias).reshape(3, 4)        # the R rows of W x + b
    train = layer(const(x, "float64"), training=True).numpy()
    # each output is x_d * sum_r m_r y_rd / (1 - p) with m_r in {0, 1}: one of 2^R values
    possible = np.array([[x[0, d] * sum(y[r, d] for r in range(3) if (mask >> r) & 1) / (1 - rate)
                          for d in range(4)] for mask in range(8)])
    for d in range(4):
        dist = np.abs(train[:, d:d + 1] - possible[None, :, d]).min(axis=1)
        assert dist.max() < 1e-9
    # unbiased: the average over many draws approaches the inference output
    infer = layer(const(x[:1], "float64"), training=False).numpy()[0]
    np.testing.assert_allclose(train.mean(axis=0), infer, atol=0.1 * np.abs(infer).max())
    assert not np.allclose(train[0], infer)


# --------------------------------------------------------------------------
# Dropout: the rate and the mean kept in every dtype policy
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dropout_keeps_its_rate_and_the_mean_in_every_dtype(dtype):
    n, rate = 2_000_000, 0.1
    assert keep_threshold(rate) == 6554 and abs(keep_probability(rate) - 0.9) < 1e-5
    x = tf.cast(tf.random.stateless_uniform([n], seed=[3, 4], minval=1.0, maxval=2.0), dtype)
    y = Dropout(rate, seed=1, dtype=dtype)(x, training=True)
    assert y.dtype == x.dtype
    xs, ys = (np.asarray(tf.cast(v, "float64")) for v in (x, y))
    kept = ys != 0
    sigma = np.sqrt(0.9 * 0.1 / n)
    assert abs(kept.mean() - keep_probability(rate)) < 4 * sigma
    # each kept unit is x / keep probability, rounded once to the dtype
    step = 2.0 ** -7 if dtype == "bfloat16" else 1e-6
    np.testing.assert_allclose(ys[kept], xs[kept] / keep_probability(rate), rtol=step)
    # the mean is kept: within 4 sigma of the sampling noise
    assert abs(ys.sum() / xs.sum() - 1.0) < 4 * np.sqrt(0.1 / 0.9 / n) * 1.2
    if dtype == "bfloat16":
        # what this layer replaces: Keras' own dropout draws bfloat16 uniforms (128 values),
        # keeps 0.898 and rescales by 1.109375, so its output's mean is 0.3% low
        z = np.asarray(tf.cast(keras.layers.Dropout(rate, seed=1, dtype=dtype)(x, training=True), "float64"))
        assert z.sum() / xs.sum() < 1.0 - 10 * np.sqrt(0.1 / 0.9 / n) * 1.2


def test_dropout_draws_from_its_seed_generator_and_passes_gradients_through_the_kept_units():
    x = tf.ones([4, 1000])
    a, b = Dropout(0.25, seed=7), Dropout(0.25, seed=7)
    first = np.asarray(a(x, training=True))
    np.testing.assert_array_equal(first, np.asarray(b(x, training=True)))      # same seed, same mask
    assert not np.array_equal(first, np.asarray(a(x, training=True)))          # the generator advances
    assert set(np.unique(first).tolist()) == {0.0, float(np.float32(1 / keep_probability(0.25)))}
    np.testing.assert_array_equal(np.asarray(a(x, training=False)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(Dropout(0.0)(x, training=True)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(Dropout(1.0)(x, training=True)), np.zeros((4, 1000)))
    np.testing.assert_array_equal(np.asarray(Dropout(1 - 1e-6)(x, training=True)), np.zeros((4, 1000)))
    # the same weights as Keras' Dropout (its seed state): checkpoints load either way
    assert [w.path for w in a.weights] == [w.path.replace("dropout_1", a.name) for w in
                                           keras.layers.Dropout(0.25, seed=7, name="dropout_1").weights]
    v = tf.Variable(tf.fill([3, 500], 2.0))
    c = Dropout(0.5, seed=2)
    with tf.GradientTape() as tape:
        y = c(v, training=True)
        loss = tf.reduce_sum(y)
    grad = np.asarray(tape.gradient(loss, v))
    np.testing.assert_array_equal(grad, np.where(np.asarray(y) != 0, 2.0, 0.0))   # 1 / keep = 2
    # noise_shape: one draw per row, broadcast over the columns
    rows = np.asarray(Dropout(0.5, noise_shape=(None, 1), seed=3)(tf.ones([64, 5]), training=True))
    assert all(len(set(r.tolist())) == 1 for r in rows) and 0 < (rows[:, 0] == 0).sum() < 64


# --------------------------------------------------------------------------
# ItemEmbedding: hand-checked
# --------------------------------------------------------------------------


def tiny_item_embedding(**kwargs):
    """4 items, 3 tag slots, tag vocab 5, mm_dim 2, E = 2, with readable weights."""
    layer = ItemEmbedding(num_items=4, num_tags=3, tag_vocab_size=5, mm_dim=2, embedding_dim=2,
                          dtype="float64", **kwargs)
    layer.build()
    layer.id_embeddings.assign(np.array([[9.0, 9.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    layer.tag_embeddings.assign(np.array([[7.0, 7.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 8.0]]))
    layer.multimodal_kernel.assign(np.array([[1.0, 0.0], [1.0, -1.0]]))
    tags = np.array([[0, 0, 0],      # item 0: padding
                     [0, 1, 3],      # item 1: tags 1 and 3 after a padding slot
                     [0, 0, 0],      # item 2: no tags
                     [4, 9, 2]])     # item 3: tag 9 is outside the vocabulary -> no tag
    mm = np.array([[0.0, 0.0], [1.0, 2.0], [0.5, 0.5], [-1.0, 3.0]])
    layer.set_item_table(tags, mm)
    return layer


EXPECTED_ITEMS = np.array([
    [0, 0, 0, 0, 0, 0],                 # id 0 -> padding vector (row 0 of the tables is ignored)
    [1, 2, 1.5, 1.0, 3.0, -2.0],        # tags (1,0)+(2,2) / 2; mm [1,2] W = [3, -2]
    [3, 4, 0, 0, 1.0, -0.5],            # no tags -> zero tag part
    [5, 6, 2.0, 4.5, 2.0, -3.0],        # tags 4 and 2: ((4,8)+(0,1)) / 2
])


@pytest.mark.parametrize("deduplicate", [True, False])
def test_item_embedding_hand_computed(deduplicate):
    layer = tiny_item_embedding(deduplicate=deduplicate)
    ids = np.array([[1, 2, 3, 0], [3, 3, 0, 1]])
    out = layer(const(ids, "int64")).numpy()
    assert out.shape == (2, 4, 6)
    np.testing.assert_allclose(out, EXPECTED_ITEMS[ids], rtol=1e-12)


def test_precomputed_item_embedding_equals_the_computed_one():
    """Inference form: one [num_items, 3E] table of every item's vector; same outputs, dense and indexed."""
    layer = tiny_item_embedding()
    table = layer.all_item_vectors().numpy()
    np.testing.assert_allclose(table, EXPECTED_ITEMS, rtol=1e-12)
    config = dict(layer.get_config(), precomputed=True)
    for mode in ("dense", "indexed"):
        pre = ItemEmbedding.from_config(dict(config, output_mode=mode))
        pre.build()
        assert [w.path for w in pre.weights] == [f"{pre.name}/precomputed_vectors"]
        assert pre.supports_jit and not pre.trainable_weights
        pre.precomputed_vectors.assign(table)
        target, seq = np.array([1, 3]), np.array([[0, 2, 1], [3, 9, -4]])     # 9, -4: outside -> padding
        if mode == "dense":
            got_t, got_s = pre([const(target, "int64"), const(seq, "int64")])
        else:
            vectors, ti, si = pre([const(target, "int64"), const(seq, "int64")])
            assert vectors.shape == (4, 6) and ti.dtype == tf.int32
            got_t, got_s = tf.gather(vectors, ti), tf.gather(vectors, si)
        np.testing.assert_allclose(got_t.numpy(), EXPECTED_ITEMS[target], rtol=1e-12)
        np.testing.assert_allclose(got_s.numpy(), EXPECTED_ITEMS[np.where((seq >= 0) & (seq < 4), seq, 0)],
                                   rtol=1e-12)
    with pytest.raises(ValueError, match="holds item vectors"):
        pre.set_item_table(np.zeros((4, 3)), np.zeros((4, 2)))


def test_item_embedding_out_of_range_ids_are_padding():
    layer = tiny_item_embedding()
    out = layer(const([4, -1, 1000, 2], "int64")).numpy()
    np.testing.assert_array_equal(out[:3], np.zeros((3, 6)))
    np.testing.assert_allclose(out[3], EXPECTED_ITEMS[2])


def test_item_embedding_lists_and_indexed_mode_agree():
    dense = tiny_item_embedding()
    indexed = tiny_item_embedding(output_mode="indexed")
    target, seq = const([3, 1], "int64"), const([[0, 0, 2, 3], [0, 1, 1, 2]], "int64")
    t_dense, h_dense = dense([target, seq])
    vectors, t_index, h_index = indexed([target, seq])
    assert t_index.dtype == tf.int32 and h_index.shape == (2, 4)
    assert vectors.shape[0] == 4                       # distinct ids 3, 1, 0, 2
    np.testing.assert_array_equal(tf.gather(vectors, t_index).numpy(), t_dense.numpy())
    np.testing.assert_array_equal(tf.gather(vectors, h_index).numpy(), h_dense.numpy())
    np.testing.assert_allclose(h_dense.numpy(), EXPECTED_ITEMS[[[0, 0, 2, 3], [0, 1, 1, 2]]])


@pytest.mark.parametrize("deduplicate", [True, False])
def test_item_id_dropout_drops_whole_id_parts_in_training_only(deduplicate):
    keras.utils.set_random_seed(3)
    layer = tiny_item_embedding(id_dropout=0.5, deduplicate=deduplicate)
    ids = np.tile(np.array([[1, 2, 3, 1]]), (64, 1))
    np.testing.assert_allclose(layer(const(ids, "int64")).numpy(), EXPECTED_ITEMS[ids], rtol=1e-12)
    out = layer(const(ids, "int64"), training=True).numpy()
    want = EXPECTED_ITEMS[ids]
    np.testing.assert_allclose(out[..., 2:], want[..., 2:], rtol=1e-12)       # tags and multimodal kept
    scale = out[..., :2] / want[..., :2]                                          # 0 (dropped) or 2 (kept, 1/(1-p))
    assert set(np.unique(np.round(scale, 12))) == {0.0, 2.0}
    assert np.all(scale[..., 0] == scale[..., 1])                                 # the whole id part at once
    if deduplicate:   # one draw per distinct item of the call, wherever it occurs
        for item in (1, 2, 3):
            assert len(np.unique(scale[..., 0][ids == item])) == 1
    else:             # one draw per position
        assert 0.4 < float(np.mean(scale[..., 0] == 0.0)) < 0.6
    with pytest.raises(ValueError, match="id_dropout"):
        tiny_item_embedding(id_dropout=1.0)
    assert ItemEmbedding.from_config(layer.get_config()).id_dropout == 0.5


def test_item_embedding_frozen_table_and_validation():
    layer = tiny_item_embedding()
    assert {w.name for w in layer.non_trainable_weights} == {"item_tags", "item_multimodal"}
    assert {w.name for w in layer.trainable_weights} == {"id_embeddings", "tag_embeddings", "multimodal_kernel"}
    assert layer.item_tags.dtype == "int32"
    with pytest.raises(ValueError, match="do not match"):
        layer.set_item_table(np.zeros((4, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="`embedding_dim` must be an integer >= 1. Received: embedding_dim=0"):
        ItemEmbedding(num_items=4, num_tags=3, tag_vocab_size=5, mm_dim=2, embedding_dim=0)
    with pytest.raises(ValueError, match="`output_mode`"):
        ItemEmbedding(num_items=4, num_tags=3, tag_vocab_size=5, mm_dim=2, embedding_dim=2, output_mode="x")
    with pytest.raises(TypeError, match="item ids must be integers"):
        layer(tf.constant([1.0]))


def test_item_embedding_regularizers_are_l2_on_the_trainable_tables():
    layer = ItemEmbedding(num_items=4, num_tags=3, tag_vocab_size=5, mm_dim=2, embedding_dim=2,
                          embeddings_regularizer=keras.regularizers.L2(0.5),
                          kernel_regularizer=keras.regularizers.L2(0.5))
    layer.build()
    expected = 0.5 * sum(float(np.sum(w.numpy() ** 2)) for w in layer.trainable_weights)
    assert len(layer.losses) == 3
    assert float(sum(layer.losses)) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------
# ContextEmbedding
# --------------------------------------------------------------------------


def test_context_embedding_offsets_and_oov():
    layer = ContextEmbedding(vocab_sizes=[2, 3], embedding_dim=1, dtype="float64")
    layer.build()
    # rows: feature 0 -> 0, 1, OOV 2; feature 1 -> 3, 4, 5, OOV 6
    layer.embeddings.assign(np.arange(7, dtype="float64").reshape(7, 1) * 10)
    a, b = const([0, 1, 2, -1], "int64"), const([2, 7, 0, 3], "int64")
    out = layer([a, b]).numpy()
    np.testing.assert_array_equal(out, [[0, 50], [10, 60], [20, 30], [20, 60]])
    # the stacked [batch, C] form gives the same
    np.testing.assert_array_equal(layer(tf.stack([a, b], axis=1)).numpy(), out)
    with pytest.raises(ValueError, match="vocab_sizes"):
        ContextEmbedding(vocab_sizes=[], embedding_dim=2)


# --------------------------------------------------------------------------
# DINAttention and MLPBlock
# --------------------------------------------------------------------------


def din_reference(layer, target, history, mask):
    """FuxiCTR's formulation: MLP over the concatenation, masked weights, no softmax."""
    t = np.repeat(target[:, None, :], history.shape[1], axis=1)
    x = np.concatenate([t, history, t - history, t * history], axis=-1)
    w0, b0 = (v.numpy() for v in layer.first_dense.weights)
    h = np.maximum(x @ w0 + b0, 0)
    for dense in layer.rest.dense_layers:
        w, b = (v.numpy() for v in dense.weights)
        h = np.maximum(h @ w + b, 0)
    w, b = (v.numpy() for v in layer.rest.output_layer.weights)
    weights = (h @ w + b)[..., 0] * mask
    return np.einsum("bl,bld->bd", weights, history)


def test_din_attention_matches_the_concatenated_form_dense_and_indexed():
    rng = np.random.default_rng(3)
    layer = DINAttention(attention_units=(6, 5), dropout=0.3, dtype="float64")
    target, history = rng.normal(size=(3, 4)), rng.normal(size=(3, 5, 4))
    mask = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype="float64")
    noisy = np.where(mask[..., None] > 0, history, rng.normal(size=history.shape) * 100)
    dense = layer(const(target, "float64"), const(noisy, "float64"), const(mask, "float64")).numpy()
    expected = din_reference(layer, target, history, mask)
    np.testing.assert_allclose(dense, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(dense[1], np.zeros(4))        # no history -> zero
    index = np.arange(15).reshape(3, 5)
    indexed = layer(const(target, "float64"), const(noisy.reshape(15, 4), "float64"), const(mask, "float64"),
                    const(index, "int32")).numpy()
    np.testing.assert_allclose(indexed, expected, rtol=1e-10, atol=1e-12)


def test_din_attention_softmax_normalises_over_real_items():
    rng = np.random.default_rng(4)
    layer = DINAttention(attention_units=(4,), use_softmax=True, dtype="float64")
    target, history = rng.normal(size=(2, 3)), rng.normal(size=(2, 4, 3))
    mask = np.array([[0, 1, 1, 1], [0, 0, 0, 0]], dtype="float64")
    args = const(target, "float64"), const(history, "float64"), const(mask, "float64")
    dense = layer(*args).numpy()
    indexed = layer(args[0], const(history.reshape(8, 3), "float64"), args[2],
                    const(np.arange(8).reshape(2, 4), "int32")).numpy()
    np.testing.assert_allclose(indexed, dense, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(dense[1], np.zeros(3))
    # with equal items the softmax-weighted pool is that item
    same = np.repeat(history[:, :1], 4, axis=1)
    out = layer(args[0], const(same, "float64"), args[2]).numpy()
    np.testing.assert_allclose(out[0], same[0, 0], rtol=1e-10)


def test_mlp_block_matches_numpy():
    rng = np.random.default_rng(5)
    block = MLPBlock([3, 2], activation="relu", dropout=0.5, batch_norm=True, output_units=1, dtype="float64")
    x = rng.normal(size=(4, 5))
    out = block(const(x, "float64"), training=False).numpy()
    h = x
    for dense, norm in zip(block.dense_layers, block.norm_layers):
        w, b = (v.numpy() for v in dense.weights)
        gamma, beta, mean, var = (v.numpy() for v in norm.weights)
        h = np.maximum((h @ w + b - mean) / np.sqrt(var + 1e-5) * gamma + beta, 0)
    w, b = (v.numpy() for v in block.output_layer.weights)
    np.testing.assert_allclose(out, h @ w + b, rtol=1e-10)


# --------------------------------------------------------------------------
# Serialization: from_config(get_config()) gives the same layer
# --------------------------------------------------------------------------


def layer_cases():
    rng = np.random.default_rng(7)
    t, h = rng.normal(size=(3, 6)).astype("float32"), rng.normal(size=(3, 4, 6)).astype("float32")
    m = np.array([[0, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    return [
        ("asta", lambda: AdaptiveSparseTargetAttention(attention_dim=5, use_scale=False), (t, h, m)),
        ("din", lambda: DINAttention(attention_units=(4, 3), dropout=0.1), (t, h, m)),
        ("quadratic", lambda: QuadraticLayer(num_row=3, dropout=0.2, seed=3), (t,)),
        ("qnn", lambda: QuadraticNeuralNetwork(num_layers=2, num_row=2, dropout=0.1, batch_norm=True), (t,)),
        ("mlp", lambda: MLPBlock([5], batch_norm=True, dropout=0.1, output_units=2, output_dtype="float32"), (t,)),
        ("context", lambda: ContextEmbedding(vocab_sizes=[3, 4], embedding_dim=2,
                                             embeddings_regularizer=keras.regularizers.L2(1e-3)),
         ([np.array([0, 2, 5]), np.array([1, 3, 3])],)),
        ("item", lambda: ItemEmbedding(num_items=5, num_tags=2, tag_vocab_size=3, mm_dim=4, embedding_dim=2,
                                       embeddings_regularizer=keras.regularizers.L2(1e-3), deduplicate=False),
         ([np.array([1, 4, 0]), np.array([[0, 1, 2], [3, 3, 9], [0, 0, 0]])],)),
        ("dropout", lambda: Dropout(0.3, noise_shape=(None, 1), seed=5), (t,)),
        ("cross", lambda: CrossNetwork(num_layers=2, kernel_regularizer=keras.regularizers.L2(1e-3)), (t,)),
        ("cross_low_rank", lambda: CrossNetwork(num_layers=1, projection_dim=2), (t,)),
        ("transformer", lambda: TargetTransformer(num_layers=2, num_heads=3, ff_units=5, dropout=0.1, last_k=3),
         (t, h, m)),
    ]


@pytest.mark.parametrize("name, make, args", layer_cases(), ids=[c[0] for c in layer_cases()])
def test_from_config_round_trip(name, make, args):
    layer = make()
    out = layer(*args)
    config = layer.get_config()
    clone = type(layer).from_config(config)
    clone(*args)
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == config
    for a, b in zip(tf.nest.flatten(out), tf.nest.flatten(clone(*args))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # registered: the generic deserializer finds the class without custom_objects
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(again) is type(layer) and again.get_config() == config


@pytest.mark.parametrize("make, message", [
    (lambda: QuadraticNeuralNetwork(num_layers=0), "`num_layers` must be >= 1. Received: num_layers=0"),
    (lambda: QuadraticLayer(num_row=0), "`num_row` must be >= 1. Received: num_row=0"),
    (lambda: QuadraticLayer(dropout=1.0), "`dropout` must be in"),
    (lambda: AdaptiveSparseTargetAttention(attention_dim=0), "`attention_dim` must be"),
    (lambda: DINAttention(attention_units=()), "`attention_units` must be"),
    (lambda: MLPBlock([]), "needs `hidden_units` or `output_units`"),
    (lambda: CrossNetwork(num_layers=0), "`num_layers` must be >= 1. Received: num_layers=0"),
    (lambda: CrossNetwork(projection_dim=0), "`projection_dim` must be >= 1 or None"),
    (lambda: TargetTransformer(last_k=0), "`last_k` must be >= 1. Received: last_k=0"),
    (lambda: TargetTransformer(dropout=1.0), "`dropout` must be in"),
    (lambda: TargetTransformer(num_heads=4).build((None, 3), (None, 2, 3)), "`num_heads` must divide"),
])
def test_constructor_validation(make, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        make()


# --------------------------------------------------------------------------
# CrossNetwork (keras-rs FeatureCross): DCNv2's x_{l+1} = x_0 * (x_l W_l + b_l) + x_l
# --------------------------------------------------------------------------


def test_cross_network_hand_computed():
    """Two cross layers on D = 2, worked by hand."""
    layer = CrossNetwork(num_layers=2, dtype="float64")
    layer.build((None, 2))
    w1, b1 = np.array([[1.0, 0.0], [2.0, -1.0]]), np.array([0.5, 0.0])
    w2, b2 = np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([0.0, 1.0])
    layer.set_weights([w1, b1, w2, b2])                       # (in, out) kernels, as x @ W
    x0 = np.array([[1.0, 2.0]])
    # layer 1: x0 W1 + b1 = [1 + 4 + 0.5, -2] = [5.5, -2]; x1 = x0 * that + x0 = [6.5, -2]
    # layer 2: x1 W2 + b2 = [-2, 6.5 + 1] = [-2, 7.5];     x2 = x0 * that + x1 = [4.5, 13]
    np.testing.assert_allclose(layer(x0).numpy(), [[4.5, 13.0]], rtol=1e-12)


def test_cross_network_low_rank_and_batch_rows():
    """projection_dim P: W = U V; the output of a row does not depend on the other rows."""
    rng = np.random.default_rng(11)
    layer = CrossNetwork(num_layers=3, projection_dim=2, dtype="float64", name="crosses")
    x0 = rng.normal(size=(5, 4))
    layer.build((None, 4))
    weights = [rng.normal(size=w.shape) for w in layer.weights]
    layer.set_weights(weights)
    assert [tuple(w.shape) for w in layer.weights] == [(4, 2), (2, 4), (4,)] * 3
    # stable paths (keras-rs leaves FeatureCross's Dense layers unnamed; a clone must match by path)
    assert [w.path for w in layer.weights[:3]] == [
        "crosses/cross_0/down_projection/kernel", "crosses/cross_0/dense/kernel", "crosses/cross_0/dense/bias"]
    clone = CrossNetwork.from_config(layer.get_config())
    clone.build((None, 4))
    assert [w.path for w in clone.weights] == [w.path for w in layer.weights]
    x = x0
    for u, v, b in zip(weights[0::3], weights[1::3], weights[2::3]):
        x = x0 * (x @ u @ v + b) + x
    np.testing.assert_allclose(layer(x0).numpy(), x, rtol=1e-10)
    np.testing.assert_allclose(layer(x0[2:3]).numpy(), x[2:3], rtol=1e-10)


# --------------------------------------------------------------------------
# TargetTransformer: PyTorch's post-norm TransformerEncoderLayer over [h_j | t]
# --------------------------------------------------------------------------


def _layer_norm(x, gamma, beta):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * gamma + beta


def transformer_reference(layer, target, history, mask):
    """The winner's extractor in numpy, from the formula (PyTorch semantics, eval mode)."""
    mask = np.asarray(mask) != 0
    history = np.where(mask[..., None], history, 0.0)          # padded slots hold zeros
    mask = mask.copy()
    mask[~mask.any(axis=1), -1] = True                          # adjust_mask: an empty row keeps its last slot
    z = np.concatenate([history, np.broadcast_to(target[:, None, :], history.shape)], axis=-1)
    heads = layer.num_heads
    for i in range(layer.num_layers):
        att = layer.attention_layers[i]
        wq, bq = att.query_dense.kernel.numpy(), att.query_dense.bias.numpy()    # [W, H, K], [H, K]
        wk, bk = att.key_dense.kernel.numpy(), att.key_dense.bias.numpy()
        wv, bv = att.value_dense.kernel.numpy(), att.value_dense.bias.numpy()
        wo, bo = att.output_dense.kernel.numpy(), att.output_dense.bias.numpy()  # [H, K, W], [W]
        q = np.einsum("blw,whk->bhlk", z, wq) + bq[None, :, None, :]
        k = np.einsum("blw,whk->bhlk", z, wk) + bk[None, :, None, :]
        v = np.einsum("blw,whk->bhlk", z, wv) + bv[None, :, None, :]
        scores = np.einsum("bhqk,bhsk->bhqs", q, k) / np.sqrt(wq.shape[-1])
        scores = np.where(mask[:, None, None, :], scores, -np.inf)             # padded keys
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = np.einsum("bhqs,bhsk,hkw->bqw", weights, v, wo) + bo
        norm_1, norm_2 = layer.norm_layers[i]
        z = _layer_norm(z + attended, norm_1.gamma.numpy(), norm_1.beta.numpy())
        ff_1, ff_2 = layer.ff_layers[i], layer.ff_out_layers[i]
        hidden = np.maximum(z @ ff_1.kernel.numpy() + ff_1.bias.numpy(), 0.0)
        z = _layer_norm(z + hidden @ ff_2.kernel.numpy() + ff_2.bias.numpy(), norm_2.gamma.numpy(), norm_2.beta.numpy())
    z = np.where(mask[..., None], z, 0.0)
    k = min(layer.last_k, z.shape[1])
    pooled = np.where(mask[..., None], z, -np.inf).max(axis=1)
    pooled = pooled @ layer.pool_dense.kernel.numpy() + layer.pool_dense.bias.numpy()
    return np.concatenate([z[:, -k:].reshape(len(z), -1), pooled], axis=-1)


def tiny_transformer(dtype="float64", **kwargs):
    rng = np.random.default_rng(5)
    layer = TargetTransformer(**{"num_layers": 2, "num_heads": 2, "ff_units": 5, "dropout": 0.3, "last_k": 3,
                                 **kwargs}, dtype=dtype)
    layer.build((None, 3), (None, 5, 3))
    # every weight random, LayerNorm's gamma and beta included, so the reference sees them all
    layer.set_weights([rng.normal(0.0, 0.5, w.shape) for w in layer.weights])
    target = rng.normal(size=(4, 3))
    history = rng.normal(size=(4, 5, 3))
    mask = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    return layer, target, history, mask


@pytest.mark.parametrize("num_heads", [1, 2])
def test_transformer_matches_the_reference(num_heads):
    layer, target, history, mask = tiny_transformer(num_heads=num_heads)
    out = layer(target, history, mask, training=False).numpy()
    assert out.shape == (4, (3 + 1) * 6)
    np.testing.assert_allclose(out, transformer_reference(layer, target, history, mask), rtol=1e-6, atol=1e-9)
    # padded slots inside the last_k window are zero; an empty row keeps only its last slot
    tail = out[:, :18].reshape(4, 3, 6)
    np.testing.assert_array_equal(tail[1, :2], 0.0)
    assert np.all(tail[1, 2] != 0.0)


def test_transformer_last_k_longer_than_the_history_keeps_every_slot():
    layer, target, history, mask = tiny_transformer(last_k=16)
    out = layer(target, history, mask).numpy()
    assert out.shape == (4, (5 + 1) * 6)
    np.testing.assert_allclose(out, transformer_reference(layer, target, history, mask), rtol=1e-6, atol=1e-9)


def test_transformer_padded_slots_change_nothing_and_indexed_equals_dense():
    layer, target, history, mask = tiny_transformer()
    expected = layer(target, history, mask).numpy()
    noisy = np.where(mask[..., None] == 0, np.random.default_rng(9).normal(size=history.shape) * 100, history)
    np.testing.assert_array_equal(layer(target, noisy, mask).numpy(), expected)
    table = noisy.reshape(-1, 3)[::-1].copy()
    index = (len(table) - 1 - np.arange(20)).reshape(4, 5)
    np.testing.assert_allclose(layer(target, table, mask, index).numpy(), expected, rtol=1e-12)


def test_transformer_batch_of_one_and_training_dropout():
    layer, target, history, mask = tiny_transformer()
    full = layer(target, history, mask).numpy()
    for i in range(4):
        np.testing.assert_allclose(layer(target[i:i + 1], history[i:i + 1], mask[i:i + 1]).numpy(), full[i:i + 1],
                                   rtol=1e-10, atol=1e-12)
    assert not np.allclose(layer(target, history, mask, training=True).numpy(), full)
