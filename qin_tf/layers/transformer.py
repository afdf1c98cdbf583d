"""The challenge winner's interest extractor: a Transformer over [history item | target] pairs."""

from __future__ import annotations

import keras
from keras import ops

from qin_tf.layers.attention import as_mask
from qin_tf.layers.dropout import Dropout


@keras.saving.register_keras_serializable(package="qin_tf")
class TargetTransformer(keras.layers.Layer):
    """Transformer encoder over the history, each item paired with the target.

    The interest extractor of the WWW 2025 MMCTR challenge winner
    (pinskyrobin/WWW2025_MMCTR, ``src/Transformer_DCN.py``). With target
    ``t`` and history items ``h_1..h_L`` (width D, left-padded: the most
    recent item last), ``W = 2D``::

        z_j = [h_j | t]                                            (W)
        z   = EncoderLayer_n(... EncoderLayer_1(z))                padding masked as keys
        z_j = 0 where slot j is padding
        out = [z_{L-k+1} | ... | z_L | Dense(max_{j real} z_j)]    (k W + W)

    with ``k = min(last_k, L)``. Each encoder layer is PyTorch's
    ``TransformerEncoderLayer`` with its defaults (post-norm, ReLU, LayerNorm
    epsilon 1e-5)::

        z <- LayerNorm(z + Dropout(MultiHeadAttention(z, z, z)))
        z <- LayerNorm(z + Dropout(Dense_2(Dropout(ReLU(Dense_1(z))))))

    the attention with ``num_heads`` heads of width ``W / num_heads``, biases
    on its four projections, and dropout on its weights. There is no
    positional encoding: order enters only through the ``last_k`` slots.

    Padding: padded slots are masked as keys, their outputs are zeroed, and
    their item vectors are replaced by zeros before anything else, so
    whatever a padded slot holds changes nothing. A row with no real item
    counts its last slot (``[0 | t]``) as real, as the winner's
    ``adjust_mask`` does, so the attention never softmaxes over nothing.

    Indexed history (``history_index`` given, as from
    :class:`~qin_tf.layers.ItemEmbedding` with ``output_mode="indexed"``):
    the sequence is ``history[history_index]``; unlike the target-attention
    layers, every slot is computed (positions matter here).

    Args:
        num_layers: encoder layers (winner: 2).
        num_heads: attention heads (winner: 1); must divide ``2D``.
        ff_units: width of the feed-forward block (winner: 256).
        dropout: on the attention weights and both residual branches (winner: 0.2).
        last_k: trailing positions kept in the output (winner: 16).
        kernel_initializer: Glorot uniform, PyTorch's ``xavier_uniform_`` of
            the attention's input projection (the winner keeps PyTorch's
            initialisation).
        kernel_regularizer: optional, on every kernel.

    Call arguments:
        target ``[batch, D]``, history ``[batch, L, D]`` (or ``[U, D]`` with
        history_index), history_mask ``[batch, L]`` (non-zero = real item;
        ``None`` = all real), history_index (optional int ``[batch, L]``),
        training.

    Returns:
        ``[batch, (min(last_k, L) + 1) * 2D]``.

    Example:

    >>> layer = TargetTransformer(num_layers=1, ff_units=8, last_k=2)
    >>> layer(np.ones((2, 3)), np.ones((2, 4, 3)), np.array([[0, 0, 1, 1], [0, 0, 0, 0]])).shape
    TensorShape([2, 18])

    Reference: Vaswani et al., "Attention Is All You Need", 2017; the WWW 2025
    EReL@MIR MMCTR challenge winner (arXiv 2505.03543,
    pinskyrobin/WWW2025_MMCTR ``Transformer_DCN``); PyTorch
    ``nn.TransformerEncoderLayer``.
    """

    def __init__(self, num_layers=2, num_heads=1, ff_units=256, dropout=0.2, last_k=16,
                 kernel_initializer="glorot_uniform", kernel_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("num_layers", num_layers), ("num_heads", num_heads), ("ff_units", ff_units),
                            ("last_k", last_k)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be >= 1. Received: {name}={value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.ff_units = ff_units
        self.dropout = float(dropout)
        self.last_k = last_k
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        # The attention and the layers of width 2D are created in build(), which knows D.
        self.norm_layers, self.ff_layers, self.dropout_layers = [], [], []
        policy = self.dtype_policy
        for i in range(num_layers):
            self.norm_layers.append([keras.layers.LayerNormalization(epsilon=1e-5, dtype=policy,
                                                                     name=f"norm_{i}_{j}") for j in (1, 2)])
            self.ff_layers.append(keras.layers.Dense(ff_units, activation="relu",
                                                     kernel_initializer=self.kernel_initializer,
                                                     kernel_regularizer=self.kernel_regularizer, dtype=policy,
                                                     name=f"ff_{i}_1"))
            self.dropout_layers.append([Dropout(self.dropout, dtype=policy, name=f"dropout_{i}_{j}")
                                        for j in range(3)])

    def build(self, target_shape, history_shape=None, history_mask_shape=None, history_index_shape=None):
        dim = target_shape[-1]
        if dim is None:
            raise ValueError("the last dimension of `target` must be known.")
        if history_shape is not None and history_shape[-1] not in (None, dim):
            raise ValueError("`target` and `history` must have the same width. "
                             f"Received: {target_shape}, {history_shape}")
        width = 2 * dim
        if width % self.num_heads:
            raise ValueError(f"`num_heads` must divide 2 * the item width = {width}. "
                             f"Received: num_heads={self.num_heads}")
        self.input_dim = dim
        policy = self.dtype_policy
        seq = (None, None, width)
        self.ff_out_layers, self.attention_layers = [], []
        for i in range(self.num_layers):
            attention = keras.layers.MultiHeadAttention(
                num_heads=self.num_heads, key_dim=width // self.num_heads, dropout=self.dropout,
                kernel_initializer=self.kernel_initializer, kernel_regularizer=self.kernel_regularizer,
                dtype=policy, name=f"attention_{i}")
            attention.build(seq, seq, seq)
            self.attention_layers.append(attention)
            self.ff_layers[i].build(seq)
            ff_out = keras.layers.Dense(width, kernel_initializer=self.kernel_initializer,
                                        kernel_regularizer=self.kernel_regularizer, dtype=policy,
                                        name=f"ff_{i}_2")
            ff_out.build((None, None, self.ff_units))
            self.ff_out_layers.append(ff_out)
            for norm in self.norm_layers[i]:
                norm.build(seq)
        self.pool_dense = keras.layers.Dense(width, kernel_initializer=self.kernel_initializer,
                                             kernel_regularizer=self.kernel_regularizer, dtype=policy,
                                             name="max_pool_dense")
        self.pool_dense.build((None, width))
        self.built = True

    def call(self, target, history, history_mask=None, history_index=None, training=None):
        if history_index is not None:
            history = ops.take(history, history_index, axis=0)                  # [B, L, D]
        real = as_mask(history_mask, history_index if history_index is not None else history)
        history = ops.where(ops.expand_dims(real, -1), history, ops.zeros_like(history))
        # A row without real items counts its last slot, [0 | t], as real (the winner's adjust_mask).
        empty = ops.logical_not(ops.any(real, axis=1, keepdims=True))          # [B, 1]
        last = ops.equal(ops.arange(ops.shape(real)[1]), ops.shape(real)[1] - 1)
        mask = ops.logical_or(real, ops.logical_and(empty, ops.expand_dims(last, 0)))
        slot = ops.expand_dims(mask, -1)                                        # [B, L, 1]
        targets = ops.broadcast_to(ops.expand_dims(target, 1), ops.shape(history))
        z = ops.concatenate([history, targets], axis=-1)                        # [B, L, W]
        attention_mask = ops.expand_dims(mask, 1)                               # [B, 1, L]: keys
        for i in range(self.num_layers):
            drop_attention, drop_hidden, drop_ff = self.dropout_layers[i]
            norm_1, norm_2 = self.norm_layers[i]
            attended = self.attention_layers[i](z, z, z, attention_mask=attention_mask, training=training)
            z = norm_1(z + drop_attention(attended, training=training))
            hidden = drop_hidden(self.ff_layers[i](z), training=training)
            z = norm_2(z + drop_ff(self.ff_out_layers[i](hidden), training=training))
        z = ops.where(slot, z, ops.zeros_like(z))
        if z.shape[1] is None:
            raise ValueError("TargetTransformer needs a history of known length (the spec's max_len).")
        k = min(self.last_k, z.shape[1])
        tail = ops.reshape(z[:, -k:, :], (-1, k * z.shape[-1]))
        # Max over the real slots: padded slots take the row's minimum, which never wins.
        lowest = ops.min(z, axis=1, keepdims=True)
        pooled = ops.max(ops.where(slot, z, lowest), axis=1)
        return ops.concatenate([tail, self.pool_dense(pooled)], axis=-1)

    def compute_output_shape(self, target_shape, history_shape=None, history_mask_shape=None,
                             history_index_shape=None):
        length = history_index_shape[1] if history_index_shape is not None else history_shape[1]
        k = min(self.last_k, length)
        return (target_shape[0], (k + 1) * 2 * target_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            ff_units=self.ff_units,
            dropout=self.dropout,
            last_k=self.last_k,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
        )
        return config
