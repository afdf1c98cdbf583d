"""The model family: item embedding, interest extractor, interaction head, as functional Keras models.

Every model takes the spec's model features as inputs -- one ``keras.Input``
per :attr:`FeatureSpec.model_features`, named after the feature, int64, shape
``()`` or ``(max_len,)`` -- and outputs ``ctr``: the click probability, float32,
shape ``[batch]`` (also under a mixed-precision policy). It is three named
parts joined in :func:`build_model`::

    x_t = item(target), h_j = item(sequence_j)          ItemEmbedding, 3E each (shared by all models)
    o   = EXTRACTOR(x_t, h, mask = sequence != 0)       config.extractor
    ctr = sigmoid(HEAD([context embeddings | x_t | o])) config.head

Extractors: ``asta`` (QIN's :class:`AdaptiveSparseTargetAttention`, 3E),
``din_attention`` (:class:`DINAttention`, MLP weights, no softmax, 3E),
``transformer`` (the challenge winner's :class:`TargetTransformer` over
``[h_j | x_t]`` pairs, ``(last_k + 1) * 6E``). Heads: ``qnn`` (QIN's
:class:`QuadraticNeuralNetwork`), ``dnn`` (DIN's :class:`MLPBlock`
``din_dnn_units`` with ``batch_norm``, ReLU, ``dropout``), ``dcn_v2`` (a
:class:`CrossNetwork` of ``cross_layers`` keras-rs ``FeatureCross`` layers,
full rank as released or of rank ``cross_projection_dim`` (a deviation),
beside a DNN ``din_dnn_units``; their outputs concatenated go through an MLP
``head_mlp_units`` to the logit), ``qnn_dnn`` (QNN and a DNN ``din_dnn_units`` side
by side on the same input, DCNv2's parallel structure; the logit is the sum of
theirs, so QIN's quadratic terms keep their own output and the DNN adds the
additive ones a DNN learns). Presets (``config.model``)::

    qin              asta + qnn            salmon1802/QIN, src/QIN_variety_v9.py (the default)
    din              din_attention + dnn   the WWW 2025 MMCTR challenge baseline, FuxiCTR DIN
    transformer_dcn  transformer + dcn_v2  the challenge winner, pinskyrobin/WWW2025_MMCTR

The item table (tags, multimodal vectors) is loaded from
``spec.load_item_table()`` into the item embedding's frozen weights at build
time; a saved model carries it in its weights. L2 regularisation
``embedding_l2 / 2 * ||theta||^2`` (FuxiCTR's ``embedding_regularizer``) acts on the
id, tag and context tables and on the multimodal projection; ``net_l2`` on
the kernels of the extractor and the head.

``ModelConfig.dtype_policy`` (e.g. ``"mixed_bfloat16"``, opt-in) sets the
Keras dtype policy of every layer of the model; ``None`` leaves Keras' global
policy in charge. The policy is part of each layer's saved config, so a
reloaded model computes as it was trained.
"""

from __future__ import annotations

import contextlib
import dataclasses

import keras

from qin_tf.config import ModelConfig
from qin_tf.layers import (AdaptiveSparseTargetAttention, ContextEmbedding, CrossNetwork, DINAttention,
                           ItemEmbedding, MLPBlock, QuadraticNeuralNetwork, TargetTransformer)
from qin_tf.runtime import resolve_dtype_policy
from qin_tf.signatures import OUTPUT
from qin_tf.spec import PADDING_ID, FeatureSpec

#: The output layer's name: the signatures' one output (:data:`qin_tf.signatures.OUTPUT`).
OUTPUT_NAME = OUTPUT


@contextlib.contextmanager
def dtype_policy_scope(name: str | None):
    """Layers created inside use the Keras dtype policy ``name`` (``None``: leave the global one;
    ``"auto"``: :func:`~qin_tf.runtime.resolve_dtype_policy`)."""
    name, _ = resolve_dtype_policy(name)
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
                         deduplicate=config.sparse_history if config.deduplicate_items is None
                         else config.deduplicate_items, id_dropout=config.id_dropout,
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
    sequence = inputs[spec.sequence]
    if config.resolved_extractor == "transformer":
        # Ids outside the table embed as padding; the transformer must not attend to them either
        # (the target attentions give a zero vector no weight, so their mask stays `!= 0`).
        mask = keras.ops.logical_and(keras.ops.greater(sequence, PADDING_ID),
                                     keras.ops.less(sequence, spec.num_items))
    else:
        mask = keras.ops.not_equal(sequence, PADDING_ID)
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


def _extractor(config: ModelConfig) -> keras.layers.Layer:
    """The interest extractor ``config`` names, a layer called as ``(target, history, mask, history_index)``."""
    name, reg = config.resolved_extractor, _l2(config.net_l2)
    if name == "asta":
        return AdaptiveSparseTargetAttention(attention_dim=config.attention_dim, kernel_regularizer=reg,
                                             folded=config.asta_form == "folded",
                                             projected=config.asta_form == "projected", name="asta")
    if name == "din_attention":
        return DINAttention(attention_units=list(config.din_attention_units), activation="relu",
                            dropout=config.din_attention_dropout, use_softmax=False, kernel_regularizer=reg,
                            name="din_attention")
    return TargetTransformer(num_layers=config.transformer_layers, num_heads=config.transformer_heads,
                             ff_units=config.transformer_ff_units, dropout=config.transformer_dropout,
                             last_k=config.transformer_last_k, kernel_regularizer=reg, name="transformer")


def _head(config: ModelConfig, parts: list):
    """The interaction head ``config`` names on ``[context | x_t | interest]``: the ``[batch, 1]`` logit."""
    name, reg = config.resolved_head, _l2(config.net_l2)
    logit_dtype = keras.config.dtype_policy().variable_dtype
    features = keras.layers.Concatenate(axis=-1, name=f"{name}_input")(parts)
    if config.head_input_batch_norm:
        features = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=True,
                                                   name=f"{name}_input_bn")(features)

    def qnn():
        return QuadraticNeuralNetwork(num_layers=config.num_layers, num_row=config.num_row, dropout=config.dropout,
                                      batch_norm=config.batch_norm, kernel_regularizer=reg, name="qnn")(features)

    def dnn():
        return MLPBlock(list(config.din_dnn_units), activation="relu", dropout=config.dropout,
                        batch_norm=config.batch_norm, output_units=1, kernel_regularizer=reg,
                        output_dtype=logit_dtype, name="dnn")(features)

    if name == "qnn":
        return qnn()
    if name == "dnn":
        return dnn()
    if name == "qnn_dnn":
        return keras.layers.Add(dtype=logit_dtype, name="qnn_dnn_logit")([qnn(), dnn()])
    # dcn_v2: a cross network beside a DNN, both on the same input, then an MLP to the logit.
    cross = CrossNetwork(num_layers=config.cross_layers, projection_dim=config.cross_projection_dim,
                         kernel_regularizer=reg, name="cross_network")(features)
    deep = MLPBlock(list(config.din_dnn_units), activation="relu", dropout=config.dropout,
                    batch_norm=config.batch_norm, kernel_regularizer=reg, name="dcn_dnn")(features)
    both = keras.layers.Concatenate(axis=-1, name="dcn_mlp_input")([cross, deep])
    return MLPBlock(list(config.head_mlp_units), activation="relu", dropout=config.dropout,
                    batch_norm=config.batch_norm, output_units=1, kernel_regularizer=reg,
                    output_dtype=logit_dtype, name="dcn_mlp")(both)


def build_model(spec: FeatureSpec, config: ModelConfig | None = None, *, load_item_table: bool = True) -> keras.Model:
    """Builds the model ``config`` names: item embedding, interest extractor, interaction head.

    ``config.model`` is a preset (``qin``, ``din``, ``transformer_dcn``) that
    names an (extractor, head) pair; ``config.extractor`` and ``config.head``
    override either (see the module docstring).

    Args:
        spec: the feature spec (inputs, vocabulary sizes, item table).
        config: hyperparameters; ``None`` means the released QIN.
        load_item_table: load ``spec.load_item_table()`` into the frozen
            weights (``False`` leaves zeros, for a model whose weights are
            loaded next).

    Returns:
        A functional ``keras.Model`` named ``config.name`` (the preset's name,
        or ``"<extractor>__<head>"``): inputs ``spec.model_feature_names``,
        output ``ctr`` float32 ``[batch]``.
    """
    config = config or ModelConfig()
    with dtype_policy_scope(config.dtype_policy):
        inputs = model_inputs(spec)
        item_embedding, target, history, mask, history_index, context = _embed(spec, config, inputs)
        interest = _extractor(config)(target, history, mask, history_index)
        parts = ([context] if context is not None else []) + [target, interest]
        logit = _head(config, parts)
        model = keras.Model(inputs=inputs, outputs=_probability(logit), name=config.name)
    return _finish(model, item_embedding, spec, load_item_table)


def _preset(config: ModelConfig | None, name: str) -> ModelConfig:
    return dataclasses.replace(config or ModelConfig(), model=name, extractor=None, head=None)


def build_qin(spec: FeatureSpec, config: ModelConfig | None = None, *, load_item_table: bool = True) -> keras.Model:
    """QIN (ASTA + QNN) with ``config``'s hyperparameters, whatever its model/extractor/head say."""
    return build_model(spec, _preset(config, "qin"), load_item_table=load_item_table)


def build_din(spec: FeatureSpec, config: ModelConfig | None = None, *, load_item_table: bool = True) -> keras.Model:
    """The DIN baseline (DIN attention + DNN) with ``config``'s hyperparameters."""
    return build_model(spec, _preset(config, "din"), load_item_table=load_item_table)


def build_transformer_dcn(spec: FeatureSpec, config: ModelConfig | None = None, *,
                          load_item_table: bool = True) -> keras.Model:
    """The challenge winner's Transformer + DCNv2 with ``config``'s hyperparameters."""
    return build_model(spec, _preset(config, "transformer_dcn"), load_item_table=load_item_table)
