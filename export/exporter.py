r"""Exports a trained model as a SavedModel that TensorFlow Serving loads as is.

    python -m export.exporter --model_dir=runs/sample/model --export_base=runs/sample/export \
        --data_dir=runs/sample/data

reads ``model_dir/best.keras`` and ``model_dir/feature_spec.json`` (what
``qin_tf.train`` leaves; ``--data_dir``, the preprocessed data, gives the
warmup rows) and writes ``export_base/<version>/``, the layout
``tensorflow_model_server --model_base_path=export_base`` watches:

    <version>/saved_model.pb, variables/       the inference graph and weights
    <version>/assets/feature_spec.json         the feature spec the model was trained on
    <version>/assets.extra/tf_serving_warmup_requests
                                               PredictionLog records TF Serving replays
                                               before it marks the version AVAILABLE
    <version>/assets.extra/model_fingerprint.json
                                               which training run the version serves
                                               (:mod:`qin_tf.fingerprint`: its
                                               fingerprint and its model_dir), for
                                               ``export.refresh_catalog`` and
                                               ``qin_tf.train --warm_start_from``

Signatures (every input and output is named; no ``inputs_1`` / ``output_0``):

* ``serving_default``: one input per model feature of the spec
  (``spec.model_features``: the target item, the behaviour sequence, the
  context ids), int64, shape ``[batch]`` or ``[batch, max_len]``; output
  ``ctr``, float32 ``[batch]``, the click probability.
* ``predict_examples``: input ``examples``, string ``[batch]``, serialized
  ``tf.train.Example`` in the TFRecord schema of ``pipelines.preprocess``
  (label and meta may be present and are ignored); same output ``ctr``.

The graph is the model's inference branch (``training=False``: no dropout,
batch normalisation from its moving statistics) with the QNN's R rows summed
into one kernel, ASTA's four projections multiplied out into two ``[D, D]``
matrices and every item's vector precomputed into one ``[num_items, 3E]``
table (:func:`fold_for_inference`), a frozen weight inside the graph; it
needs no Python to load: no custom ops, no qin_tf, no
Keras custom objects, and it loads through TF1's Session loader, the path
TF Serving's C++ loader follows. Before a version is published, it is
reloaded and both signatures are checked against the Keras model.

Ids the model has never seen are handled inside the graph as in training:
context ids at or beyond the vocabulary map to the out-of-vocabulary row,
item ids beyond the table to padding. A negative id breaks the spec's id
rule (:data:`qin_tf.spec.ID_RULE`): an assertion in both signatures refuses
the request (``INVALID_ARGUMENT`` from TF Serving). The raw-id signatures
apply the raw-id rule (:data:`qin_tf.spec.RAW_ID_RULE`, the rule the
pipeline builds vocabularies by) the same way: raw 0 or ``""`` is padding in
the history and refused as the target item or a context id; a negative raw
id, or a string with a control character or line break, is refused anywhere.

A version is written to a hidden temporary directory inside ``export_base``
(TF Serving only loads directories named by a number) and renamed into
place once complete, so a server never sees a half-written version. On a
filesystem that cannot rename a directory at once (``gs://``, ``ram://``:
any URL, see :mod:`qin_tf.fileio`), the version is written and verified in a
local temporary directory and then copied file by file into
``export_base/<version>/``, ``saved_model.pb`` last: the version directory
appears before it is complete, but it holds a ``saved_model.pb`` (what
:func:`servable_versions` and TF Serving's loader look for) only once every
other file is there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import Iterable, Mapping, Sequence

from absl import logging

from qin_tf import fileio
from qin_tf.cli import error_line, exit_error
from qin_tf.fingerprint import FingerprintError, model_fingerprint, read_fingerprint, weights_digest, write_fingerprint
from qin_tf.signatures import (EXAMPLES_INPUT, EXAMPLES_SIGNATURE, FINGERPRINT_PATH, MODEL_FILENAME,  # noqa: F401
                               OUTPUT, RAW_EXAMPLES_SIGNATURE, RAW_SIGNATURE, SERVE_TAG, SERVING_SIGNATURE,
                               SPEC_ASSET_PATH, raw_dtype, raw_padding)
from qin_tf.spec import (ID_RULE, RAW_ID_RULE, SPEC_FILENAME, FeatureSpec, SpecError, first_bad_raw_id,
                         raw_id_problem)

#: TF Serving's method name for Predict signatures.
PREDICT_METHOD_NAME = "tensorflow/serving/predict"
#: Where TF Serving looks for warmup records, relative to the version directory.
WARMUP_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")
#: Rows used for warmup requests (TF Serving accepts at most 1000 records).
DEFAULT_WARMUP_ROWS = 8


@contextlib.contextmanager
def quiet_tf_logging():
    """Hides TensorFlow's INFO lines while it saves (absl logging), unless QIN_TF_VERBOSE is set."""
    old = logging.get_verbosity()
    if os.environ.get("QIN_TF_VERBOSE") or old != logging.INFO:
        yield
        return
    logging.set_verbosity(logging.WARNING)
    try:
        yield
    finally:
        logging.set_verbosity(old)


class ExportError(RuntimeError):
    """The model, the spec or the export directory does not allow an export."""


def read_version_fingerprint(version_dir: str) -> dict | None:
    """:func:`qin_tf.fingerprint.read_fingerprint` for export's commands: a damaged file is an ExportError."""
    try:
        return read_fingerprint(version_dir)
    except FingerprintError as e:
        raise ExportError(str(e)) from None


# --------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------


def list_versions(export_base: str) -> list[int]:
    """The complete versions in ``export_base``, ascending (numeric directory names)."""
    g = fileio.gfile()
    if not g.isdir(export_base):
        return []
    out = []
    for name in (n.rstrip("/") for n in g.listdir(export_base)):
        if name.isdigit() and g.isdir(os.path.join(export_base, name)):
            out.append(int(name))
    return sorted(out)


def servable_versions(export_base: str, log=None) -> list[int]:
    """The versions in ``export_base`` that hold a ``saved_model.pb``, ascending.

    A numbered directory without one (empty, or not a SavedModel) is skipped
    and, with ``log`` (a callable taking one line), reported.
    """
    out = []
    for v in list_versions(export_base):
        if fileio.gfile().exists(os.path.join(export_base, str(v), "saved_model.pb")):
            out.append(v)
        elif log is not None:
            log(f"{os.path.join(export_base, str(v))}: skipped, no saved_model.pb in this version directory.")
    return out


def latest_version_dir(export_base: str, log=None) -> str:
    """The directory of the newest servable version in ``export_base`` (TF Serving's default policy).

    Numbered directories without a ``saved_model.pb`` are skipped (see
    :func:`servable_versions`).
    """
    if not fileio.gfile().isdir(export_base):
        raise ExportError(f"{export_base}: no such directory; pass the export base that "
                          "`python -m export.exporter --export_base=...` wrote.")
    versions = servable_versions(export_base, log)
    if not versions:
        raise ExportError(f"{export_base}: no SavedModel version here (no directory named by a number "
                          "holding a saved_model.pb); run `python -m export.exporter` first.")
    return os.path.join(export_base, str(versions[-1]))


# --------------------------------------------------------------------------
# Signatures
# --------------------------------------------------------------------------


def serving_input_signature(spec: FeatureSpec) -> dict:
    """``tf.TensorSpec`` of each model feature, batch dimension ``None``, named as the feature."""
    import tensorflow as tf

    return {f.name: tf.TensorSpec([None, *f.shape], tf.dtypes.as_dtype(f.dtype), name=f.name)
            for f in spec.model_features}


def example_parse_spec(spec: FeatureSpec) -> dict:
    """``tf.io.parse_example`` features of the model inputs only (label and meta not required)."""
    from qin_tf.data import example_parse_spec as data_parse_spec

    return data_parse_spec(spec, labelled=False, with_meta=False)


def raw_input_signature(spec: FeatureSpec) -> dict:
    """``tf.TensorSpec`` of each raw input: ``[batch]``, the history ``[batch, any width]``."""
    import tensorflow as tf

    return {f.name: tf.TensorSpec([None] + ([None] if f.shape else []), tf.dtypes.as_dtype(raw_dtype(spec, f.name)),
                                  name=f.name)
            for f in spec.model_features}


def raw_example_parse_spec(spec: FeatureSpec) -> dict:
    """``tf.io.parse_example`` features of raw-id examples: the history a list of any length."""
    import tensorflow as tf

    out = {}
    for f in spec.model_features:
        dtype = tf.dtypes.as_dtype(raw_dtype(spec, f.name))
        out[f.name] = tf.io.VarLenFeature(dtype) if f.shape else tf.io.FixedLenFeature([], dtype)
    return out


#: RE2 pattern of a string holding a character :data:`qin_tf.spec.RAW_ID_RULE` forbids (every C0/C1
#: control character, line breaks among them, and the Unicode line and paragraph separators).
_RAW_ID_FORBIDDEN_RE = r"(?s).*[\x00-\x1f\x7f-\x9f\x{2028}\x{2029}].*"


def first_bad_raw_input(spec: FeatureSpec, name: str, values):
    """``(index, reason)`` of the first value of raw-signature input ``name`` breaking :data:`RAW_ID_RULE`, or None.

    The Python twin of the graph's check (:meth:`RawIdLookup.check`), for a
    server that names the row at fault: a feature with a vocabulary holds raw
    ids (in the history, the raw padding value is allowed anywhere); one
    without holds dense ids (:data:`ID_RULE`). ``values``: a numpy array,
    strings as ``bytes`` or ``str``.
    """
    import numpy as np

    arr = np.asarray(values)
    key = spec.vocabulary_key(name)
    if key is None:
        if arr.dtype.kind in "iu" and (arr < 0).any():
            index = tuple(int(i) for i in np.argwhere(arr < 0)[0])
            return index, f"{int(arr[index])} is negative; {ID_RULE}"
        return None
    history = name == spec.sequence
    if arr.dtype.kind in "iu":  # vectorised: the rule for ints is a bound
        bad = arr < (0 if history else 1)
        if not bad.any():
            return None
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        return index, f"{raw_id_problem(int(arr[index]))}; {RAW_ID_RULE}"
    padding = raw_padding(spec.vocabularies[key].get("dtype", "string"))

    def problem(value):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                return f"{value!r} is not valid UTF-8"
        elif isinstance(value, np.integer):
            value = int(value)
        return None if history and value == padding else raw_id_problem(value)

    flat = arr.reshape(-1).tolist()
    bad_values = {v for v in set(flat) if problem(v) is not None}  # each distinct id checked once
    if not bad_values:
        return None
    i = next(i for i, v in enumerate(flat) if v in bad_values)
    return tuple(int(x) for x in np.unravel_index(i, arr.shape)), f"{problem(flat[i])}; {RAW_ID_RULE}"


def pad_recent_graph(ids, max_len: int):
    """The spec's sequence rule (:func:`qin_tf.spec.left_pad_recent`) in the graph: ``[B, W]`` -> ``[B, max_len]``.

    Zeros (padding) are dropped wherever they are, the most recent ``max_len``
    non-zero ids (the last ones) are kept, oldest first, left-padded with 0.
    """
    import tensorflow as tf

    order = tf.argsort(tf.cast(tf.not_equal(ids, 0), tf.int32), axis=1, stable=True)
    packed = tf.gather(ids, order, batch_dims=1)  # zeros first, the ids in their order after them
    padded = tf.concat([tf.zeros([tf.shape(ids)[0], max_len], ids.dtype), packed], axis=1)
    return padded[:, -max_len:]


class RawIdLookup:
    """The raw -> dense maps of a spec's vocabularies, as ``tf.lookup`` tables (assets of the export).

    Line n (1-based) of a vocabulary file is dense id n + 1; an unknown raw id
    is the vocabulary's ``oov_id`` (1); in a history, the raw padding value
    (:func:`qin_tf.signatures.raw_padding`) is dense 0. A raw id breaking
    :data:`qin_tf.spec.RAW_ID_RULE` is refused (:meth:`check`). Features
    without a vocabulary pass through.
    """

    def __init__(self, spec: FeatureSpec):
        import tensorflow as tf

        self.spec = spec
        self.tables = {}
        for key, v in sorted(spec.vocabularies.items()):
            init = tf.lookup.TextFileInitializer(spec.path(v["path"]), tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                                                 tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER)
            self.tables[key] = tf.lookup.StaticHashTable(init, default_value=-1, name=f"vocab_{key}")

    def check(self, name: str, raw):
        """The assertion of :data:`qin_tf.spec.RAW_ID_RULE` on raw input ``name`` (None without a vocabulary).

        A negative int, a string with a control character or line break or
        that is not UTF-8, and raw 0 / ``""`` outside the history are refused
        (``INVALID_ARGUMENT`` naming the input and the rule); in the history,
        0 / ``""`` is padding. The same rule the pipeline applies when it builds
        the vocabularies, so the graph accepts exactly the ids a build accepts.
        """
        import tensorflow as tf

        if self.spec.vocabulary_key(name) is None:
            return None
        history = name == self.spec.sequence
        if raw.dtype == tf.string:
            bad = tf.strings.regex_full_match(raw, _RAW_ID_FORBIDDEN_RE)
            bad |= tf.not_equal(tf.strings.unicode_transcode(raw, "UTF-8", "UTF-8", errors="replace"), raw)
            if not history:
                bad |= tf.equal(raw, "")
        else:
            bad = raw < (0 if history else 1)
        return tf.debugging.assert_equal(tf.reduce_any(bad), False, message=f"`{name}`: {RAW_ID_RULE}")

    def dense(self, name: str, raw):
        import tensorflow as tf

        key = self.spec.vocabulary_key(name)
        if key is None:
            return raw
        v = self.spec.vocabularies[key]
        with tf.control_dependencies([self.check(name, raw)]):
            raw = tf.identity(raw)
        text = raw if raw.dtype == tf.string else tf.strings.as_string(raw)
        line = self.tables[key].lookup(text)
        ids = tf.where(line >= 0, line + 2, tf.constant(int(v.get("oov_id", 1)), tf.int64))
        if name == self.spec.sequence:
            ids = tf.where(tf.equal(raw, raw_padding(v.get("dtype", "string"))), tf.zeros_like(ids), ids)
        return ids

    def features(self, raw: Mapping) -> dict:
        out = {name: self.dense(name, raw[name]) for name in self.spec.model_feature_names}
        out[self.spec.sequence] = pad_recent_graph(out[self.spec.sequence], self.spec.max_len)
        return out


def _serving_module(model, spec: FeatureSpec, spec_asset_file: str):
    """A ``tf.Module`` holding the model, the spec asset and the signature functions."""
    import tensorflow as tf

    names = spec.model_feature_names
    parse_spec = example_parse_spec(spec)

    def ctr(features):
        # The spec's id rule, inside the graph: TF Serving refuses a negative id
        # (INVALID_ARGUMENT) instead of scoring it as padding.
        checks = [tf.debugging.assert_non_negative(features[n], message=f"`{n}`: {ID_RULE}") for n in names]
        with tf.control_dependencies(checks):
            y = model({n: tf.identity(features[n]) for n in names}, training=False)
        if isinstance(y, Mapping):
            y = y[OUTPUT]
        # [batch] or [batch, 1] -> [batch]; reshape, never an axis-less squeeze.
        return tf.reshape(tf.cast(y, tf.float32), [-1])

    @tf.function(input_signature=[serving_input_signature(spec)])
    def serve(features):
        return {OUTPUT: ctr(features)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_examples(examples):
        return {OUTPUT: ctr(tf.io.parse_example(examples, parse_spec))}

    # Track the variables the signatures read, not the Keras model object:
    # saving the model object itself would also save Keras' own variable
    # wrappers, duplicates that the TF1 / C++ loader (TF Serving's) cannot
    # match to the graph's variable reads. (keras.export.ExportArchive does
    # the same; it has no place for an asset, hence this module.)
    module = tf.Module(name="qin_serving")
    module.serve = serve
    module.serve_examples = serve_examples
    functions = [serve, serve_examples]
    if spec.vocabularies:
        lookup = RawIdLookup(spec)
        raw_parse_spec = raw_example_parse_spec(spec)

        @tf.function(input_signature=[raw_input_signature(spec)])
        def serve_raw(features):
            return {OUTPUT: ctr(lookup.features(features))}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
        def serve_raw_examples(examples):
            parsed = tf.io.parse_example(examples, raw_parse_spec)
            seq = parsed[spec.sequence]
            parsed[spec.sequence] = tf.sparse.to_dense(seq, default_value=raw_padding(raw_dtype(spec, spec.sequence)))
            return {OUTPUT: ctr(lookup.features(parsed))}

        module.vocabulary_tables = list(lookup.tables.values())
        module.serve_raw, module.serve_raw_examples = serve_raw, serve_raw_examples
        functions += [serve_raw, serve_raw_examples]
    seen, variables = set(), []
    for fn in (f.get_concrete_function() for f in functions):
        for v in fn.variables:
            if id(v) not in seen:
                seen.add(id(v))
                variables.append(v)
    module.model_variables = variables
    module.feature_spec = tf.saved_model.Asset(spec_asset_file)
    return module


# --------------------------------------------------------------------------
# Warmup
# --------------------------------------------------------------------------


def read_examples(spec: FeatureSpec, num_rows: int, splits: Sequence[str] | None = None) -> list[bytes]:
    """The first ``num_rows`` serialized examples of the first split whose files exist.

    Splits are tried in the order given (default: test, valid, train, then any
    other split of the spec). Returns ``[]`` when no split's files are here.
    """
    import tensorflow as tf

    order = list(splits) if splits is not None else (
        [s for s in ("test", "valid", "train") if s in spec.splits]
        + sorted(s for s in spec.splits if s not in ("test", "valid", "train")))
    for split in order:
        files = spec.split_files(split)
        if not files or not all(tf.io.gfile.exists(f) for f in files):
            continue
        ds = tf.data.TFRecordDataset(files, compression_type=spec.compression or "")
        rows = [r.numpy() for r in ds.take(num_rows)]
        if rows:
            return rows
    return []


def parse_examples(spec: FeatureSpec, examples: Sequence[bytes]) -> dict:
    """Serialized examples -> ``{name: int64 numpy array}`` of the model features."""
    import tensorflow as tf

    parsed = tf.io.parse_example(tf.constant(list(examples), tf.string), example_parse_spec(spec))
    return {n: parsed[n].numpy() for n in spec.model_feature_names}


def raw_rows(spec: FeatureSpec, features: Mapping) -> tuple[dict, dict]:
    """Dense-id rows -> the same rows with raw ids, and the dense ids the raw-id signatures make of them.

    Dense id d >= 2 becomes line d - 1 of its vocabulary; the OOV id and ids
    beyond the vocabulary become a raw id the vocabulary lacks (so they map
    to OOV); history padding becomes the raw padding value. For warmup
    requests, the export's own check and tests.
    """
    import numpy as np

    vocabs = {key: spec.read_vocabulary(key) for key in spec.vocabularies}
    raw, dense = {}, {}
    for f in spec.model_features:
        value = np.asarray(features[f.name], dtype=np.int64)
        key = spec.vocabulary_key(f.name)
        if key is None:
            raw[f.name], dense[f.name] = value, value
            continue
        v, words = spec.vocabularies[key], vocabs[key]
        as_int = v.get("dtype", "string") == "int64"
        if as_int:
            unknown = str(max((int(w) for w in words), default=0) + 1)
        else:  # a valid raw id (no control character) that the vocabulary lacks
            unknown, known_words = "unknown", set(words)
            while unknown in known_words:
                unknown = "~" + unknown
        table = np.asarray(["", unknown] + words, dtype=object)
        known = (value >= 2) & (value < len(table))
        text = np.where(known, table[np.where(known, value, 0)], unknown)
        mapped = np.where(known, value, int(v.get("oov_id", 1)))
        if f.shape:
            text = np.where(value == 0, "", text)
            mapped = np.where(value == 0, 0, mapped)
        raw[f.name] = np.where(text == "", "0", text).astype(np.int64) if as_int else text.astype(object)
        dense[f.name] = mapped
    return raw, dense


def raw_examples(spec: FeatureSpec, raw: Mapping) -> list[bytes]:
    """Raw-id rows -> serialized ``tf.train.Example`` s for ``predict_raw_examples``, histories unpadded."""
    import numpy as np
    import tensorflow as tf

    n = len(next(iter(raw.values())))
    out = []
    for i in range(n):
        feats = {}
        for f in spec.model_features:
            dtype = raw_dtype(spec, f.name)
            values = np.asarray(raw[f.name][i]).reshape(-1).tolist()
            if f.shape:
                values = [x for x in values if x != raw_padding(dtype)]
            feats[f.name] = (tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(x).encode() for x in values]))
                             if dtype == "string" else
                             tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in values])))
        out.append(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    return out


def warmup_requests(spec: FeatureSpec, examples: Sequence[bytes], model_name: str = "qin") -> list:
    """PredictionLogs for every signature: the first row alone, then all rows as one batch."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    features = parse_examples(spec, examples)
    signatures = [SERVING_SIGNATURE, EXAMPLES_SIGNATURE]
    if spec.vocabularies:
        raw = raw_rows(spec, features)[0]
        raw_serialized = raw_examples(spec, raw)
        signatures += [RAW_SIGNATURE, RAW_EXAMPLES_SIGNATURE]
    logs = []
    for n in sorted({1, len(examples)}):
        for signature in signatures:
            req = predict_pb2.PredictRequest()
            req.model_spec.name = model_name
            req.model_spec.signature_name = signature
            if signature in (SERVING_SIGNATURE, RAW_SIGNATURE):
                for name, value in (features if signature == SERVING_SIGNATURE else raw).items():
                    req.inputs[name].CopyFrom(tf.make_tensor_proto(value[:n]))
            else:
                rows = examples if signature == EXAMPLES_SIGNATURE else raw_serialized
                req.inputs[EXAMPLES_INPUT].CopyFrom(tf.make_tensor_proto(list(rows[:n]), dtype=tf.string))
            logs.append(prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=req)))
    return logs


def _synthetic_examples(spec: FeatureSpec, num_rows: int) -> list[bytes]:
    """Well-formed examples with valid ids, for when no split's TFRecords are at hand."""
    import tensorflow as tf

    rows = []
    for r in range(num_rows):
        feats = {}
        for f in spec.model_features:
            vocab = max(f.vocab_size, 2)
            if f.shape:  # the r + 1 most recent items, left-padded
                n = min(r + 1, f.shape[0])
                values = [0] * (f.shape[0] - n) + [1 + (r + i) % (vocab - 1) for i in range(n)]
            elif f.role == "target_item":  # never the padding id 0
                values = [1 + r % (vocab - 1)]
            else:
                values = [r % vocab]
            feats[f.name] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        rows.append(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    return rows


def write_warmup(path: str, logs: Iterable) -> None:
    import tensorflow as tf

    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as w:
        for log in logs:
            w.write(log.SerializeToString())


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def fold_for_inference(model, *, qnn: bool = True, attention: bool = True, item_vectors: bool = True):
    """An inference copy of ``model`` with weights folded ahead of time; same scores, less work.

    * ``qnn``: a QIN quadratic layer computes ``h = x * sum_r (x W_r + b_r)``
      over its R rows; without dropout that is ``x * (x W_sum + b_sum)``. The
      layer folds its kernel on every call at inference; this folds it once,
      rebuilding the QNN with ``num_row=1`` and the summed weights, so a
      served request reads a ``[D, D]`` kernel instead of reading and summing
      a ``[D, R*D]`` one.
    * ``attention``: ASTA's four ``[D, A]``/``[A, D]`` matrices become
      ``W_qk = W_q W_k^T / sqrt(A)`` and ``W_vo = W_v W_o``, two ``[D, D]``
      matrices (``AdaptiveSparseTargetAttention(folded=True)``), folded in
      float64; done only where it saves work (``D < 2A``; the default
      ``A = 2D`` saves 4x).
    * ``item_vectors``: an item's vector ``[id | tags | multimodal]`` depends
      only on the item, so every item's is computed once, here, into one
      frozen ``[num_items, 3E]`` table (``ItemEmbedding(precomputed=True)``):
      a request gathers rows instead of pooling tags and projecting the
      multimodal vectors, and needs no ``tf.unique``.

    The results equal the original model's up to float rounding (the export
    is verified against the original model before it is published).

    Returns ``model`` itself when there is nothing to fold (e.g. DIN).
    """
    import numpy as np

    from qin_tf.layers.attention import AdaptiveSparseTargetAttention
    from qin_tf.layers.embedding import ItemEmbedding
    from qin_tf.layers.qnn import QuadraticNeuralNetwork

    qnns = [layer for layer in model.layers
            if qnn and isinstance(layer, QuadraticNeuralNetwork) and layer.num_row > 1]
    astas = [layer for layer in model.layers
             if attention and isinstance(layer, AdaptiveSparseTargetAttention) and not layer.folded
             and layer.input_dim < 2 * layer.W_q.shape[1]]
    items = [layer for layer in model.layers
             if item_vectors and isinstance(layer, ItemEmbedding) and not layer.precomputed]
    if not qnns and not astas and not items:
        return model
    config = model.get_config()
    qnn_names, asta_names = {layer.name for layer in qnns}, {layer.name for layer in astas}
    item_names = {layer.name for layer in items}
    for layer_config in config["layers"]:
        if layer_config["name"] in qnn_names:
            layer_config["config"]["num_row"] = 1
        if layer_config["name"] in asta_names:
            layer_config["config"]["folded"] = True
        if layer_config["name"] in item_names:
            layer_config["config"]["precomputed"] = True
    folded, dropped = {}, set()
    for layer in qnns:
        for q in layer.quadratic_layers:
            d, r = q.input_dim, q.num_row
            folded[q.kernel.path] = np.asarray(q.kernel).reshape(d, r, d).sum(axis=1)
            folded[q.bias.path] = np.asarray(q.bias).reshape(r, d).sum(axis=0)
    for layer in astas:
        prefix = layer.W_q.path.rsplit("/", 1)[0]
        w_qk, w_vo = layer.folded_weights()
        folded[f"{prefix}/W_qk"], folded[f"{prefix}/W_vo"] = w_qk, w_vo
        dropped.update(w.path for w in (layer.W_q, layer.W_k, layer.W_v, layer.W_o))
    for layer in items:
        prefix = layer.id_embeddings.path.rsplit("/", 1)[0]
        folded[f"{prefix}/precomputed_vectors"] = np.asarray(layer.all_item_vectors())
        dropped.update(w.path for w in layer.weights)
    return _rebuild(model, config, folded, dropped, what="folding for inference",
                    remedy="; export with fold_qnn=False, fold_attention=False, fold_item_vectors=False")


def _rebuild(model, config, values=None, dropped=(), *, what, remedy=""):
    """A new model built from ``config`` holding ``model``'s weights by variable path.

    ``values`` (path -> array) replaces or adds weights, ``dropped`` names
    ``model``'s weights the new model no longer has; any other difference
    between the two sets of variables, or a value of another shape, is an
    :class:`ExportError` naming ``what`` was being done (and ``remedy``).
    The one home of the rebuild-and-assign step of :func:`fold_for_inference`
    and :func:`float32_copy`; build under a dtype policy scope where the
    config's layers need one.
    """
    import keras
    import numpy as np

    values = values or {}
    clone = keras.Model.from_config(config)
    source = {v.path: v for v in model.weights}
    expected = sorted((set(source) - set(dropped)) | {p for p in values if p not in source})
    if expected != sorted(v.path for v in clone.weights):
        raise ExportError(f"{what} changed the model's variables unexpectedly{remedy}.")
    for v in clone.weights:
        value = values[v.path] if v.path in values else np.asarray(source[v.path])
        if tuple(value.shape) != tuple(v.shape):
            raise ExportError(f"{what}: `{v.path}` has shape {tuple(v.shape)}, the new value "
                              f"{tuple(value.shape)}{remedy}.")
        v.assign(np.asarray(value, dtype=v.dtype))
    return clone


def _float32_config(node):
    """``node`` (a Keras config) with every mixed-precision dtype policy replaced by ``float32``."""
    if isinstance(node, dict):
        if node.get("class_name") == "DTypePolicy" and str((node.get("config") or {}).get("name", "")).startswith("mixed_"):
            return {**node, "config": {**node["config"], "name": "float32"}}
        return {k: "float32" if k == "dtype" and isinstance(v, str) and v.startswith("mixed_") else _float32_config(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_float32_config(v) for v in node]
    return node


def float32_copy(model):
    """``model`` computing in float32: ``model`` itself when it already does, else a copy built from its
    config with every layer's dtype policy float32, holding the same (float32) weights.

    A model trained in ``mixed_bfloat16`` or ``mixed_float16`` keeps float32 weights; only its
    arithmetic is 16-bit. Every export serves in float32 (:func:`export_model`): measured on the sample
    (tests/test_export.py), a folded serving graph computing in bfloat16 strayed up to 0.08 in
    probability from the bfloat16 Keras model on rows past the verified warmup rows, because it rounds
    in another order; in float32 the export equals the float32 model's own export bit for bit.
    """
    from qin_tf.model import dtype_policy_scope

    if all(layer.dtype_policy.compute_dtype == "float32" for layer in model.layers):
        return model
    with dtype_policy_scope("float32"):
        clone = _rebuild(model, _float32_config(model.get_config()), what="the float32 copy of the model")
    bad = [layer.name for layer in clone.layers if layer.dtype_policy.compute_dtype != "float32"]
    if bad:
        raise ExportError(f"the float32 copy still computes layers {bad} in 16 bits.")
    return clone


def fold_quadratic_rows(model):
    """``fold_for_inference`` with only the QNN rows summed."""
    return fold_for_inference(model, qnn=True, attention=False, item_vectors=False)


def _check_model(model, spec: FeatureSpec) -> None:
    names = getattr(model, "input_names", None)
    if names is None:
        inputs = model.inputs if isinstance(model.inputs, (list, tuple)) else [model.inputs]
        names = [getattr(t, "name", "").split(":")[0] for t in inputs]
    expected = set(spec.model_feature_names)
    if set(names) != expected:
        raise ExportError(f"the model's inputs {sorted(names)} are not the feature spec's model features "
                          f"{sorted(expected)}; was it trained on another spec?")


def _check_vocabularies(spec: FeatureSpec) -> None:
    """Every raw id of the spec's vocabularies keeps :data:`RAW_ID_RULE`, so the raw signatures can reach it.

    A vocabulary built before the rule (holding raw 0, a negative id, a line
    break) would serve ids the graph now refuses: refused here, in one line
    naming the file and the line.
    """
    for key, v in sorted(spec.vocabularies.items()):
        words = spec.read_vocabulary(key)
        values: list = words
        if v.get("dtype", "string") == "int64":
            values = []
            for i, w in enumerate(words):
                try:
                    values.append(int(w))
                except ValueError:
                    raise ExportError(f"{spec.path(v['path'])}: line {i + 1}: {w!r} is not an int64 raw id "
                                      f"(the vocabulary's dtype).") from None
        bad = first_bad_raw_id(values)
        if bad is not None:
            raise ExportError(f"{spec.path(v['path'])}: line {bad[0] + 1}: {bad[1]}; {RAW_ID_RULE}. The vocabulary "
                              "was built before this rule: rebuild the data (pipelines.build_examples) and retrain.")


def _verify(export_dir: str, model, spec: FeatureSpec, examples: Sequence[bytes]) -> None:
    """Reloads the export and checks both signatures against the (float32) Keras model on ``examples``
    (within float32 rounding: rtol 1e-5, atol 1e-6)."""
    import numpy as np
    import tensorflow as tf

    features = parse_examples(spec, examples)
    want = np.reshape(np.asarray(model({n: tf.constant(v) for n, v in features.items()}, training=False),
                                 dtype=np.float32), [-1])
    loaded = tf.saved_model.load(export_dir, tags=[SERVE_TAG])
    got = loaded.signatures[SERVING_SIGNATURE](**{n: tf.constant(v) for n, v in features.items()})[OUTPUT]
    got_ex = loaded.signatures[EXAMPLES_SIGNATURE](
        **{EXAMPLES_INPUT: tf.constant(list(examples), tf.string)})[OUTPUT]
    rtol, atol = 1e-5, 1e-6
    for sig, out in ((SERVING_SIGNATURE, got), (EXAMPLES_SIGNATURE, got_ex)):
        if out.dtype != tf.float32 or not np.allclose(out.numpy(), want, rtol=rtol, atol=atol):
            raise ExportError(f"the exported `{sig}` disagrees with the Keras model: "
                              f"max |diff| {np.max(np.abs(out.numpy() - want)):.3g}.")
    if spec.vocabularies:  # raw ids in == the dense ids they stand for, bit for bit
        raw, dense = raw_rows(spec, features)
        want = loaded.signatures[SERVING_SIGNATURE](**{n: tf.constant(v) for n, v in dense.items()})[OUTPUT].numpy()
        outs = {RAW_SIGNATURE: loaded.signatures[RAW_SIGNATURE](**{n: tf.constant(v) for n, v in raw.items()}),
                RAW_EXAMPLES_SIGNATURE: loaded.signatures[RAW_EXAMPLES_SIGNATURE](
                    **{EXAMPLES_INPUT: tf.constant(raw_examples(spec, raw), tf.string)})}
        for sig, out in outs.items():
            if not np.array_equal(out[OUTPUT].numpy(), want):
                raise ExportError(f"the exported `{sig}` disagrees with `{SERVING_SIGNATURE}` on the same rows.")


def export_model(model, spec: FeatureSpec, export_base: str, version: int | None = None, *,
                 warmup_examples: Sequence[bytes] | None = None, num_warmup_rows: int = DEFAULT_WARMUP_ROWS,
                 model_name: str = "qin", verify: bool = True, fold_qnn: bool = True,
                 fold_attention: bool = True, fold_item_vectors: bool = True,
                 source_fingerprint: str | None = None, model_dir: str | None = None) -> str:
    """Writes ``model`` as version ``version`` of a TF Serving model in ``export_base``.

    The export computes in float32, whatever the policy ``model`` was trained in
    (:func:`float32_copy`).

    Args:
        model: a Keras model whose inputs are named as ``spec.model_features``
            and whose output is the click probability (``[batch]`` or ``[batch, 1]``).
        spec: the feature spec the model was trained on.
        export_base: the TF Serving model base path; created if missing.
        version: the version number (>= 1); default: one more than the newest
            version there (1 for the first). An existing version is never overwritten.
        warmup_examples: serialized ``tf.train.Example`` rows for the warmup
            requests; default: the first ``num_warmup_rows`` rows of the spec's
            test (or valid, train) split, or, when no split's files are at
            hand, synthetic rows of valid ids (with a warning).
        num_warmup_rows: rows per warmup batch (TF Serving replays up to 1000 records).
        model_name: the ``model_spec.name`` of the warmup requests.
        verify: reload the export before publishing it and check that both
            signatures give the Keras model's scores on the warmup rows.
        fold_qnn: serve QNN layers with their R rows summed into one
            (:func:`fold_for_inference`); same scores, fewer operations.
        fold_attention: serve ASTA with ``W_q W_k^T`` and ``W_v W_o``
            multiplied out (:func:`fold_for_inference`); same scores, 4x fewer
            attention weights and operations.
        fold_item_vectors: serve every item's vector from one precomputed
            ``[num_items, 3E]`` table (:func:`fold_for_inference`).
        source_fingerprint: the :func:`~qin_tf.fingerprint.model_fingerprint` of the training run
            this version serves, written to :data:`FINGERPRINT_PATH`; default:
            that of ``model`` and ``spec`` (``export.refresh_catalog`` passes
            the run it grew the item table of).
        model_dir: the training run's directory, recorded (absolute) in
            :data:`FINGERPRINT_PATH` so that ``qin_tf.train --warm_start_from``
            can start from the version; none: not recorded.

    Returns:
        The path of the new version directory.
    """
    _check_model(model, spec)
    _check_vocabularies(spec)
    final = _new_version_dir(export_base, version, num_warmup_rows)
    warmup_examples = _warmup_examples(spec, warmup_examples, num_warmup_rows)
    version = int(os.path.basename(final))
    scratch = tempfile.mkdtemp(prefix="qin_export_")
    # Local: a hidden directory beside the versions, renamed into place. A URL: a local
    # directory, copied into place (a directory cannot be renamed at once there).
    local = fileio.is_local(export_base)
    tmp = os.path.join(export_base if local else scratch, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
    try:
        model = float32_copy(model)   # a mixed-precision model serves in float32: same weights
        served = fold_for_inference(model, qnn=fold_qnn, attention=fold_attention, item_vectors=fold_item_vectors)
        _save_version(served, spec, tmp, scratch)
        write_warmup(os.path.join(tmp, WARMUP_PATH), warmup_requests(spec, warmup_examples, model_name))
        write_fingerprint(tmp, source_fingerprint or model_fingerprint(model, spec), weights_digest(model),
                          model_dir)
        if verify:
            _verify(tmp, model, spec, warmup_examples)
        publish_version(tmp, final, local)
    except BaseException:
        if local:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logging.debug("Exported version %d to %s", version, final)
    return final


def _new_version_dir(export_base: str, version: int | None, num_warmup_rows: int) -> str:
    """The directory of the version to write (``version``, or one more than the newest); never an existing one."""
    import tensorflow as tf

    if version is not None and (not isinstance(version, int) or version < 1):
        raise ExportError(f"`version` must be an integer >= 1. Received: version={version!r}")
    if num_warmup_rows < 1:
        raise ExportError(f"`num_warmup_rows` must be >= 1. Received: num_warmup_rows={num_warmup_rows}")
    tf.io.gfile.makedirs(export_base)
    existing = list_versions(export_base)
    if version is None:
        version = (existing[-1] + 1) if existing else 1
    final = os.path.join(export_base, str(version))
    if tf.io.gfile.exists(final):
        raise ExportError(f"{final} already exists; versions are immutable, choose another --version.")
    return final


def _warmup_examples(spec: FeatureSpec, examples: Sequence[bytes] | None, num_rows: int) -> list[bytes]:
    """``examples``, or the spec's first rows, or synthetic rows of valid ids when no split is at hand."""
    if examples is None:
        examples = read_examples(spec, num_rows)
        if not examples:
            logging.warning("No TFRecords of the feature spec's splits are reachable from %s; "
                            "the warmup requests use synthetic rows of valid ids.", spec.base_dir or ".")
            examples = _synthetic_examples(spec, num_rows)
    examples = list(examples)
    if not examples:
        raise ExportError("`warmup_examples` is empty.")
    return examples


def _save_version(served, spec: FeatureSpec, tmp: str, scratch: str) -> None:
    """``tf.saved_model.save`` of the serving module of ``served`` with its signatures into ``tmp``."""
    import tensorflow as tf

    spec_file = os.path.join(scratch, SPEC_FILENAME)
    with open(spec_file, "w") as f:
        f.write(spec.to_json())
    module = _serving_module(served, spec, spec_file)
    with quiet_tf_logging():
        signatures = {SERVING_SIGNATURE: module.serve, EXAMPLES_SIGNATURE: module.serve_examples}
        if spec.vocabularies:
            signatures.update({RAW_SIGNATURE: module.serve_raw, RAW_EXAMPLES_SIGNATURE: module.serve_raw_examples})
        tf.saved_model.save(module, tmp, signatures=signatures)


def publish_version(tmp: str, final: str, local: bool) -> None:
    """Moves the written version ``tmp`` to ``final``: a rename, or on a URL a copy with saved_model.pb last."""
    import tensorflow as tf

    try:
        if local:
            os.rename(tmp, final)
        else:
            fileio.copy_tree(tmp, final, last=("saved_model.pb",))
    except (OSError, tf.errors.OpError) as e:
        why = error_line(e) if isinstance(e, tf.errors.OpError) else e
        raise ExportError(f"could not publish {final}: {why} (was it created concurrently?)") from None


def load_keras_model(model_dir: str):
    """Loads ``model_dir/best.keras`` with qin-tf's layers registered."""
    import keras

    import qin_tf.model  # noqa: F401  (registers the qin_tf layers for deserialization)

    path = os.path.join(model_dir, MODEL_FILENAME)
    if not fileio.gfile().exists(path):
        raise ExportError(f"{path}: no trained model here; run `python -m qin_tf.train` first.")
    return keras.saving.load_model(path, compile=False)


def export_from_model_dir(model_dir: str, export_base: str, version: int | None = None, *,
                          data_dir: str | None = None, **kwargs) -> str:
    """Exports the model a training run left in ``model_dir`` (``best.keras``, ``feature_spec.json``).

    Args:
        model_dir: the training run's directory.
        export_base: the TF Serving model base path.
        version: see :func:`export_model`.
        data_dir: the preprocessed data directory (holding ``feature_spec.json``
            and the TFRecords) to take the warmup rows from; default: the
            spec in ``model_dir`` if its split files resolve there.
        **kwargs: passed to :func:`export_model`.
    """
    g = fileio.gfile()
    if not g.isdir(model_dir):
        raise ExportError(f"{model_dir}: no such directory; --model_dir is the directory "
                          "`python -m qin_tf.train --model_dir=...` wrote.")
    if not g.exists(os.path.join(model_dir, SPEC_FILENAME)):
        raise ExportError(f"{model_dir}: no {SPEC_FILENAME} here, so not a training run's directory; "
                          "--model_dir is the directory `python -m qin_tf.train --model_dir=...` wrote.")
    spec = FeatureSpec.load(model_dir)
    model = load_keras_model(model_dir)
    if data_dir is not None and "warmup_examples" not in kwargs:
        data_spec = FeatureSpec.load(data_dir)
        if data_spec.model_features != spec.model_features:
            raise ExportError(f"{data_dir}: its feature spec's model features differ from {model_dir}'s.")
        rows = read_examples(data_spec, kwargs.get("num_warmup_rows", DEFAULT_WARMUP_ROWS))
        if not rows:
            raise ExportError(f"{data_dir}: none of the spec's TFRecord files are there.")
        kwargs["warmup_examples"] = rows
    return export_model(model, spec, export_base, version, model_dir=model_dir, **kwargs)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv):
    del argv
    from absl import flags

    import tensorflow as tf

    FLAGS = flags.FLAGS
    try:
        path = export_from_model_dir(FLAGS.model_dir, FLAGS.export_base, FLAGS.version,
                                     data_dir=FLAGS.data_dir, model_name=FLAGS.model_name)
    except (ExportError, SpecError, OSError) as e:  # bad paths or inputs: one line, no traceback
        exit_error("exporter", str(e))
    except tf.errors.OpError as e:  # the same from a TensorFlow filesystem (gs://: permission, network)
        exit_error("exporter", e)
    print(path)


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model_dir", None, "Training run directory (best.keras, feature_spec.json).",
                        required=True)
    flags.DEFINE_string("export_base", None, "TF Serving model base path; versions go in numbered "
                        "subdirectories.", required=True)
    flags.DEFINE_integer("version", None, "Version number; default: one more than the newest there.",
                         lower_bound=1)
    flags.DEFINE_string("data_dir", None, "Preprocessed data directory to take warmup rows from; "
                        "default: the spec's own split files.")
    flags.DEFINE_string("model_name", "qin", "The model name (model_spec.name) that the warmup requests address.")


if __name__ == "__main__":
    from qin_tf.runtime import run_app

    _define_flags()
    run_app(main, tensorflow=True)
