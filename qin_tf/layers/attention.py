"""Target attention over the behaviour sequence: QIN's ASTA and DIN's attention."""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import ops

from qin_tf.layers.dropout import Dropout
from qin_tf.layers.mlp import MLPBlock


def as_mask(mask, like):
    """A boolean ``[batch, L]`` mask (non-zero = real item); all True if ``mask`` is None."""
    if mask is None:
        return ops.ones(ops.shape(like)[:2], dtype="bool")
    if mask.dtype == "bool":
        return mask
    return ops.not_equal(mask, ops.convert_to_tensor(0, dtype=mask.dtype))


def _real_items(history, history_mask, history_index):
    """The real history items of an indexed history, row by row.

    Returns ``(rows, items)``: ``rows`` int64 ``[n]`` is the batch row of each
    of the ``n`` real (mask != 0) slots, in row-major order, and ``items``
    ``[n, D]`` = ``history[history_index[row, slot]]``.
    """
    positions = tf.where(as_mask(history_mask, history_index))       # [n, 2]
    items = tf.gather(history, tf.gather_nd(history_index, positions))
    return positions[:, 0], items


def _sum_per_row(values, rows, batch_size):
    """``out[b] = sum of values[i] with rows[i] == b`` (accumulated in float32 at least)."""
    acc = tf.float32 if values.dtype in (tf.float16, tf.bfloat16) else values.dtype
    out = tf.math.unsorted_segment_sum(tf.cast(values, acc), rows, num_segments=batch_size)
    return tf.cast(out, values.dtype)


@keras.saving.register_keras_serializable(package="qin_tf")
class AdaptiveSparseTargetAttention(keras.layers.Layer):
    """QIN's Adaptive Sparse Target Attention (ASTA): ReLU-gated, no softmax.

    With target ``x_t`` and history items ``h_j`` (width D), ``A = attention_dim``::

        q = W_q x_t,  k_j = W_k h_j,  v_j = W_v h_j             (A each, no bias)
        a_j = ReLU(mask_j * q . k_j / sqrt(A))                   (mask_j in {0, 1})
        o = W_o sum_j a_j v_j + x_t                               (D)

    The weights sum neither to one nor are forced to be non-zero: irrelevant
    items get exactly zero weight (sparsity), and the scale of the pooled
    interest follows the evidence.

    Computed re-associated, which is exact algebra and avoids projecting every
    history item (O(L D) instead of O(L D A) per example)::

        q . k_j = (W_k^T q) . h_j        sum_j a_j W_v h_j = W_v (sum_j a_j h_j)

    The four weights are the original's matrices (Keras orientation, ``(in,
    out)``): ``W_q``, ``W_k``, ``W_v`` ``[D, A]`` and ``W_o`` ``[A, D]``; a
    PyTorch ``Linear.weight`` loads transposed.

    Folded form (inference): the products can be taken once, ahead of
    time. With ``folded=True`` the layer holds two ``[D, D]`` matrices instead
    of the four::

        W_qk = W_q W_k^T / sqrt(A)        W_vo = W_v W_o
        q . k_j / sqrt(A) = (x_t W_qk) . h_j      o = (sum_j a_j h_j) W_vo + x_t

    ``2 D^2`` weights and multiply-adds per example instead of ``4 D A`` (4x
    fewer with the default ``A = 2D``); same outputs up to float rounding.
    :meth:`folded_weights` computes them from a trained layer; the exporter
    serves the folded form (``export.exporter.fold_for_inference``). Training
    keeps the four matrices: the factorised form is the model's
    parameterisation.

    Padding: a slot with ``mask_j = 0`` gets ``a_j = 0`` whatever ``h_j`` holds
    (finite values); a row with no real item gives ``o = x_t``.

    Indexed history: with ``history_index``, ``history`` is a table of item
    vectors ``[U, D]`` and the sequence is ``history[history_index]`` (as
    :class:`ItemEmbedding` with ``output_mode="indexed"`` returns it). The
    layer then gathers only the real items (``mask != 0``) and pools them with
    a segment sum: the cost follows the number of real items, not ``L``; the
    result equals the dense form's.

    Args:
        attention_dim: A; ``None`` means ``2 * D`` (the original's choice).
        use_scale: divide scores by ``sqrt(A)``.
        kernel_initializer: of the four matrices (Glorot normal, as FuxiCTR's
            ``xavier_normal_``).
        kernel_regularizer: optional, on the four matrices.
        folded: hold ``W_qk`` and ``W_vo`` (see "Folded form"); ``use_scale``
            is then part of ``W_qk``.
        projected: compute in the original's order instead (for benchmarks):
            project every history slot, or every distinct item of an indexed
            history, ``k_j = W_k h_j``, ``v_j = W_v h_j``, then score and pool
            in the projected space. Same weights and outputs; O(L D A) per
            example. Saved in the config only when set.

    Call arguments:
        target: ``[batch, D]``.
        history: ``[batch, L, D]``.
        history_mask: ``[batch, L]``, bool or numeric, non-zero for real items;
            ``None`` means every slot is real.
        history_index: optional int ``[batch, L]``; see "Indexed history".

    Returns:
        ``o``: ``[batch, D]``.

    Example:

    >>> asta = AdaptiveSparseTargetAttention()
    >>> o = asta(np.ones((2, 6)), np.ones((2, 3, 6)), np.array([[0, 1, 1], [0, 0, 0]]))
    >>> o.shape                       # row 1 has no history: o = target
    TensorShape([2, 6])

    Reference: Li et al., "QIN: Quadratic Interest Network for Multimodal CTR
    Prediction", 2025; salmon1802/QIN ``src/QIN_variety_v9.py``
    (``MultiHeadTargetAttention`` with ``ScaledDotProductAttention`` gated by ReLU).
    """

    def __init__(self, attention_dim=None, use_scale=True, kernel_initializer="glorot_normal",
                 kernel_regularizer=None, folded=False, projected=False, **kwargs):
        super().__init__(**kwargs)
        if folded and projected:
            raise ValueError("`folded` and `projected` are two forms of ASTA; choose one.")
        if attention_dim is not None and (not isinstance(attention_dim, int) or attention_dim < 1):
            raise ValueError("`attention_dim` must be an integer >= 1 or None. "
                             f"Received: attention_dim={attention_dim!r}")
        self.attention_dim = attention_dim
        self.use_scale = bool(use_scale)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.folded = bool(folded)
        self.projected = bool(projected)

    def build(self, target_shape, history_shape=None, history_mask_shape=None, history_index_shape=None):
        dim = target_shape[-1]
        if dim is None:
            raise ValueError("the last dimension of `target` must be known.")
        if history_shape is not None and history_shape[-1] not in (None, dim):
            raise ValueError("`target` and `history` must have the same width. "
                             f"Received: {target_shape}, {history_shape}")
        self.input_dim = dim
        att = self.attention_dim or 2 * dim
        self._att = att

        def kernel(name, shape):
            return self.add_weight(name=name, shape=shape, initializer=self.kernel_initializer,
                                   regularizer=self.kernel_regularizer)

        if self.folded:
            self.W_qk = kernel("W_qk", (dim, dim))
            self.W_vo = kernel("W_vo", (dim, dim))
        else:
            self.W_q = kernel("W_q", (dim, att))
            self.W_k = kernel("W_k", (dim, att))
            self.W_v = kernel("W_v", (dim, att))
            self.W_o = kernel("W_o", (att, dim))
        self.built = True

    def folded_weights(self):
        """``(W_qk, W_vo)`` as float64 numpy arrays: the folded form of this (unfolded) layer's weights."""
        import numpy as np

        if self.folded:
            raise ValueError("the layer is already folded.")
        w_q, w_k, w_v, w_o = (np.asarray(w, dtype=np.float64) for w in (self.W_q, self.W_k, self.W_v, self.W_o))
        scale = 1.0 / math.sqrt(self._att) if self.use_scale else 1.0
        return (w_q @ w_k.T) * scale, w_v @ w_o

    def call(self, target, history, history_mask=None, history_index=None):
        if self.projected:
            return self._call_projected(target, history, history_mask, history_index)
        if self.folded:
            key_query = ops.matmul(target, self.W_qk)                  # [B, D] = W_k^T q / sqrt(A)
        else:
            query = ops.matmul(target, self.W_q)                       # [B, A]
            key_query = ops.matmul(query, ops.transpose(self.W_k))     # [B, D] = W_k^T q
            if self.use_scale:
                key_query = key_query * ops.convert_to_tensor(1.0 / math.sqrt(self._att), dtype=key_query.dtype)
        if history_index is None:
            mask = as_mask(history_mask, history)
            scores = ops.einsum("bd,bld->bl", key_query, history)     # [B, L]
            weights = ops.relu(ops.where(mask, scores, ops.zeros_like(scores)))
            pooled = ops.einsum("bl,bld->bd", weights, history)        # [B, D]
        else:
            rows, items = _real_items(history, history_mask, history_index)   # [n], [n, D]
            scores = ops.sum(ops.take(key_query, rows, axis=0) * items, axis=-1)
            weights = ops.relu(scores)
            pooled = _sum_per_row(ops.expand_dims(weights, -1) * items, rows, ops.shape(target)[0])
        if self.folded:
            return ops.matmul(pooled, self.W_vo) + target
        return ops.matmul(ops.matmul(pooled, self.W_v), self.W_o) + target

    def _call_projected(self, target, history, history_mask, history_index):
        """The original's order: project every item, then attend (see ``projected``)."""
        query = ops.matmul(target, self.W_q)                                  # [B, A]
        scale = ops.convert_to_tensor(1.0 / math.sqrt(self._att) if self.use_scale else 1.0, dtype=query.dtype)
        if history_index is None:
            mask = as_mask(history_mask, history)
            # As torch.nn.Linear does it: one [B*L, D] x [D, A] product each (an einsum's
            # gradient here would build a [B, D, A] intermediate).
            shape = ops.shape(history)
            flat = ops.reshape(history, (-1, shape[-1]))
            keys = ops.reshape(ops.matmul(flat, self.W_k), (shape[0], shape[1], -1))   # [B, L, A]
            values = ops.reshape(ops.matmul(flat, self.W_v), (shape[0], shape[1], -1))
            scores = ops.einsum("ba,bla->bl", query, keys) * scale
            weights = ops.relu(ops.where(mask, scores, ops.zeros_like(scores)))
            pooled = ops.einsum("bl,bla->ba", weights, values)                # [B, A]
        else:
            keys = ops.matmul(history, self.W_k)                              # [U, A]: each item once
            values = ops.matmul(history, self.W_v)
            positions = tf.where(as_mask(history_mask, history_index))
            rows = positions[:, 0]
            slots = tf.gather_nd(history_index, positions)
            scores = ops.sum(ops.take(query, rows, axis=0) * ops.take(keys, slots, axis=0), axis=-1) * scale
            weights = ops.relu(scores)
            pooled = _sum_per_row(ops.expand_dims(weights, -1) * ops.take(values, slots, axis=0), rows,
                                  ops.shape(target)[0])
        return ops.matmul(pooled, self.W_o) + target

    def compute_output_shape(self, target_shape, history_shape=None, history_mask_shape=None,
                             history_index_shape=None):
        return tuple(target_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            attention_dim=self.attention_dim,
            use_scale=self.use_scale,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            folded=self.folded,
        )
        if self.projected:   # only when set: the production model's config stays as it was
            config["projected"] = True
        return config


@keras.saving.register_keras_serializable(package="qin_tf")
class DINAttention(keras.layers.Layer):
    """DIN's target attention (FuxiCTR ``DIN_Attention``), as the MMCTR baseline runs it.

    With target ``t`` and history items ``h_j`` (width D)::

        w_j = MLP([t, h_j, t - h_j, t * h_j]) * mask_j                (scalar)
        out = sum_j w_j h_j                                           (D)

    The MLP is ``attention_units`` Dense layers with ``activation`` and dropout,
    then a Dense(1) without activation. The weights are used as they are (no
    softmax, ``use_softmax=False``, the challenge baseline's setting); with
    ``use_softmax=True`` they are softmax-normalised over the real items (a row
    without real items pools to zero).

    The first Dense layer acts on ``[t, h, t - h, t * h]``; its kernel ``[4D, U]``
    is split in blocks ``K_1..K_4`` and applied as ``t (K_1 + K_3) + h (K_2 - K_3)
    + (t * h) K_4``, so per history item only a ``[2D, U]`` product is paid
    (exact algebra, same weights and outputs as the concatenated form).

    Padding: masked slots get weight 0 (whatever ``h_j`` holds, if finite); a
    row with no real item pools to zero.

    Indexed history (``history_index`` given; see
    :class:`AdaptiveSparseTargetAttention`): the MLP runs on the real items only.

    Args:
        attention_units: hidden units of the MLP (challenge: ``(512, 256)``).
        activation: hidden activation (challenge: ``"relu"``; FuxiCTR's class
            default is Dice, which is not used here).
        dropout: dropout after each hidden layer (challenge: 0.1).
        use_softmax: see above.
        kernel_initializer: Glorot normal, as FuxiCTR.
        kernel_regularizer: optional, on every kernel of the MLP.

    Call arguments:
        target ``[batch, D]``, history ``[batch, L, D]`` (or ``[U, D]`` with
        history_index), history_mask ``[batch, L]`` (non-zero = real item;
        ``None`` = all real), history_index (optional int ``[batch, L]``),
        training.

    Returns:
        ``[batch, D]``.

    Example:

    >>> att = DINAttention(attention_units=(8,))
    >>> att(np.ones((2, 6)), np.ones((2, 3, 6)), np.array([[1, 1, 0], [0, 0, 0]])).shape
    TensorShape([2, 6])

    Reference: Zhou et al., "Deep Interest Network for Click-Through Rate
    Prediction", KDD 2018; FuxiCTR 2.3.7 ``DIN_Attention``; the WWW 2025
    EReL@MIR MMCTR challenge baseline (``DIN_default``).
    """

    def __init__(self, attention_units=(512, 256), activation="relu", dropout=0.0, use_softmax=False,
                 kernel_initializer="glorot_normal", kernel_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        attention_units = [int(u) for u in attention_units]
        if not attention_units or min(attention_units) < 1:
            raise ValueError(f"`attention_units` must be a non-empty list of integers >= 1. "
                             f"Received: attention_units={attention_units}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        self.attention_units = attention_units
        self.activation = keras.activations.get(activation)
        self.dropout = float(dropout)
        self.use_softmax = bool(use_softmax)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        first = attention_units[0]
        self.first_dense = keras.layers.Dense(first, kernel_initializer=self.kernel_initializer,
                                              kernel_regularizer=self.kernel_regularizer,
                                              dtype=self.dtype_policy, name="dense_0")
        self.first_dropout = Dropout(self.dropout, dtype=self.dtype_policy, name="dropout_0")
        self.rest = MLPBlock(attention_units[1:], activation=activation, dropout=self.dropout,
                             batch_norm=False, output_units=1, kernel_initializer=self.kernel_initializer,
                             kernel_regularizer=self.kernel_regularizer, dtype=self.dtype_policy, name="mlp")

    def build(self, target_shape, history_shape=None, history_mask_shape=None, history_index_shape=None):
        dim = target_shape[-1]
        if dim is None:
            raise ValueError("the last dimension of `target` must be known.")
        self.input_dim = dim
        self.first_dense.build((None, 4 * dim))
        self.first_dropout.build((None, None, self.attention_units[0]))
        self.rest.build((None, self.attention_units[0]))
        self.built = True

    def call(self, target, history, history_mask=None, history_index=None, training=None):
        d = self.input_dim
        kernel = self.first_dense.kernel                               # [4D, U]
        k_t, k_h, k_diff, k_prod = (kernel[i * d:(i + 1) * d] for i in range(4))
        per_target = ops.matmul(target, k_t + k_diff) + self.first_dense.bias   # [B, U]
        if history_index is None:
            mask = as_mask(history_mask, history)
            items, item_targets = history, ops.expand_dims(target, 1)  # [B, L, D], [B, 1, D]
            item_biases = ops.expand_dims(per_target, 1)
        else:
            rows, items = _real_items(history, history_mask, history_index)   # [n], [n, D]
            item_targets = ops.take(target, rows, axis=0)
            item_biases = ops.take(per_target, rows, axis=0)
        hidden = ops.matmul(items, k_h - k_diff) + ops.matmul(items * item_targets, k_prod) + item_biases
        hidden = self.first_dropout(self.activation(hidden), training=training)
        weights = ops.squeeze(self.rest(hidden, training=training), axis=-1)   # [B, L] or [n]
        if history_index is None:
            if self.use_softmax:
                lowest = ops.convert_to_tensor(-1e4, dtype=weights.dtype)   # representable in float16
                weights = ops.softmax(ops.where(mask, weights, lowest), axis=-1)
            weights = ops.where(mask, weights, ops.zeros_like(weights))
            return ops.einsum("bl,bld->bd", weights, history)
        batch_size = ops.shape(target)[0]
        if self.use_softmax:
            row_max = tf.math.unsorted_segment_max(weights, rows, num_segments=batch_size)
            weights = ops.exp(weights - ops.take(row_max, rows, axis=0))
            weights = weights / ops.take(_sum_per_row(weights, rows, batch_size), rows, axis=0)
        return _sum_per_row(ops.expand_dims(weights, -1) * items, rows, batch_size)

    def compute_output_shape(self, target_shape, history_shape=None, history_mask_shape=None,
                             history_index_shape=None):
        return tuple(target_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            attention_units=list(self.attention_units),
            activation=keras.activations.serialize(self.activation),
            dropout=self.dropout,
            use_softmax=self.use_softmax,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
        )
        return config
