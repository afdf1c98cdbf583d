"""AUC of each context feature alone, on the examples of pipelines.build_examples (or any MMCTR layout).

    python scripts/feature_alone_auc.py --examples=runs/movielens100k/examples

A feature's score for a row is the positive rate of its value among the
train rows (the train rate overall for a value train never saw), so each
feature gets its best monotone use without looking at valid or test labels.
Prints one line per feature and split; RESULTS.md quotes the best one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qin_tf.metrics import evaluate  # noqa: E402


def feature_alone_auc(examples: str, splits=("valid", "test")) -> dict[str, dict[str, float]]:
    with open(os.path.join(examples, "dataset_config.json")) as f:
        context = json.load(f)["context"]
    train = pq.read_table(os.path.join(examples, "train.parquet")).to_pydict()
    y_train = np.asarray(train["label"], np.float64)
    out = {}
    for c in context:
        x = np.asarray(train[c])
        rates = {v: y_train[x == v].mean() for v in np.unique(x)}
        out[c] = {}
        for split in splits:
            t = pq.read_table(os.path.join(examples, f"{split}.parquet"), columns=[c, "label", "user_id"]).to_pydict()
            score = np.asarray([rates.get(v, y_train.mean()) for v in t[c]], np.float32)
            out[c][split] = evaluate(np.asarray(t["label"]), score, np.asarray(t["user_id"]))["auc"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", required=True)
    args = ap.parse_args(argv)
    for c, r in feature_alone_auc(args.examples).items():
        print(c, " ".join(f"{s} AUC {v:.4f}" for s, v in r.items()))


if __name__ == "__main__":
    main()
