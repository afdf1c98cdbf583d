"""The SavedModel contract: what the exporter writes and every reader of an export relies on.

One definition of the names that ``export.exporter`` writes into a version
directory and that ``export.client``, ``export.local_server``,
``export.score``, ``export.validate`` and the trainer read back: the
signature names, their input and output, the serving tag, the raw-id dtypes,
where the spec and the fingerprints live inside a version, the model file a
training run leaves, and the input file suffixes the scoring tools accept.
Nothing else spells these names (STYLE.md: a contract two packages share
lives once, below both).
"""

from __future__ import annotations

import os

from qin_tf.spec import SPEC_FILENAME, FeatureSpec

#: Name of the per-feature signature (TF Serving's default).
SERVING_SIGNATURE = "serving_default"
#: Name of the serialized-``tf.train.Example`` signature.
EXAMPLES_SIGNATURE = "predict_examples"
#: The raw-id signatures (only when the spec has vocabularies): ids as the log had them.
RAW_SIGNATURE = "serving_raw"
RAW_EXAMPLES_SIGNATURE = "predict_raw_examples"
#: Input of :data:`EXAMPLES_SIGNATURE` and :data:`RAW_EXAMPLES_SIGNATURE`.
EXAMPLES_INPUT = "examples"
#: The one output of every signature (the model's output layer's name too).
OUTPUT = "ctr"
#: The SavedModel tag TF Serving loads.
SERVE_TAG = "serve"
#: The feature spec inside the export, relative to the version directory.
SPEC_ASSET_PATH = os.path.join("assets", SPEC_FILENAME)
#: The fingerprints of a version, relative to the version directory.
FINGERPRINT_PATH = os.path.join("assets.extra", "model_fingerprint.json")
#: The model file ``qin_tf.train`` leaves in its model_dir (and the exporter and warm start read).
MODEL_FILENAME = "best.keras"

#: Input files of the scoring tools (``export.score``, ``export.client``), by kind.
PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfrecord.gz", ".tfrecords.gz")


def raw_dtype(spec: FeatureSpec, name: str) -> str:
    """The dtype of model feature ``name`` in the raw-id signatures: its vocabulary's, else int64 (dense)."""
    key = spec.vocabulary_key(name)
    return spec.vocabularies[key].get("dtype", "string") if key else "int64"


def raw_padding(dtype: str):
    """The padding value of a raw history: ``""`` for string ids, 0 for int64 ids (0 is padding, as everywhere)."""
    return "" if dtype == "string" else 0
