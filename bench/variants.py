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

Two more levers swap code for the length of a block
(:func:`process_levers`): the dropout's implementation, and XLA for the QNN
tower.
"""

from __future__ import annotations

import contextlib
import dataclasses

ASTA_FORMS = ("reassociated", "projected")
#: ``qin``: ``qin_tf.layers.Dropout`` as it ships (16 random bits a unit, rescale in float32);
#: ``native_scale``: the same, rescaled in the compute dtype; ``keras``: ``keras.layers.Dropout``.
DROPOUTS = ("qin", "native_scale", "keras")


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


@contextlib.contextmanager
def process_levers(*, dropout: str = "qin", jit_qnn: bool = False):
    """Within the block, every ``qin_tf.layers.Dropout`` runs as ``dropout`` and, with ``jit_qnn``,
    every QNN tower is one XLA cluster per call; both are undone on leaving.

    ``dropout`` is one of :data:`DROPOUTS`. ``jit_qnn`` runs the tower's forward
    pass (and so its gradient) as a ``tf.function`` with ``jit_compile=True``,
    one per layer instance and training mode; the sparse history (``tf.unique``,
    which XLA cannot compile) stays outside. Models must be built and called
    inside the block.
    """
    import keras
    import tensorflow as tf

    from qin_tf.layers import dropout as dropout_module
    from qin_tf.layers import qnn

    if dropout not in DROPOUTS:
        raise ValueError(f"`dropout` must be one of {DROPOUTS}. Received: dropout={dropout!r}")
    layer, tower = dropout_module.Dropout, qnn.QuadraticNeuralNetwork
    saved = (layer.__dict__["call"], layer.rescale_in_float32, tower.__dict__["call"])
    plain = saved[2]

    def xla_call(self, inputs, training=None):
        key = f"_xla_call_{bool(training)}"
        fn = self.__dict__.get(key)
        if fn is None:
            fn = tf.function(lambda x: plain(self, x, training=bool(training)), jit_compile=True)
            self.__dict__[key] = fn
        return fn(inputs)

    try:
        if dropout == "keras":
            layer.call = keras.layers.Dropout.call
        elif dropout == "native_scale":
            layer.rescale_in_float32 = False
        if jit_qnn:
            tower.call = xla_call
        yield
    finally:
        layer.call, layer.rescale_in_float32, tower.call = saved


def qnn_train_gflop(model, batch_size: int) -> float:
    """GFLOP of the QNN's matrix products in one training step: ``6 B D W`` per quadratic layer.

    Forward ``[B, D] x [D, W]`` and the two products of its gradient, with ``W =
    R D`` (dropout on, the unfolded kernel) or ``D`` (dropout off: the folded
    kernel). The figure divided by the step time, against
    ``bench/bench_gemm.py``'s rate of the same shape, is the step's fraction of
    the GEMM peak.
    """
    from qin_tf.layers import QuadraticLayer

    flop = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, QuadraticLayer):
            width = layer.num_row * layer.input_dim if layer.dropout > 0 else layer.input_dim
            flop += 6 * batch_size * layer.input_dim * width
    return flop / 1e9
