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
  (:func:`qin_tf.score.sequence_to_dense`: the most recent ``max_len``
  non-zero items, oldest first, left-padded with 0).
* TFRecord input (``*.tfrecord.gz`` as the pipeline writes it, or
  ``*.tfrecord``) goes, record by record unchanged, to ``predict_examples``.

Scores are printed one per line, or written to ``--output`` (``.parquet``, or
CSV otherwise) with the columns ``row`` and ``ctr``.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator, Mapping, Sequence

import numpy as np

from qin_tf.spec import Feature, FeatureSpec

DEFAULT_BATCH_SIZE = 256
DEFAULT_DEADLINE_S = 10.0
#: gRPC message size limit (both directions), bytes.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
SERVING_SIGNATURE = "serving_default"
EXAMPLES_SIGNATURE = "predict_examples"
EXAMPLES_INPUT = "examples"
OUTPUT = "ctr"


class ServingError(RuntimeError):
    """A request failed; carries the gRPC status code (``code``) and the server's message."""

    def __init__(self, code, message: str):
        super().__init__(f"{code.name if code is not None else 'ERROR'}: {message}")
        self.code = code
        self.details = message


def _tensor_proto(value: np.ndarray):
    import tensorflow as tf

    return tf.make_tensor_proto(value)


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
            details = e.details() if hasattr(e, "details") else str(e)
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
        import tensorflow as tf

        defs = self.signature_defs()
        if signature_name not in defs:
            raise ServingError(None, f"the served model has no signature `{signature_name}`; it has "
                               f"{sorted(k for k in defs if not k.startswith('__'))}.")
        out = []
        for name, info in sorted(defs[signature_name].inputs.items()):
            dims = tuple(d.size for d in info.tensor_shape.dim)[1:]
            if any(d < 0 for d in dims):
                raise ServingError(None, f"input `{name}` has an unknown per-row shape {dims}.")
            out.append(Feature(name, "sequence" if dims else "scalar", tf.dtypes.as_dtype(info.dtype).name, dims))
        return tuple(out)

    def predict(self, inputs: Mapping[str, np.ndarray], signature_name: str = SERVING_SIGNATURE,
                output: str = OUTPUT) -> np.ndarray:
        """One ``Predict`` call; returns the ``output`` tensor as a numpy array."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

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


# --------------------------------------------------------------------------
# Files -> requests
# --------------------------------------------------------------------------


def iter_parquet_requests(path: str, features: Sequence[Feature], batch_size: int) -> Iterator[dict]:
    """Batches of model inputs from a parquet file in the MMCTR layout."""
    import pyarrow.parquet as pq

    from pipelines.validation import fail
    from qin_tf.score import arrow_batch_features

    pf = pq.ParquetFile(path)
    have = pf.schema_arrow.names
    for f in features:
        if f.name not in have:
            fail(path, None, f.name, f"missing column; the file has columns {have}")
    row = 0
    for rb in pf.iter_batches(batch_size=batch_size, columns=[f.name for f in features]):
        yield arrow_batch_features(rb, features, source=path, first_row=row)
        row += rb.num_rows


def iter_tfrecord_requests(path: str, batch_size: int) -> Iterator[list[bytes]]:
    """Batches of serialized records from a TFRecord file (GZIP when it ends in ``.gz``)."""
    import tensorflow as tf

    ds = tf.data.TFRecordDataset(path, compression_type="GZIP" if path.endswith(".gz") else "")
    for batch in ds.batch(batch_size):
        yield list(batch.numpy())


def score_file(client: ServingClient, path: str, *, signature_name: str | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE, feature_spec: FeatureSpec | None = None,
               progress=None) -> np.ndarray:
    """Scores every row of a parquet or TFRecord file through ``client``.

    Args:
        client: a :class:`ServingClient`.
        path: ``*.parquet`` (MMCTR layout) or ``*.tfrecord[.gz]``.
        signature_name: default ``serving_default`` for parquet,
            ``predict_examples`` for TFRecords.
        batch_size: rows per request.
        feature_spec: take the inputs from this spec instead of the server's metadata.
        progress: optional callable ``(rows_done)`` after each request.

    Returns:
        float32 ``[rows]``, in the file's row order.
    """
    from pipelines.validation import fail
    from qin_tf.score import PARQUET_SUFFIXES, TFRECORD_SUFFIXES, iter_parquet

    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={batch_size}")
    if not os.path.isfile(path):
        fail(path, None, None, "no such file")
    scores, done = [], 0
    if path.endswith(PARQUET_SUFFIXES):
        signature_name = signature_name or SERVING_SIGNATURE
        if feature_spec is not None:  # preprocessing's own checks, item ids against the table included
            batches = (b.features for b in iter_parquet([path], feature_spec, batch_size))
        else:
            batches = iter_parquet_requests(path, client.features(signature_name), batch_size)
        for inputs in batches:
            scores.append(np.asarray(client.predict(inputs, signature_name), dtype=np.float32).reshape(-1))
            done += scores[-1].shape[0]
            if progress:
                progress(done)
    elif path.endswith(TFRECORD_SUFFIXES):
        signature_name = signature_name or EXAMPLES_SIGNATURE
        for examples in iter_tfrecord_requests(path, batch_size):
            scores.append(np.asarray(client.predict_examples(examples, signature_name),
                                     dtype=np.float32).reshape(-1))
            done += scores[-1].shape[0]
            if progress:
                progress(done)
    else:
        fail(path, None, None, f"unknown input type; expected parquet ({', '.join(PARQUET_SUFFIXES)}) "
                               f"or TFRecord ({', '.join(TFRECORD_SUFFIXES)})")
    return np.concatenate(scores) if scores else np.zeros([0], np.float32)


def write_scores(path: str, scores: np.ndarray) -> None:
    """Writes ``row,ctr`` to ``path`` (parquet when it ends in ``.parquet``, else CSV), atomically."""
    from qin_tf.score import ScoreWriter

    writer = ScoreWriter(path, "parquet" if path.endswith(".parquet") else "csv")
    try:
        writer.write({"row": np.arange(scores.shape[0], dtype=np.int64), OUTPUT: scores})
        writer.close()
    except BaseException:
        writer.abort()
        raise


def main(argv):
    del argv
    from absl import flags

    from qin_tf.score import InputError

    FLAGS = flags.FLAGS
    spec = FeatureSpec.load(FLAGS.feature_spec) if FLAGS.feature_spec else None
    try:
        with ServingClient(FLAGS.server, FLAGS.model_name, deadline_s=FLAGS.deadline_s) as client:
            scores = score_file(client, FLAGS.input, signature_name=FLAGS.signature_name,
                                batch_size=FLAGS.batch_size, feature_spec=spec)
    except (ServingError, InputError) as e:
        sys.exit(f"error: {e}")
    if FLAGS.output:
        write_scores(FLAGS.output, scores)
        print(f"wrote {scores.shape[0]:,} scores to {FLAGS.output}", file=sys.stderr)
    else:
        sys.stdout.write("".join(f"{s:.8g}\n" for s in scores.tolist()))


def _define_flags():
    from absl import flags

    flags.DEFINE_string("server", "127.0.0.1:8500", "The host:port of the gRPC endpoint.")
    flags.DEFINE_string("model_name", "qin", "Served model name.")
    flags.DEFINE_string("signature_name", None, "The signature to call; default: serving_default for parquet, "
                        "predict_examples for TFRecords.")
    flags.DEFINE_string("input", None, "Parquet (MMCTR layout) or TFRecord file.", required=True)
    flags.DEFINE_string("output", None, "Where to write the columns row,ctr (.parquet, else CSV); default: print the scores.")
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Rows per request.", lower_bound=1)
    flags.DEFINE_float("deadline_s", DEFAULT_DEADLINE_S, "Deadline of each request, in seconds.", lower_bound=0.001)
    flags.DEFINE_string("feature_spec", None, "A feature_spec.json (or its directory) to take the inputs "
                        "from instead of the server's GetModelMetadata.")


if __name__ == "__main__":
    from qin_tf.runtime import run_app

    _define_flags()
    run_app(main, tensorflow=True)
