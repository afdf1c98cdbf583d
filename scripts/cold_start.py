"""AUC of trained models on cold and warm target items: the cold-start measurement in one command.

    python scripts/cold_start.py --data_dir=DATA --splits=valid,test \
        --model_dirs=runs/qin,runs/qin_no_mm,runs/din

``DATA`` is the preprocessing output the models were trained on; each model
dir is a training run's (its ``best.keras``). Every row of each split is put
in one part by its target item:

* ``seen``: the item occurs in the train split (as a target of any row, or
  in a history);
* ``unseen``: the item has its own dense id (e.g. from the catalog) but never
  occurs in the train split: its id embedding was never trained, so the model
  knows it by its tags and multimodal vector only (a cold item);
* ``oov``: the target is the OOV id 1 (an item without its own id), for data
  with an item vocabulary (``pipelines.build_examples``); in the MMCTR layout
  the ids are the raw ones, item 1 is an ordinary item and this part is empty.

Prints one JSON line per model and split: ``{"model_dir", "split", "all":
{"rows", "auc"}, "seen": {...}, "unseen": {...}, "oov": {...}}``. A part
with one class only (or no rows) gets ``"auc": null``. Comparing a QIN run
with one trained with ``--use_mm_vector=false`` shows what the multimodal
vector buys on cold items.
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
_SPLITS = flags.DEFINE_list("splits", ["valid", "test"], "Splits of the spec to evaluate.")
_MODELS = flags.DEFINE_list("model_dirs", None, "Training model dirs (each with best.keras).", required=True)
_BATCH = flags.DEFINE_integer("batch_size", 8192, "Prediction batch size.")

#: The OOV item id (pipelines.build_examples).
OOV_ID = 1


def train_items(spec, batch_size: int) -> np.ndarray:
    """The sorted dense item ids occurring in the train split (targets and histories; padding excluded)."""
    from qin_tf.data import make_dataset
    from qin_tf.spec import PADDING_ID

    seen = []
    for features, _ in make_dataset(spec, "train", batch_size, training=False):
        seen.append(np.unique(features[spec.target_item].numpy()))
        seen.append(np.unique(features[spec.sequence].numpy()))
    items = np.unique(np.concatenate(seen)) if seen else np.zeros(0, np.int64)
    return items[items != PADDING_ID]


def parts(targets: np.ndarray, seen: np.ndarray, oov_id: int | None = OOV_ID) -> dict[str, np.ndarray]:
    """Row masks ``seen`` / ``unseen`` / ``oov`` of the targets (``oov`` wins over ``seen``).

    ``oov_id`` is None for data without an item vocabulary (the MMCTR layout, whose ids are the raw
    ones: item 1 is an ordinary item there), whose ``oov`` part is then empty."""
    oov = targets == oov_id if oov_id is not None else np.zeros(len(targets), dtype=bool)
    warm = np.isin(targets, seen) & ~oov
    return {"seen": warm, "unseen": ~warm & ~oov, "oov": oov}


def main(argv):
    del argv
    import keras

    import qin_tf.layers  # noqa: F401  (registers the layers)
    from qin_tf.metrics import auc
    from qin_tf.spec import FeatureSpec
    from qin_tf.task import SplitEvaluator

    spec = FeatureSpec.load(os.path.join(_DATA.value, "feature_spec.json"))
    seen = train_items(spec, _BATCH.value)
    oov_id = OOV_ID if spec.vocabulary_key(spec.target_item) is not None else None  # build_examples' rule
    evaluators = {}
    for split in _SPLITS.value:
        evaluators[split] = SplitEvaluator(spec, split, _BATCH.value)  # training's own evaluation, row order
    for model_dir in _MODELS.value:
        model = keras.saving.load_model(os.path.join(model_dir, "best.keras"), compile=False)
        for split, evaluator in evaluators.items():
            labels, scores, _ = evaluator.predict(model)
            targets = np.concatenate([f[spec.target_item].numpy() for f, _ in evaluator.dataset])

            def summary(mask):
                y = labels[mask]
                value = round(auc(y, scores[mask]), 4) if 0 < y.sum() < len(y) else None
                return {"rows": int(mask.sum()), "auc": value}

            out = {"model_dir": model_dir, "split": split, "all": summary(np.ones(len(labels), dtype=bool))}
            out.update({name: summary(mask) for name, mask in parts(targets, seen, oov_id).items()})
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    app.run(main)
