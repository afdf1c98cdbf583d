r"""gRPC client of TF Serving's PredictionService for the exported QIN model.

    python -m export.client --server=127.0.0.1:8500 --model_name=qin \
        --input=data/microlens_sample/test.parquet --output=scores.csv

Speaks to ``tensorflow_model_server`` (production) or ``export.local_server``
(development) through the official ``tensorflow-serving-api`` stubs
(``PredictionServiceStub.Predict``), in batches of ``--batch_size`` rows,
each request with a deadline of ``--deadline_s`` seconds.

* Parquet input (MMCTR layout, the raw logs) goes to ``serving_default``.
  The client learns the model's inputs (names, dtypes, ``max_len``) from the
  server's ``GetModelMetadata`` SignatureDef, or from ``--feature_spec``, and
  prepares each row exactly as preprocessing does
  (:func:`export.readers.sequence_to_dense`: the most recent ``max_len``
  non-zero items, oldest first, left-padded with 0).
* TFRecord input (``*.tfrecord.gz`` as the pipeline writes it, or
  ``*.tfrecord``) goes, record by record unchanged, to ``predict_examples``.
* JSON-lines input (``*.jsonl``, ``*.json``, ``*.ndjson``, or ``-`` for stdin) goes to
  ``serving_default``: one JSON object per line, one key per model input,
  the history **unpadded** (a list of any length, oldest first), padded or
  cut by the spec's sequence rule (:func:`qin_tf.spec.pad_sequence`); other
  keys (a label, a user id) are ignored::

      {"item_id": 1523, "item_seq": [88, 4021, 17], "views_level": 3}

With ``--raw_ids`` JSON lines (or parquet, one column per input) hold ids
as the log had them (strings, or int64s, as the export's vocabularies say)
and go to ``serving_raw``: the export maps them to dense ids (unknown ids to
the OOV id) and pads or cuts the history itself::

      {"item_id": "v1523", "item_seq": ["v88", "v4021"], "views_level": 3}

Raw ids follow the raw-id rule (:data:`qin_tf.spec.RAW_ID_RULE`; 0 and ``""``
only as history padding), checked before anything is sent: for the inputs
with a vocabulary when the export's spec is known (``--saved_model``,
``--feature_spec``), for every input of ``serving_raw`` otherwise.

``--saved_model=DIR`` (an export base or version directory) scores in
process instead of over gRPC, with the same inputs and the same scores. Ids
follow the spec's id rule (:data:`qin_tf.spec.ID_RULE`): a negative id is
refused before anything is sent, with ``INVALID_ARGUMENT`` as the server
would.

Scores are printed one per line, or written to ``--output`` (``.parquet``, or
CSV otherwise) with the columns ``row`` and ``ctr``. ``--output`` follows
``export.score``'s rule (:func:`qin_tf.fileio.check_output_path`), checked
before any request: never an input, never inside the export read, never a
device; an existing regular file is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Sequence

import numpy as np

from export.readers import (STDIN, iter_jsonl_requests, iter_parquet, iter_parquet_requests,
                            iter_raw_parquet_requests, iter_tfrecord_requests, load_saved_model, raw_features)
from export.writers import write_scores
from qin_tf import fileio
from qin_tf.cli import error_line, exit_error
from qin_tf.rows import PreprocessError, fail, one_line
from qin_tf.signatures import (EXAMPLES_INPUT, EXAMPLES_SIGNATURE, JSONL_SUFFIXES, OUTPUT, PARQUET_SUFFIXES,
                               RAW_SIGNATURE, SERVING_SIGNATURE, SPEC_ASSET_PATH, TFRECORD_SUFFIXES)
from qin_tf.spec import ID_RULE, Feature, FeatureSpec, SpecError, first_negative_id

DEFAULT_BATCH_SIZE = 256
DEFAULT_DEADLINE_S = 10.0
#: gRPC message size limit (both directions), bytes.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class ServingError(RuntimeError):
    """A request failed; carries the gRPC status code (``code``) and the server's message."""

    def __init__(self, code, message: str):
        super().__init__(f"{code.name if code is not None else 'ERROR'}: {message}")
        self.code = code
        self.details = message


def _tensor_proto(value: np.ndarray):
    import tensorflow as tf

    return tf.make_tensor_proto(value)


def check_ids(inputs: Mapping[str, np.ndarray]) -> None:
    """The spec's id rule on integer inputs, before anything is sent.

    Raises:
        ServingError: ``INVALID_ARGUMENT`` (the server's answer) naming the input and row.
    """
    import grpc

    for name, value in inputs.items():
        value = np.asarray(value)
        if value.dtype.kind in "iu":
            bad = first_negative_id(value)
            if bad is not None:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"input `{name}`, row {bad[0][0]}: negative id {bad[1]}; {ID_RULE}.")


def signature_features(signature_def) -> tuple[Feature, ...]:
    """A SignatureDef's inputs as :class:`~qin_tf.spec.Feature` s (name, dtype, per-row shape), by name."""
    import tensorflow as tf

    out = []
    for name, info in sorted(signature_def.inputs.items()):
        dims = tuple(d.size for d in info.tensor_shape.dim)[1:]
        if any(d < 0 for d in dims[:-1]):  # a last dimension of any width: a raw history
            raise ServingError(None, f"input `{name}` has an unknown per-row shape {dims}.")
        out.append(Feature(name, "sequence" if dims else "scalar", tf.dtypes.as_dtype(info.dtype).name, dims))
    return tuple(out)


class ServingClient:
    """A PredictionService client bound to one model.

    Example::

        with ServingClient("127.0.0.1:8500", "qin") as client:
            features = client.features()              # from GetModelMetadata
            scores = client.predict({"item_id": ..., "item_seq": ..., ...})

    Thread-safe: one client may be shared by many threads.

    Args:
        server: ``host:port`` of TF Serving's gRPC endpoint.
        model_name: the served model's name.
        deadline_s: deadline of each request, seconds.
        version: a version number to pin; default: what the server serves.
    """

    def __init__(self, server: str, model_name: str = "qin", *, deadline_s: float = DEFAULT_DEADLINE_S,
                 version: int | None = None):
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        if deadline_s <= 0:
            raise ValueError(f"`deadline_s` must be > 0. Received: deadline_s={deadline_s}")
        self.server = server
        self.model_name = model_name
        self.deadline_s = deadline_s
        self.version = version
        self._channel = grpc.insecure_channel(server, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._signature_defs = None

    # ---- plumbing -------------------------------------------------------------

    def _spec(self, model_spec, signature_name: str | None = None) -> None:
        model_spec.name = self.model_name
        if self.version is not None:
            model_spec.version.value = self.version
        if signature_name is not None:
            model_spec.signature_name = signature_name

    def _call(self, method, request):
        import grpc

        try:
            return method(request, timeout=self.deadline_s)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = error_line(e.details() if hasattr(e, "details") else str(e))  # TF Serving's op errors
            if code == grpc.StatusCode.UNAVAILABLE:
                details = f"server {self.server} unavailable: {details}"
            raise ServingError(code, details) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ServingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- RPCs -----------------------------------------------------------------

    def model_status(self):
        """``ModelService.GetModelStatus``: the served versions and their states."""
        from tensorflow_serving.apis import get_model_status_pb2

        req = get_model_status_pb2.GetModelStatusRequest()
        self._spec(req.model_spec)
        return self._call(self._models.GetModelStatus, req)

    def signature_defs(self) -> dict:
        """``GetModelMetadata``: name -> SignatureDef of the served version (cached)."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        if self._signature_defs is None:
            req = get_model_metadata_pb2.GetModelMetadataRequest()
            self._spec(req.model_spec)
            req.metadata_field.append("signature_def")
            resp = self._call(self._predict.GetModelMetadata, req)
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            resp.metadata["signature_def"].Unpack(sig_map)
            self._signature_defs = dict(sig_map.signature_def)
        return self._signature_defs

    def features(self, signature_name: str = SERVING_SIGNATURE) -> tuple[Feature, ...]:
        """The signature's inputs as :class:`~qin_tf.spec.Feature` s (name, dtype, per-row shape)."""
        defs = self.signature_defs()
        if signature_name not in defs:
            raise ServingError(None, f"the served model has no signature `{signature_name}`; it has "
                               f"{sorted(k for k in defs if not k.startswith('__'))}.")
        return signature_features(defs[signature_name])

    def predict(self, inputs: Mapping[str, np.ndarray], signature_name: str = SERVING_SIGNATURE,
                output: str = OUTPUT) -> np.ndarray:
        """One ``Predict`` call; returns the ``output`` tensor as a numpy array.

        Integer inputs are checked against the spec's id rule first (:func:`check_ids`).
        """
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        check_ids(inputs)
        req = predict_pb2.PredictRequest()
        self._spec(req.model_spec, signature_name)
        for name, value in inputs.items():
            req.inputs[name].CopyFrom(_tensor_proto(np.asarray(value)))
        req.output_filter.append(output)
        resp = self._call(self._predict.Predict, req)
        if output not in resp.outputs:
            raise ServingError(None, f"the response has no output `{output}`; it has {sorted(resp.outputs)}.")
        return tf.make_ndarray(resp.outputs[output])

    def predict_examples(self, examples: Sequence[bytes], signature_name: str = EXAMPLES_SIGNATURE) -> np.ndarray:
        """Scores serialized ``tf.train.Example`` s through the ``predict_examples`` signature."""
        return self.predict({EXAMPLES_INPUT: np.asarray(list(examples), dtype=object)}, signature_name)


class InProcessModel:
    """The :class:`ServingClient` interface over a SavedModel loaded in this process (no server).

    Args:
        saved_model: an export base (its newest version) or a version directory.
    """

    def __init__(self, saved_model: str):
        from export.local_server import read_signature_defs

        self._loaded, self.path = load_saved_model(saved_model)
        try:
            self._signature_defs = read_signature_defs(self.path)
        except Exception as e:  # loaded above, so hardly ever; still one line naming the version
            fail(self.path, None, None, f"cannot read the SignatureDefs ({error_line(e)})")
        #: The export's feature spec (which inputs are raw ids); None when the export lacks it.
        self.spec = None
        try:
            self.spec = FeatureSpec.load(os.path.join(self.path, SPEC_ASSET_PATH))
        except (OSError, SpecError, ValueError):
            pass

    def signature_defs(self) -> dict:
        return self._signature_defs

    features = ServingClient.features

    def predict(self, inputs: Mapping[str, np.ndarray], signature_name: str = SERVING_SIGNATURE,
                output: str = OUTPUT) -> np.ndarray:
        import grpc
        import tensorflow as tf

        check_ids(inputs)
        if signature_name not in self._loaded.signatures:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"no signature `{signature_name}`; the model "
                               f"has {sorted(self._loaded.signatures)}.")
        try:
            out = self._loaded.signatures[signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        except (tf.errors.OpError, TypeError, ValueError, UnicodeDecodeError) as e:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, error_line(e)) from None  # undecodable bytes too
        return out[output].numpy()

    predict_examples = ServingClient.predict_examples

    def close(self) -> None:
        pass

    def __enter__(self) -> "InProcessModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------
# Files -> requests
# --------------------------------------------------------------------------


def score_file(client: ServingClient, path: str, *, signature_name: str | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE, feature_spec: FeatureSpec | None = None,
               progress=None) -> np.ndarray:
    """Scores every row of a parquet or TFRecord file through ``client``.

    Args:
        client: a :class:`ServingClient`.
        path: ``*.parquet`` (MMCTR layout), ``*.tfrecord[.gz]``, or JSON
            lines (``*.jsonl``, ``-`` for stdin).
        signature_name: default ``serving_default`` for parquet and JSON
            lines, ``predict_examples`` for TFRecords.
        batch_size: rows per request.
        feature_spec: take the inputs from this spec instead of the server's metadata.
        progress: optional callable ``(rows_done)`` after each request.

    Returns:
        float32 ``[rows]``, in the file's row order.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={batch_size}")
    if path != STDIN and not (os.path.isfile(path) if fileio.is_local(path) else
                              fileio.gfile().exists(path) and not fileio.gfile().isdir(path)):
        fail(path, None, None, "no such file")
    scores, done = [], 0
    raw = signature_name == RAW_SIGNATURE
    spec = feature_spec if feature_spec is not None else getattr(client, "spec", None)
    if raw:  # raw ids where the export has a vocabulary; all inputs when only the signature is known
        features = raw_features(spec) if spec is not None else client.features(signature_name)
        raw_names = frozenset(f.name for f in features if spec is None or spec.vocabulary_key(f.name))
    if path == STDIN or path.endswith(JSONL_SUFFIXES):
        signature_name = signature_name or SERVING_SIGNATURE
        if not raw:
            features = feature_spec.model_features if feature_spec is not None else client.features(signature_name)
        for inputs in iter_jsonl_requests(path, features, batch_size, raw=raw_names if raw else None):
            scores.append(np.asarray(client.predict(inputs, signature_name), dtype=np.float32).reshape(-1))
            done += scores[-1].shape[0]
            if progress:
                progress(done)
    elif path.endswith(PARQUET_SUFFIXES):
        signature_name = signature_name or SERVING_SIGNATURE
        if raw:
            batches = iter_raw_parquet_requests(path, features, batch_size, raw=raw_names)
        elif feature_spec is not None:  # preprocessing's own checks, item ids against the table included
            batches = (b.features for b in iter_parquet([path], feature_spec, batch_size))
        else:
            batches = iter_parquet_requests(path, client.features(signature_name), batch_size)
        for inputs in batches:
            scores.append(np.asarray(client.predict(inputs, signature_name), dtype=np.float32).reshape(-1))
            done += scores[-1].shape[0]
            if progress:
                progress(done)
    elif path.endswith(TFRECORD_SUFFIXES):
        if raw:
            fail(path, None, None, "--raw_ids takes JSON lines or parquet; a TFRecord file holds "
                                   "tf.train.Examples: score it without --raw_ids")
        signature_name = signature_name or EXAMPLES_SIGNATURE
        for examples in iter_tfrecord_requests(path, batch_size):
            scores.append(np.asarray(client.predict_examples(examples, signature_name),
                                     dtype=np.float32).reshape(-1))
            done += scores[-1].shape[0]
            if progress:
                progress(done)
    else:
        fail(path, None, None, f"unknown input type; expected parquet ({', '.join(PARQUET_SUFFIXES)}), "
                               f"TFRecord ({', '.join(TFRECORD_SUFFIXES)}) or JSON lines "
                               f"({', '.join(JSONL_SUFFIXES)}, or - for stdin)")
    return np.concatenate(scores) if scores else np.zeros([0], np.float32)




def main(argv):
    del argv
    from absl import flags

    import tensorflow as tf

    FLAGS = flags.FLAGS
    try:
        if FLAGS.output:  # the rule of export.score, before any work
            fileio.check_output_path(FLAGS.output, [p for p in (FLAGS.input, FLAGS.feature_spec) if p and p != STDIN],
                                     overwrite=FLAGS.overwrite,
                                     read_trees=fileio.export_trees(FLAGS.saved_model) if FLAGS.saved_model else ())
        spec = FeatureSpec.load(FLAGS.feature_spec) if FLAGS.feature_spec else None
        if FLAGS.saved_model:
            client = InProcessModel(FLAGS.saved_model)
        else:
            client = ServingClient(FLAGS.server, FLAGS.model_name, deadline_s=FLAGS.deadline_s)
        with client:
            signature = FLAGS.signature_name or (RAW_SIGNATURE if FLAGS.raw_ids else None)
            scores = score_file(client, FLAGS.input, signature_name=signature,
                                batch_size=FLAGS.batch_size, feature_spec=spec)
    except (ServingError, PreprocessError, SpecError, FileNotFoundError, fileio.OutputPathError) as e:
        exit_error("client", one_line(e))
    except tf.errors.OpError as e:  # a TensorFlow file system's or reader's error (gs://, a corrupt TFRecord)
        exit_error("client", e)
    if FLAGS.output:
        write_scores(FLAGS.output, scores)
        print(f"wrote {scores.shape[0]:,} scores to {FLAGS.output}", file=sys.stderr)
    else:
        sys.stdout.write("".join(f"{s:.9g}\n" for s in scores.tolist()))  # 9 digits: float32 exactly


def _define_flags():
    from absl import flags

    flags.DEFINE_string("server", "127.0.0.1:8500", "The host:port of the gRPC endpoint.")
    flags.DEFINE_string("model_name", "qin", "Served model name.")
    flags.DEFINE_string("signature_name", None, "The signature to call; default: serving_default for parquet "
                        "and JSON lines, predict_examples for TFRecords.")
    flags.DEFINE_string("input", None, "A parquet (MMCTR layout), TFRecord or JSON-lines file, or - for JSON "
                        "lines on stdin.", required=True)
    flags.DEFINE_bool("raw_ids", False, "Whether the JSON lines or parquet rows hold ids as the log had them "
                      "(strings or int64s, mapped by the export's vocabularies), sent to the serving_raw signature.")
    flags.DEFINE_string("saved_model", None, "An export (base or version directory) to score with in process "
                        "instead of asking --server.")
    flags.DEFINE_string("output", None, "Where to write the columns row,ctr (.parquet, else CSV); default: "
                        "print the scores.")
    flags.DEFINE_boolean("overwrite", False, "Replace an existing --output (a regular file; never an input, "
                         "nor inside the export read).")
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Rows per request.", lower_bound=1)
    flags.DEFINE_float("deadline_s", DEFAULT_DEADLINE_S, "Deadline of each request, in seconds.", lower_bound=0.001)
    flags.DEFINE_string("feature_spec", None, "A feature_spec.json (or its directory) to take the inputs "
                        "from instead of the server's GetModelMetadata.")


if __name__ == "__main__":
    from qin_tf.runtime import run_app

    _define_flags()
    run_app(main, tensorflow=True)
