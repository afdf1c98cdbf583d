"""A preprocessed dataset whose train split keeps a fraction of the training users (data-scaling study).

    python scripts/subsample_users.py --data_dir=DATA --output_dir=OUT --fraction=0.25 [--seed=0]

``DATA`` is ``pipelines.preprocess`` output. The distinct ``user_id`` values
of its train split are put in one random order (``--seed``) and the first
``round(fraction * users)`` are kept: every train row of a kept user is
written, in file order, to ``OUT/train-00000-of-00001.tfrecord.gz``; rows of
the other users are left out. So a smaller fraction's users are a subset of
a larger one's (same seed). Every other split, the item table and the
vocabularies are the full dataset's: ``OUT/feature_spec.json`` points at
``DATA``'s files by absolute path, so valid and test are the same rows for
every fraction. Prints one JSON line: users and rows kept out of all.

Exit status 1 with a one-line error for a bad fraction, a missing spec, a
spec without a ``user_id``-like meta feature, or an ``OUT`` that already
holds a feature spec (nothing is overwritten).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qin_tf.runtime import import_tensorflow  # noqa: E402

tf = import_tensorflow()

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from qin_tf.spec import SPEC_FILENAME, FeatureSpec, SpecError  # noqa: E402

_DATA = flags.DEFINE_string("data_dir", None, "The pipelines.preprocess output to take a subset of.", required=True)
_OUT = flags.DEFINE_string("output_dir", None, "Where the subset's train shard and feature spec go.", required=True)
_FRACTION = flags.DEFINE_float("fraction", None, "The fraction of training users kept, in (0, 1].", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "The seed of the order in which users are kept.")
_USER = flags.DEFINE_string("user_feature", "user_id", "The meta feature that names the user of a row.")

TRAIN_FILE = "train-00000-of-00001.tfrecord.gz"


def subsample(data_dir: str, output_dir: str, fraction: float, seed: int = 0, user_feature: str = "user_id") -> dict:
    """Writes the subset (see the module docstring) and returns its counts."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--fraction must be in (0, 1]. Received: {fraction}")
    spec = FeatureSpec.load(data_dir)
    if user_feature not in spec.meta:
        raise ValueError(f"{os.path.join(data_dir, SPEC_FILENAME)}: no meta feature `{user_feature}` "
                         f"(meta: {list(spec.meta)}).")
    if os.path.exists(os.path.join(output_dir, SPEC_FILENAME)):
        raise ValueError(f"{output_dir} already holds a {SPEC_FILENAME}; choose a new --output_dir.")
    compression = spec.compression or ""
    parse = {user_feature: tf.io.FixedLenFeature([], tf.int64)}
    records, users = [], []
    for batch in tf.data.TFRecordDataset(spec.split_files("train"), compression_type=compression).batch(8192):
        records.extend(batch.numpy().tolist())
        users.append(tf.io.parse_example(batch, parse)[user_feature].numpy())
    users = np.concatenate(users) if users else np.zeros(0, np.int64)
    distinct = np.unique(users)
    order = np.random.default_rng(seed).permutation(distinct)
    kept_users = order[:int(round(fraction * len(distinct)))]
    keep = np.isin(users, kept_users)
    os.makedirs(output_dir, exist_ok=True)
    options = tf.io.TFRecordOptions(compression_type=compression)
    tmp = os.path.join(output_dir, f".{TRAIN_FILE}.tmp")
    with tf.io.TFRecordWriter(tmp, options) as writer:
        for record, k in zip(records, keep):
            if k:
                writer.write(record)
    os.replace(tmp, os.path.join(output_dir, TRAIN_FILE))
    source = os.path.abspath(spec.base_dir)
    splits = {name: dataclasses.replace(split, files=tuple(os.path.join(source, f) if not os.path.isabs(f) else f
                                                           for f in split.files))
              for name, split in spec.splits.items()}
    splits["train"] = dataclasses.replace(spec.splits["train"], files=(TRAIN_FILE,), num_rows=int(keep.sum()))
    table = spec.item_table_file
    subset = dataclasses.replace(spec, splits=splits,
                                 item_table_file=table if os.path.isabs(table) else os.path.join(source, table))
    subset.save(output_dir)
    return {"fraction": fraction, "seed": seed, "users": int(len(kept_users)), "all_users": int(len(distinct)),
            "train_rows": int(keep.sum()), "all_train_rows": int(len(users)), "output_dir": output_dir}


def main(argv):
    del argv
    try:
        print(json.dumps(subsample(_DATA.value, _OUT.value, _FRACTION.value, _SEED.value, _USER.value)))
    except (ValueError, SpecError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
