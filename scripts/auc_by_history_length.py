"""AUC of trained models per history-length bucket of one split.

    python scripts/auc_by_history_length.py --data_dir=DATA --split=valid \
        --model_dirs=runs/qin,runs/din [--edges=3,5,10,20]

``DATA`` is the preprocessing output the models were trained on; each model
dir is a training run's (its ``best.keras``). The history length is the
number of real (non-padding) items of the record's sequence, after
preprocessing's ``max_len`` cut. Prints one JSON line per model:
``{"model_dir", "all": {"rows", "auc"}, "buckets": [{"min", "max", "rows",
"auc"}, ...]}``; ``max`` is ``null`` for the last, open bucket. A bucket
with one class only gets ``"auc": null``.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qin_tf.runtime import import_tensorflow  # noqa: E402

import_tensorflow()

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

_DATA = flags.DEFINE_string("data_dir", None, "Preprocessing output (feature_spec.json and TFRecords).",
                            required=True)
_SPLIT = flags.DEFINE_string("split", "valid", "Split of the spec to evaluate.")
_MODELS = flags.DEFINE_list("model_dirs", None, "Training model dirs (each with best.keras).", required=True)
_EDGES = flags.DEFINE_list("edges", ["3", "5", "10", "20"], "Upper ends of the buckets (inclusive); "
                           "a last bucket holds the longer histories.")
_BATCH = flags.DEFINE_integer("batch_size", 8192, "Prediction batch size.")


def buckets(edges: list[int]) -> list[tuple[int, int | None]]:
    """``[3, 5]`` -> ``[(0, 3), (4, 5), (6, None)]``."""
    out, low = [], 0
    for e in edges:
        out.append((low, e))
        low = e + 1
    return out + [(low, None)]


def main(argv):
    del argv
    import keras

    import qin_tf.layers  # noqa: F401  (registers the layers)
    from qin_tf.metrics import auc
    from qin_tf.spec import PADDING_ID, FeatureSpec
    from qin_tf.task import SplitEvaluator

    edges = sorted(int(e) for e in _EDGES.value)
    spec = FeatureSpec.load(os.path.join(_DATA.value, "feature_spec.json"))
    # Training's own evaluation of the split (row order, parsed batches cached).
    evaluator = SplitEvaluator(spec, _SPLIT.value, _BATCH.value)
    lengths = np.concatenate([np.sum(features[spec.sequence].numpy() != PADDING_ID, axis=1)
                              for features, _ in evaluator.dataset])

    for model_dir in _MODELS.value:
        model = keras.saving.load_model(os.path.join(model_dir, "best.keras"), compile=False)
        labels, scores, _ = evaluator.predict(model)

        def safe_auc(mask):
            y = labels[mask]
            return round(auc(y, scores[mask]), 4) if 0 < y.sum() < len(y) else None

        rows = []
        for low, high in buckets(edges):
            mask = (lengths >= low) & (lengths <= (high if high is not None else np.inf))
            rows.append({"min": low, "max": high, "rows": int(mask.sum()), "auc": safe_auc(mask)})
        print(json.dumps({"model_dir": model_dir, "split": _SPLIT.value,
                          "all": {"rows": int(len(labels)), "auc": safe_auc(np.ones(len(labels), dtype=bool))},
                          "buckets": rows}), flush=True)


if __name__ == "__main__":
    app.run(main)
