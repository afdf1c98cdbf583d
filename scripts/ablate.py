"""Trains a QIN ablation with the training CLI: ``python scripts/ablate.py VARIANT [train flags...]``.

Used for the ablations in RESULTS.md. Each variant swaps one part of QIN
for DIN's, everything else (item embedding, recipe, flags, outputs) being
``python -m qin_tf.train``'s:

- ``qin_din_attention``: DIN's attention MLP (``din_attention_units``,
  ``din_attention_dropout``, no softmax) in place of ASTA, QNN on top.
- ``asta_mlp_head``: ASTA, with DIN's DNN (``din_dnn_units``, batch norm,
  ReLU, ``dropout``) in place of QNN.
- ``qnn_input_bn``: QIN with a batch norm on QNN's input.

The models are built under the name ``qin``; they are for measurement, not
for export.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qin_tf.runtime import import_tensorflow  # noqa: E402

import_tensorflow()   # before anything else imports TensorFlow: keeps its start-up noise off stderr

import keras  # noqa: E402

import qin_tf.model as qin_model  # noqa: E402
from qin_tf import train  # noqa: E402
from qin_tf.layers import DINAttention, MLPBlock, QuadraticNeuralNetwork  # noqa: E402

VARIANTS = ("qin_din_attention", "asta_mlp_head", "qnn_input_bn")


def _patch(variant: str, argv: list[str]) -> None:
    # The DIN parts take their sizes from the flags, as build_din does.
    fv = train.flags.FlagValues()
    train.define_flags(fv)
    train.parse_flags(argv, fv)
    config = train.config_from_flags(fv).model
    att_units, dnn_units = list(config.din_attention_units), list(config.din_dnn_units)
    att_dropout = config.din_attention_dropout

    if variant == "qin_din_attention":
        def attention(attention_dim=None, kernel_regularizer=None, name=None):
            return DINAttention(attention_units=att_units, activation="relu", dropout=att_dropout,
                                use_softmax=False, kernel_regularizer=kernel_regularizer, name=name)
        qin_model.AdaptiveSparseTargetAttention = attention
    elif variant == "asta_mlp_head":
        def head(num_layers, num_row, dropout, batch_norm, kernel_regularizer=None, name=None):
            return MLPBlock(dnn_units, activation="relu", dropout=dropout, batch_norm=batch_norm, output_units=1,
                            kernel_regularizer=kernel_regularizer,
                            output_dtype=keras.config.dtype_policy().variable_dtype, name=name)
        qin_model.QuadraticNeuralNetwork = head
    elif variant == "qnn_input_bn":
        def head(**kwargs):
            qnn = QuadraticNeuralNetwork(**kwargs)
            norm = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="qnn_input_bn")
            return lambda x: qnn(norm(x))
        qin_model.QuadraticNeuralNetwork = head


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in VARIANTS:
        print(f"usage: python scripts/ablate.py {{{'|'.join(VARIANTS)}}} [train flags...]", file=sys.stderr)
        return 2
    variant, rest = argv[1], [argv[0], *argv[2:]]
    try:
        _patch(variant, rest)
    except (ValueError, train.flags.Error):
        pass  # bad flags: train.cli reports them as the training CLI does
    return train.cli(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
