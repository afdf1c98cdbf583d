"""QIN and the DIN baseline as functional Keras models, built from the feature spec.

Both models take the spec's model features as inputs -- one ``keras.Input``
per :attr:`FeatureSpec.model_features`, named after the feature, int64, shape
``()`` or ``(max_len,)`` -- and output ``ctr``: the click probability, float32,
shape ``[batch]`` (also under a mixed-precision policy).

QIN (salmon1802/QIN, ``src/QIN_variety_v9.py``)::

    x_t = item(target), h_j = item(sequence_j)          ItemEmbedding, 3E each
    o   = ASTA(x_t, h, mask = sequence != 0)            AdaptiveSparseTargetAttention
    X   = [context embeddings | x_t | o]                C*E + 6E
    ctr = sigmoid(QNN(X))                               QuadraticNeuralNetwork

DIN (the WWW 2025 MMCTR challenge baseline, FuxiCTR ``DIN``)::

    p   = DINAttention(x_t, h, mask)                    no softmax
    ctr = sigmoid(MLP([context | x_t | p]))             din_dnn_units, BN, ReLU, dropout

The item table (tags, multimodal vectors) is loaded from
``spec.load_item_table()`` into the item embedding's frozen weights at build
time; a saved model carries it in its weights. L2 regularisation
``embedding_l2 / 2 * ||theta||^2`` (FuxiCTR's ``embedding_regularizer``) acts on the
id, tag and context tables and on the multimodal projection.

``ModelConfig.dtype_policy`` (e.g. ``"mixed_bfloat16"``, opt-in) sets the
Keras dtype policy of every layer of the model; ``None`` leaves Keras' global
policy in charge. The policy is part of each layer's saved config, so a
reloaded model computes as it was trained.
"""

from __future__ import annotations

import contextlib

import keras

from qin_tf.config import ModelConfig
from qin_tf.layers import (AdaptiveSparseTargetAttention, ContextEmbedding, DINAttention, ItemEmbedding,
                           MLPBlock, QuadraticNeuralNetwork)
from qin_tf.spec import PADDING_ID, FeatureSpec

OUTPUT_NAME = "ctr"


@contextlib.contextmanager
def dtype_policy_scope(name: str | None):
    """Layers created inside use the Keras dtype policy ``name`` (``None``: leave the global one)."""
    if name is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def model_inputs(spec: FeatureSpec) -> dict:
    """One ``keras.Input`` per model feature, named after it (int64), in spec order."""
    return {f.name: keras.Input(shape=f.shape, dtype="int64", name=f.name) for f in spec.model_features}


def _l2(weight: float):
    """FuxiCTR's ``weight / 2 * ||theta||^2`` as a Keras regulariser; ``None`` for weight 0."""
    return keras.regularizers.L2(weight / 2.0) if weight > 0 else None


def _item_embedding(spec: FeatureSpec, config: ModelConfig) -> ItemEmbedding:
    reg = _l2(config.embedding_l2)
    return ItemEmbedding(num_items=spec.num_items, num_tags=spec.num_tags, tag_vocab_size=spec.tag_vocab_size,
                         mm_dim=spec.mm_dim, embedding_dim=config.embedding_dim,
                         embeddings_regularizer=reg, kernel_regularizer=reg,
                         deduplicate=config.sparse_history, id_dropout=config.id_dropout,
                         use_multimodal=config.use_mm_vector,
                         output_mode="indexed" if config.sparse_history else "dense", name="item_embedding")


def _embed(spec: FeatureSpec, config: ModelConfig, inputs: dict):
    """Returns (item_embedding layer, x_t, history, mask, history_index, context embedding or None).

    With ``config.sparse_history`` the history stays indexed: ``history``
    holds the vectors of the batch's distinct items, ``history_index``
    [batch, max_len] points into it, and the attention touches only the real
    (non-padding) items. Otherwise ``history`` is [batch, max_len, 3E] and
    ``history_index`` is None.
    """
    item_embedding = _item_embedding(spec, config)
    ids = [inputs[spec.target_item], inputs[spec.sequence]]
    if config.sparse_history:
        history, target_index, history_index = item_embedding(ids)
        target = keras.ops.take(history, target_index, axis=0)
    else:
        (target, history), history_index = item_embedding(ids), None
    mask = keras.ops.not_equal(inputs[spec.sequence], PADDING_ID)
    context = None
    if spec.context:
        context = ContextEmbedding(vocab_sizes=list(spec.context_vocab_sizes), embedding_dim=config.embedding_dim,
                                   embeddings_regularizer=_l2(config.embedding_l2),
                                   name="context_embedding")([inputs[n] for n in spec.context])
    return item_embedding, target, history, mask, history_index, context


def _probability(logit):
    """``[batch, 1]`` logit -> ``[batch]`` float32 probability named ``ctr``."""
    prob = keras.layers.Activation("sigmoid", dtype="float32", name="ctr_probability")(logit)
    return keras.layers.Reshape((), dtype="float32", name=OUTPUT_NAME)(prob)


def _finish(model: keras.Model, item_embedding: ItemEmbedding, spec: FeatureSpec, load_item_table: bool):
    if load_item_table:
        tags, embedding = spec.load_item_table()
        item_embedding.set_item_table(tags, embedding)
    return model


def build_qin(spec: FeatureSpec, config: ModelConfig | None = None, *, load_item_table: bool = True) -> keras.Model:
    """Builds QIN for ``spec``.

    Args:
        spec: the feature spec (inputs, vocabulary sizes, item table).
        config: hyperparameters; ``None`` means the released defaults.
        load_item_table: load ``spec.load_item_table()`` into the frozen
            weights (``False`` leaves zeros, for a model whose weights are
            loaded next).

    Returns:
        A functional ``keras.Model`` named ``"qin"``: inputs
        ``spec.model_feature_names``, output ``ctr`` float32 ``[batch]``.
    """
    config = config or ModelConfig()
    with dtype_policy_scope(config.dtype_policy):
        inputs = model_inputs(spec)
        item_embedding, target, history, mask, history_index, context = _embed(spec, config, inputs)
        interest = AdaptiveSparseTargetAttention(attention_dim=config.attention_dim,
                                                 kernel_regularizer=_l2(config.net_l2), name="asta")(
            target, history, mask, history_index)
        parts = ([context] if context is not None else []) + [target, interest]
        features = keras.layers.Concatenate(axis=-1, name="qnn_input")(parts)
        logit = QuadraticNeuralNetwork(num_layers=config.num_layers, num_row=config.num_row,
                                       dropout=config.dropout, batch_norm=config.batch_norm,
                                       kernel_regularizer=_l2(config.net_l2), name="qnn")(features)
        model = keras.Model(inputs=inputs, outputs=_probability(logit), name="qin")
    return _finish(model, item_embedding, spec, load_item_table)


def build_din(spec: FeatureSpec, config: ModelConfig | None = None, *, load_item_table: bool = True) -> keras.Model:
    """Builds the DIN baseline for ``spec`` with the same item embedding as QIN.

    Attention MLP ``config.din_attention_units`` with ReLU and dropout
    ``config.din_attention_dropout``, no softmax (the MMCTR challenge's
    ``DIN_default``); DNN ``config.din_dnn_units`` with batch norm
    (``config.batch_norm``), ReLU and dropout ``config.dropout``; then
    Dense(1) and a sigmoid. Same arguments and output as :func:`build_qin`;
    the model is named ``"din"``.
    """
    config = config or ModelConfig(model="din")
    with dtype_policy_scope(config.dtype_policy):
        inputs = model_inputs(spec)
        item_embedding, target, history, mask, history_index, context = _embed(spec, config, inputs)
        pooled = DINAttention(attention_units=list(config.din_attention_units), activation="relu",
                              dropout=config.din_attention_dropout, use_softmax=False,
                              kernel_regularizer=_l2(config.net_l2),
                              name="din_attention")(target, history, mask, history_index)
        parts = ([context] if context is not None else []) + [target, pooled]
        features = keras.layers.Concatenate(axis=-1, name="dnn_input")(parts)
        logit = MLPBlock(list(config.din_dnn_units), activation="relu", dropout=config.dropout,
                         batch_norm=config.batch_norm, output_units=1,
                         kernel_regularizer=_l2(config.net_l2),
                         output_dtype=keras.config.dtype_policy().variable_dtype, name="dnn")(features)
        model = keras.Model(inputs=inputs, outputs=_probability(logit), name="din")
    return _finish(model, item_embedding, spec, load_item_table)


def build_model(spec: FeatureSpec, config: ModelConfig | None = None, *, load_item_table: bool = True) -> keras.Model:
    """``build_qin`` or ``build_din`` as ``config.model`` says."""
    config = config or ModelConfig()
    builder = build_qin if config.model == "qin" else build_din
    return builder(spec, config, load_item_table=load_item_table)
