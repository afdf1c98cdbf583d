"""Model variants the benchmarks compare against the production QIN (bench-only code).

The production model (``qin_tf.model.build_qin``) computes ASTA
re-associated and, with ``ModelConfig.sparse_history`` (the default), embeds
each distinct item of a batch once and attends over the real history slots
only. To measure what each of those choices buys, :func:`build_variant`
builds QIN with one of them undone:

* ``asta="projected"``: ASTA as the original computes it: the key and value
  projections ``W_k h_j``, ``W_v h_j`` of every history slot (dense history),
  or of every distinct item of the batch (sparse history), then the scores
  and the pooled value in the projected space. Same weights and outputs as
  the production layer (:func:`check_same_outputs` checks it before timing).
* ``deduplicate``: with the dense history, embed every slot (``False``, the
  original) or each distinct id once and gather back (``True``).

Everything else (weights, QNN, training loop) is the production code.
"""

from __future__ import annotations

import contextlib
import math

import tensorflow as tf
from keras import ops

from qin_tf.layers.attention import AdaptiveSparseTargetAttention, _as_mask, _sum_per_row

ASTA_FORMS = ("reassociated", "projected")


class ProjectedASTA(AdaptiveSparseTargetAttention):
    """ASTA in the original's order of operations: project every item, then attend.

    ``k_j = W_k h_j``, ``v_j = W_v h_j`` (``[L, A]`` per row, or ``[U, A]`` for the
    batch's distinct items with an indexed history), ``a_j = ReLU(mask_j q.k_j /
    sqrt(A))``, ``o = W_o sum_j a_j v_j + x_t``.
    """

    def call(self, target, history, history_mask=None, history_index=None):
        query = ops.matmul(target, self.W_q)                                  # [B, A]
        scale = ops.convert_to_tensor(1.0 / math.sqrt(self._att) if self.use_scale else 1.0,
                                      dtype=query.dtype)
        if history_index is None:
            mask = _as_mask(history_mask, history)
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
            positions = tf.where(_as_mask(history_mask, history_index))
            rows = positions[:, 0]
            slots = tf.gather_nd(history_index, positions)
            scores = ops.sum(ops.take(query, rows, axis=0) * ops.take(keys, slots, axis=0), axis=-1) * scale
            weights = ops.relu(scores)
            pooled = _sum_per_row(ops.expand_dims(weights, -1) * ops.take(values, slots, axis=0), rows,
                                  ops.shape(target)[0])
        return ops.matmul(pooled, self.W_o) + target


@contextlib.contextmanager
def patched(module, name, value):
    """``module.name`` is ``value`` inside the block (e.g. a layer class of ``qin_tf.model``), then restored."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def build_variant(spec, config, *, asta: str = "reassociated", deduplicate: bool | None = None):
    """``qin_tf.model.build_model(spec, config)`` with the ASTA form and item deduplication chosen.

    Args:
        asta: ``"reassociated"`` (production) or ``"projected"`` (the original's order).
        deduplicate: only with ``config.sparse_history=False``: embed each
            distinct id once (``True``) or every slot (``False``, the default
            of the dense path).
    """
    import qin_tf.model as qm

    if asta not in ASTA_FORMS:
        raise ValueError(f"`asta` must be one of {ASTA_FORMS}. Received: asta={asta!r}")
    if deduplicate is not None and config.sparse_history and not deduplicate:
        raise ValueError("the sparse history path always deduplicates; `deduplicate=False` needs "
                         "sparse_history=False.")
    with contextlib.ExitStack() as stack:
        if asta == "projected":
            stack.enter_context(patched(qm, "AdaptiveSparseTargetAttention", ProjectedASTA))
        if deduplicate is not None and not config.sparse_history:
            base = qm.ItemEmbedding

            def item_embedding(**kwargs):
                kwargs["deduplicate"] = deduplicate
                return base(**kwargs)

            stack.enter_context(patched(qm, "ItemEmbedding", item_embedding))
        return qm.build_model(spec, config)


def check_same_outputs(model, spec, config, features, *, atol=1e-4) -> float:
    """Max |difference| between ``model`` and the production model with the same weights on ``features``.

    Raises ``AssertionError`` if above ``atol``: a variant must compute the same function.
    """
    import numpy as np

    import qin_tf.model as qm

    reference = qm.build_model(spec, config, load_item_table=False)
    reference.set_weights(model.get_weights())
    inputs = {n: features[n] for n in spec.model_feature_names}
    a = np.asarray(model(inputs, training=False), dtype=np.float64)
    b = np.asarray(reference(inputs, training=False), dtype=np.float64)
    diff = float(np.max(np.abs(a - b)))
    if not diff <= atol:
        raise AssertionError(f"the variant's outputs differ from the production model's by {diff} > {atol}")
    return diff
