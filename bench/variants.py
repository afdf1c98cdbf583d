"""Model variants the benchmarks compare against the production QIN, built from model flags.

The production model (``qin_tf.model.build_model``) computes ASTA
re-associated and, with ``ModelConfig.sparse_history`` (the default), embeds
each distinct item of a batch once and attends over the real history slots
only. To measure what each of those choices buys, :func:`build_variant`
builds QIN with one of them undone, through the same ``ModelConfig`` fields
the training CLI has as flags (nothing is swapped at run time):

* ``asta="projected"`` (``--asta_form=projected``): ASTA as the original
  computes it: the key and value projections ``W_k h_j``, ``W_v h_j`` of every
  history slot (dense history), or of every distinct item of the batch
  (sparse history), then the scores and the pooled value in the projected
  space. Same weights and outputs as the production layer
  (:func:`check_same_outputs` checks it before timing).
* ``deduplicate`` (``--deduplicate_items``): with the dense history, embed
  every slot (``False``, the original) or each distinct id once and gather
  back (``True``).

Everything else (weights, QNN, training loop) is the production code.
"""

from __future__ import annotations

import dataclasses

ASTA_FORMS = ("reassociated", "projected")


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
    return qm.build_model(spec, dataclasses.replace(config, asta_form=asta, deduplicate_items=deduplicate))


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
