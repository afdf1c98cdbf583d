"""Trains a QIN ablation with the training CLI: ``python scripts/ablate.py VARIANT [train flags...]``.

Used for the ablations in RESULTS.md. Each variant is QIN with one part
changed, named by model flags (:data:`VARIANTS`); everything else (item
embedding, recipe, flags, outputs) is ``python -m qin_tf.train``'s, which
this runs with the variant's flags first and the given flags after them
(so an explicit flag still wins):

- ``qin_din_attention``: ``--extractor=din_attention``: DIN's attention MLP
  (``din_attention_units``, ``din_attention_dropout``, no softmax) in place
  of ASTA, QNN on top.
- ``asta_mlp_head``: ``--head=dnn``: ASTA, with DIN's DNN (``din_dnn_units``,
  batch norm, ReLU, ``dropout``) in place of QNN.
- ``qnn_input_bn``: ``--head_input_batch_norm``: QIN with a batch norm on
  QNN's input.
- ``qnn_dnn_tower``: ``--head=qnn_dnn``: QNN with a DNN tower
  (``din_dnn_units``) beside it on the same input, their logits summed
  (DCNv2's parallel structure).

Any other pair of parts needs no script: ``python -m qin_tf.train
--extractor=... --head=...``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {
    "qin_din_attention": ["--model=qin", "--extractor=din_attention"],
    "asta_mlp_head": ["--model=qin", "--head=dnn"],
    "qnn_input_bn": ["--model=qin", "--head_input_batch_norm"],
    "qnn_dnn_tower": ["--model=qin", "--head=qnn_dnn"],
}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in VARIANTS:
        print(f"usage: python scripts/ablate.py {{{'|'.join(VARIANTS)}}} [train flags...]", file=sys.stderr)
        return 2
    from qin_tf.runtime import import_tensorflow

    import_tensorflow()   # before anything else imports TensorFlow: keeps its start-up noise off stderr
    from qin_tf import train

    return train.cli([argv[0], *VARIANTS[argv[1]], *argv[2:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
