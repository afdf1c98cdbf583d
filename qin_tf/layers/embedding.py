"""Embedding layers: the item vector (id | tags | multimodal) and the context ids.

Both follow FuxiCTR 2.3.7's ``FeatureEmbedding`` as the original QIN
(salmon1802/QIN, ``src/QIN_variety_v9.py``) configures it for the MMCTR
layout: a categorical ``item_id``, a tag sequence pooled by a masked average,
and the frozen multimodal vector ``item_emb_d128`` mapped by a trainable
linear projection without bias.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

#: FuxiCTR's embedding initialiser, N(0, 1e-4), used when none is given.
EMBEDDINGS_STDDEV = 1e-4


def _embeddings_initializer(value):
    if value is None:
        return keras.initializers.RandomNormal(mean=0.0, stddev=EMBEDDINGS_STDDEV)
    return keras.initializers.get(value)


def _check_positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")


@keras.saving.register_keras_serializable(package="qin_tf")
class ItemEmbedding(keras.layers.Layer):
    """Maps item ids to QIN's item vector ``[id | tags | multimodal]`` of width 3E.

    For an item ``i`` with tag ids ``g_1..g_T`` (``0`` = no tag) and frozen
    multimodal vector ``m_i`` (width ``mm_dim``)::

        e_i = concat[ E_id[i],
                      sum_{t: g_t != 0} E_tag[g_t] / max(1, #{t: g_t != 0}),
                      m_i . W_mm ]                                  (3E)

    ``W_mm`` is a trainable ``[mm_dim, E]`` kernel without bias. The tag ids and
    ``m_i`` come from the item table, held in the layer as frozen
    (non-trainable) weights ``item_tags`` int32 ``[num_items, num_tags]`` and
    ``item_multimodal`` float32 ``[num_items, mm_dim]``; :meth:`build` creates
    them as zeros and :meth:`set_item_table` fills them (``qin_tf.model`` does,
    from ``FeatureSpec.load_item_table()``). A saved model restores them from
    its weights; the config holds sizes only.

    Padding and unknown ids: id ``0`` is padding and maps to the all-zero
    vector. Ids outside the table (``< 0`` or ``>= num_items``, e.g. an item
    first seen at serving time) map to the padding row too. Tag ids outside
    ``[1, tag_vocab_size)`` count as no tag. An item without tags has a zero
    tag part.

    Computation: by default (``deduplicate=True``) the vectors are computed
    once per distinct id of the call (``tf.unique`` over all inputs together)
    and gathered back; this is exact and saves most of the work on a batch of
    behaviour sequences, where the same items repeat. ``tf.unique`` has no XLA
    kernel, so the layer then reports ``supports_jit = False``; set
    ``deduplicate=False`` to compute per position (XLA-compatible).

    Args:
        num_items: rows of the item table (ids ``0..num_items-1``).
        num_tags: tag slots per item.
        tag_vocab_size: tag ids are in ``[0, tag_vocab_size)``.
        mm_dim: width of the frozen multimodal vector.
        embedding_dim: E.
        embeddings_initializer: initialiser of the id and tag tables;
            ``None`` means FuxiCTR's ``N(0, 1e-4)``.
        kernel_initializer: initialiser of ``W_mm`` (Glorot normal, as
            FuxiCTR's ``xavier_normal_``).
        embeddings_regularizer, kernel_regularizer: optional regularisers of
            the tables and of ``W_mm``.
        deduplicate: compute each distinct id once per call (see above).
        id_dropout: in training only, the probability that an item's id part
            ``E_id[i]`` is dropped (zeroed, the kept ones scaled by
            ``1 / (1 - id_dropout)``): the item then counts by its tags and
            multimodal vector alone, as a cold item would. One draw per
            distinct item of the call with ``deduplicate`` (the target and its
            occurrences in the history share it), per position otherwise.
            ``0`` (default) turns it off; inference is unaffected.
        use_multimodal: ``False`` is the ablation "QIN without the
            multimodal vector": the multimodal part ``m_i . W_mm`` is zero for
            every item (the vector width stays 3E, so the rest of the model is
            unchanged); ``W_mm`` is still created but unused.
        output_mode: ``"dense"`` returns the item vectors of every input;
            ``"indexed"`` returns ``(vectors, *indices)``: the vectors of the
            distinct ids ``[U, 3E]`` and, per input, int32 indices into them of
            the input's shape (``vectors[index]`` is the dense output). The
            attention layers take this form to touch only real history items.
        precomputed: inference form: the layer holds one frozen weight
            ``precomputed_vectors`` ``[num_items, 3E]``, every item's vector
            computed ahead of time (:meth:`all_item_vectors`), instead of the
            tables and the projection; a call is a gather (``"indexed"``: the
            table itself with the ids as indices, no ``tf.unique``). The
            exporter serves this form (``export.exporter.fold_for_inference``);
            it cannot be trained.

    Call arguments:
        inputs: an int tensor of item ids of any shape ``S``, or a list/tuple
            of them; they are embedded together (one ``tf.unique``).

    Returns:
        ``"dense"``: a float tensor ``S + (3E,)`` per input, in the input's
        structure. ``"indexed"``: ``(vectors, index_1, ..., index_n)``.

    Example:

    >>> layer = ItemEmbedding(num_items=4, num_tags=2, tag_vocab_size=3,
    ...                       mm_dim=5, embedding_dim=8)
    >>> target, history = layer([np.array([1, 2]), np.array([[0, 3], [1, 9]])])
    >>> target.shape, history.shape     # id 9 is out of the table -> zeros
    (TensorShape([2, 24]), TensorShape([2, 2, 24]))

    Reference: Li et al., "QIN: Quadratic Interest Network for Multimodal CTR
    Prediction", 2025 (salmon1802/QIN); FuxiCTR 2.3.7 ``FeatureEmbedding`` and
    ``MaskedAveragePooling``.
    """

    def __init__(self, num_items, num_tags, tag_vocab_size, mm_dim, embedding_dim,
                 embeddings_initializer=None,
                 kernel_initializer="glorot_normal",
                 embeddings_regularizer=None, kernel_regularizer=None,
                 deduplicate=True, output_mode="dense", precomputed=False, id_dropout=0.0,
                 use_multimodal=True, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= id_dropout < 1.0:
            raise ValueError(f"`id_dropout` must be in [0, 1). Received: id_dropout={id_dropout}")
        if output_mode not in ("dense", "indexed"):
            raise ValueError(f"`output_mode` must be 'dense' or 'indexed'. Received: output_mode={output_mode!r}")
        for name, value in (("num_items", num_items), ("num_tags", num_tags),
                            ("tag_vocab_size", tag_vocab_size), ("mm_dim", mm_dim),
                            ("embedding_dim", embedding_dim)):
            _check_positive(name, value)
        self.num_items = num_items
        self.num_tags = num_tags
        self.tag_vocab_size = tag_vocab_size
        self.mm_dim = mm_dim
        self.embedding_dim = embedding_dim
        self.embeddings_initializer = _embeddings_initializer(embeddings_initializer)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.deduplicate = bool(deduplicate)
        self.output_mode = output_mode
        self.precomputed = bool(precomputed)
        self.id_dropout = float(id_dropout)
        self.use_multimodal = bool(use_multimodal)
        self._id_dropout_seed = keras.random.SeedGenerator() if self.id_dropout > 0 else None
        # tf.unique has no XLA kernel: keep `jit_compile="auto"` off XLA.
        self.supports_jit = self.precomputed or not self.deduplicate

    @property
    def output_dim(self):
        """Width of an item vector: 3E."""
        return 3 * self.embedding_dim

    def build(self, input_shape=None):
        if self.precomputed:
            # In the compute dtype: an "indexed" call hands the whole table on, uncast.
            self.precomputed_vectors = self.add_weight(
                name="precomputed_vectors", shape=(self.num_items, self.output_dim), dtype=self.compute_dtype,
                initializer="zeros", trainable=False, autocast=False)
            self.built = True
            return
        # Tables are read without autocast and cast after the gather, so mixed
        # precision never casts a whole table per step.
        self.id_embeddings = self.add_weight(
            name="id_embeddings", shape=(self.num_items, self.embedding_dim),
            initializer=self.embeddings_initializer, regularizer=self.embeddings_regularizer,
            autocast=False)
        self.tag_embeddings = self.add_weight(
            name="tag_embeddings", shape=(self.tag_vocab_size, self.embedding_dim),
            initializer=self.embeddings_initializer, regularizer=self.embeddings_regularizer,
            autocast=False)
        self.multimodal_kernel = self.add_weight(
            name="multimodal_kernel", shape=(self.mm_dim, self.embedding_dim),
            initializer=self.kernel_initializer, regularizer=self.kernel_regularizer)
        self.item_tags = self.add_weight(
            name="item_tags", shape=(self.num_items, self.num_tags), dtype="int32",
            initializer="zeros", trainable=False, autocast=False)
        self.item_multimodal = self.add_weight(
            name="item_multimodal", shape=(self.num_items, self.mm_dim),
            dtype=self.variable_dtype, initializer="zeros", trainable=False, autocast=False)
        self.built = True

    def set_item_table(self, tags, embedding):
        """Loads the frozen item table: ``tags`` [num_items, num_tags], ``embedding`` [num_items, mm_dim]."""
        if not self.built:
            self.build()
        if self.precomputed:
            raise ValueError("a precomputed ItemEmbedding holds item vectors, not the item table; "
                             "assign `precomputed_vectors` instead.")
        expected = ((self.num_items, self.num_tags), (self.num_items, self.mm_dim))
        if tuple(tags.shape) != expected[0] or tuple(embedding.shape) != expected[1]:
            raise ValueError(
                f"item table shapes tags={tuple(tags.shape)}, embedding={tuple(embedding.shape)} do not "
                f"match the layer's {expected[0]} and {expected[1]}.")
        self.item_tags.assign(ops.cast(tags, "int32"))
        self.item_multimodal.assign(ops.cast(embedding, self.item_multimodal.dtype))

    def item_vectors(self, ids, training=False):
        """Item vectors ``[n, 3E]`` of a 1-D tensor of ids already in ``[0, num_items)``.

        ``training=True`` applies ``id_dropout`` (one draw per row of ``ids``).
        """
        dtype = self.compute_dtype
        id_part = ops.cast(ops.take(self.id_embeddings, ids, axis=0), dtype)
        if training and self.id_dropout > 0:
            keep = keras.random.uniform(ops.shape(ids), seed=self._id_dropout_seed) >= self.id_dropout
            scale = ops.convert_to_tensor(1.0 / (1.0 - self.id_dropout), dtype=dtype)
            id_part = id_part * ops.expand_dims(ops.cast(keep, dtype) * scale, -1)
        tags = ops.take(self.item_tags, ids, axis=0)                              # [n, T]
        has_tag = ops.logical_and(tags > 0, tags < self.tag_vocab_size)
        tags = ops.where(has_tag, tags, ops.zeros_like(tags))
        tag_vectors = ops.cast(ops.take(self.tag_embeddings, tags, axis=0), dtype)  # [n, T, E]
        has_tag = ops.cast(has_tag, dtype)
        tag_sum = ops.einsum("nt,nte->ne", has_tag, tag_vectors)
        count = ops.maximum(ops.sum(has_tag, axis=-1, keepdims=True), ops.convert_to_tensor(1, dtype=dtype))
        tag_part = tag_sum / count
        if self.use_multimodal:
            mm = ops.cast(ops.take(self.item_multimodal, ids, axis=0), dtype)
            mm_part = ops.matmul(mm, ops.cast(self.multimodal_kernel, dtype))   # outside call(): no autocast
        else:  # the ablation: no multimodal part
            mm_part = ops.zeros_like(id_part)
        vectors = ops.concatenate([id_part, tag_part, mm_part], axis=-1)
        not_padding = ops.cast(ops.not_equal(ids, 0), dtype)
        return vectors * ops.expand_dims(not_padding, -1)

    def all_item_vectors(self, batch_size: int = 65_536):
        """The vector of every item, ``[num_items, 3E]`` in the compute dtype (row 0, padding, is zero)."""
        if self.precomputed:
            return ops.convert_to_tensor(self.precomputed_vectors)
        parts = [self.item_vectors(tf.range(start, min(start + batch_size, self.num_items), dtype=tf.int64))
                 for start in range(0, self.num_items, batch_size)]
        return ops.concatenate(parts, axis=0)

    def call(self, inputs, training=None):
        is_list = isinstance(inputs, (list, tuple))
        id_tensors = [tf.convert_to_tensor(x) for x in (inputs if is_list else [inputs])]
        for x in id_tensors:
            if not x.dtype.is_integer:
                raise TypeError(f"item ids must be integers. Received dtype {x.dtype.name}")
        flat = tf.concat([tf.reshape(tf.cast(x, "int64"), [-1]) for x in id_tensors], axis=0)
        in_table = tf.logical_and(flat >= 0, flat < self.num_items)
        flat = tf.where(in_table, flat, tf.zeros_like(flat))
        if self.precomputed:
            vectors, index = self.precomputed_vectors, tf.cast(flat, tf.int32)   # the ids index the table
        else:
            if self.deduplicate:
                row_ids, index = tf.unique(flat, out_idx=tf.int32)
            else:
                row_ids, index = flat, tf.range(tf.size(flat, out_type=tf.int32))
            vectors = self.item_vectors(row_ids, training=bool(training))
        sizes = [tf.size(x, out_type=tf.int32) for x in id_tensors]
        parts = tf.split(index, sizes) if len(sizes) > 1 else [index]
        indices = [tf.ensure_shape(tf.reshape(part, tf.shape(x)), x.shape) for x, part in zip(id_tensors, parts)]
        if self.output_mode == "indexed":
            return (vectors, *indices)
        outputs = [tf.gather(vectors, i) for i in indices]
        if not is_list:
            return outputs[0]
        return tuple(outputs) if isinstance(inputs, tuple) else outputs

    # No compute_output_shape: Keras would give every output the compute dtype,
    # and the "indexed" mode's indices are int32. Keras traces `call` instead.

    def get_config(self):
        config = super().get_config()
        config.update(
            num_items=self.num_items,
            num_tags=self.num_tags,
            tag_vocab_size=self.tag_vocab_size,
            mm_dim=self.mm_dim,
            embedding_dim=self.embedding_dim,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            embeddings_regularizer=keras.regularizers.serialize(self.embeddings_regularizer),
            kernel_regularizer=keras.regularizers.serialize(self.kernel_regularizer),
            deduplicate=self.deduplicate,
            output_mode=self.output_mode,
            precomputed=self.precomputed,
            id_dropout=self.id_dropout,
        )
        if not self.use_multimodal:  # written only for the ablation: a production config stays as it was
            config["use_multimodal"] = False
        return config


@keras.saving.register_keras_serializable(package="qin_tf")
class ContextEmbedding(keras.layers.Layer):
    """Embeds categorical context features and concatenates them.

    Feature ``c`` with vocabulary size ``V_c`` has ``V_c + 1`` rows: ids in
    ``[0, V_c)`` are its values; any other id (``>= V_c``, seen only after
    training, or ``< 0``) maps to the out-of-vocabulary row ``V_c``::

        out = concat_c E_c[x_c if 0 <= x_c < V_c else V_c]          (C * E)

    All features share one weight ``embeddings`` of ``sum_c (V_c + 1)`` rows
    (one gather per call); feature ``c``'s rows start at ``sum_{c' < c} (V_c' + 1)``.
    Id ``0`` is an ordinary value here (e.g. ``views_level`` 0 = unseen).

    Args:
        vocab_sizes: ``V_c`` of each feature, in input order.
        embedding_dim: E.
        embeddings_initializer: ``None`` means FuxiCTR's ``N(0, 1e-4)``.
        embeddings_regularizer: optional regulariser of the table.

    Call arguments:
        inputs: a list of C int tensors ``[batch]`` (or one ``[batch, C]`` tensor).

    Returns:
        ``[batch, C * E]``.

    Example:

    >>> layer = ContextEmbedding(vocab_sizes=[11], embedding_dim=4)
    >>> layer([np.array([3, 42])]).shape    # 42 -> the OOV row
    TensorShape([2, 4])

    Reference: FuxiCTR 2.3.7 ``FeatureEmbedding`` (categorical features with an
    ``__OOV__`` index), as the MMCTR baselines and QIN use it.
    """

    def __init__(self, vocab_sizes, embedding_dim,
                 embeddings_initializer=None,
                 embeddings_regularizer=None, **kwargs):
        super().__init__(**kwargs)
        vocab_sizes = [int(v) for v in vocab_sizes]
        if not vocab_sizes:
            raise ValueError("`vocab_sizes` must name at least one feature. Received: vocab_sizes=[]")
        for v in vocab_sizes:
            if v < 1:
                raise ValueError(f"every vocabulary size must be >= 1. Received: vocab_sizes={vocab_sizes}")
        _check_positive("embedding_dim", embedding_dim)
        self.vocab_sizes = vocab_sizes
        self.embedding_dim = embedding_dim
        self.embeddings_initializer = _embeddings_initializer(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        offsets, total = [], 0
        for v in vocab_sizes:
            offsets.append(total)
            total += v + 1
        self._offsets = offsets
        self._rows = total

    def build(self, input_shape=None):
        self.embeddings = self.add_weight(
            name="embeddings", shape=(self._rows, self.embedding_dim),
            initializer=self.embeddings_initializer, regularizer=self.embeddings_regularizer,
            autocast=False)
        self.built = True

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):
            columns = [ops.cast(x, "int64") for x in inputs]
        else:
            x = ops.cast(inputs, "int64")
            columns = [x[:, i] for i in range(x.shape[-1])]
        if len(columns) != len(self.vocab_sizes):
            raise ValueError(f"expected {len(self.vocab_sizes)} context features, got {len(columns)}.")
        rows = []
        for x, v, offset in zip(columns, self.vocab_sizes, self._offsets):
            x = ops.reshape(x, (-1,))
            known = ops.logical_and(x >= 0, x < v)
            rows.append(ops.where(known, x, ops.full_like(x, v)) + offset)
        rows = ops.stack(rows, axis=1)                                      # [B, C]
        out = ops.cast(ops.take(self.embeddings, rows, axis=0), self.compute_dtype)  # [B, C, E]
        return ops.reshape(out, (-1, len(self.vocab_sizes) * self.embedding_dim))

    def compute_output_shape(self, input_shape):
        batch = input_shape[0][0] if isinstance(input_shape, (list, tuple)) and isinstance(
            input_shape[0], (list, tuple)) else input_shape[0]
        return (batch, len(self.vocab_sizes) * self.embedding_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_sizes=list(self.vocab_sizes),
            embedding_dim=self.embedding_dim,
            embeddings_initializer=keras.initializers.serialize(self.embeddings_initializer),
            embeddings_regularizer=keras.regularizers.serialize(self.embeddings_regularizer),
        )
        return config
