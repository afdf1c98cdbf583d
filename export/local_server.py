"""A local stand-in for TensorFlow Serving's gRPC API, for development and tests.

    python -m export.local_server --model_base_path=runs/sample/export [--port=8500]

**This is not a production server.** Production serving is TensorFlow
Serving (``tensorflow_model_server``, see export/SERVING.md); this module
exists so that the client, the export and the request format can be
developed and tested on machines where the TF Serving binary is not
installed. It speaks the same protocol, from the official
``tensorflow-serving-api`` protos:

* ``tensorflow.serving.PredictionService/Predict`` and ``GetModelMetadata``
  (``metadata_field: "signature_def"``, answered from the SavedModel's own
  ``saved_model.pb``, exactly the SignatureDefs TF Serving reports);
* ``tensorflow.serving.ModelService/GetModelStatus``.

It serves one model, the newest version in ``model_base_path`` that loads
(TF Serving's default version policy, ``latest``), loaded with
``tf.saved_model.load`` (no model code). Like TF Serving
(``--file_system_poll_wait_seconds``, default 1 s) it polls the base path
every ``--poll_interval_s`` seconds (:meth:`LocalServer.poll_once`): when a
higher complete version appears (a numbered directory holding a
``saved_model.pb``; the exporter and ``export.refresh_catalog`` rename a
version into place only once it is whole; on a URL, ``saved_model.pb`` is
copied last), it loads it while the current one goes on serving and then
switches, logging the switch; requests in flight finish on the version they
started on. A version that fails to load (still being copied by hand, or
broken) is logged once and loaded again once its files change. When the
version served is deleted, the newest remaining version takes over the same
way (TF Serving unloads a deleted version: the rollback export/SERVING.md
documents). At start, a newest version that does not load is logged in one
line and the newest older one that loads is served; if none loads, the one
line names the newest version directory and the exit code is 1 (here we
differ from TF Serving, whose ``latest`` policy waits on the newest version
alone). Requests are validated against the
signature before they run; a malformed request gets ``NOT_FOUND`` (unknown
model or version) or ``INVALID_ARGUMENT`` (unknown signature or output,
missing or extra inputs, wrong dtype or shape, a batch larger than
``--max_batch_size``, undecodable tensors or examples) and the server keeps
serving. It binds 127.0.0.1 unless told otherwise, has no TLS and no
authentication, and runs each request on its own (no server-side batching).
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent import futures
from typing import Mapping

from absl import logging

from export.exporter import first_bad_raw_input
from qin_tf.cli import error_line, exit_error
from qin_tf.signatures import (EXAMPLES_INPUT, RAW_EXAMPLES_SIGNATURE, RAW_SIGNATURE, SERVE_TAG, SERVING_SIGNATURE,
                               SPEC_ASSET_PATH)
from qin_tf.spec import ID_RULE, first_negative_id

#: Default largest batch one request may carry.
DEFAULT_MAX_BATCH_SIZE = 4096
#: Seconds between polls of the model base path (TF Serving's --file_system_poll_wait_seconds default).
DEFAULT_POLL_INTERVAL_S = 1.0
#: gRPC message size limit (both directions), bytes.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class RequestError(Exception):
    """A request the server refuses; carries the gRPC status code to answer with."""

    def __init__(self, code, message: str):
        super().__init__(message)
        self.code = code


def read_signature_defs(version_dir: str) -> dict:
    """name -> SignatureDef of the ``serve`` MetaGraph in ``version_dir/saved_model.pb`` (what TF Serving reports)."""
    from tensorflow.core.protobuf import saved_model_pb2

    from qin_tf.fileio import read_bytes

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(read_bytes(os.path.join(version_dir, "saved_model.pb")))
    graphs = [g for g in proto.meta_graphs if SERVE_TAG in g.meta_info_def.tags]
    if not graphs:
        raise ValueError(f"{version_dir}: no MetaGraph tagged `{SERVE_TAG}`.")
    return dict(graphs[0].signature_def)


class ServedModel:
    """One SavedModel version: its signatures (callables) and SignatureDefs (protos).

    Args:
        model_base_path: the TF Serving model base path (numbered versions).
        model_name: the name requests must address.
        max_batch_size: largest batch one request may carry.
    """

    def __init__(self, model_base_path: str, model_name: str = "qin",
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, version_dir: str | None = None):
        import tensorflow as tf

        from export.exporter import latest_version_dir
        from qin_tf.spec import FeatureSpec

        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be >= 1. Received: max_batch_size={max_batch_size}")
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.path = version_dir or latest_version_dir(model_base_path, log=logging.warning)
        self.version = int(os.path.basename(self.path))
        spec_file = os.path.join(self.path, SPEC_ASSET_PATH)
        #: The export's feature spec (None for a SavedModel without one): names a bad example's fault.
        self.spec = FeatureSpec.load(spec_file) if tf.io.gfile.exists(spec_file) else None
        #: name -> SignatureDef, as in the SavedModel (what TF Serving reports).
        self.signature_defs = read_signature_defs(self.path)
        self._loaded = tf.saved_model.load(self.path, tags=[SERVE_TAG])
        #: name -> concrete function, for the servable signatures (not `__saved_model_init_op`).
        self.signatures = {k: self._loaded.signatures[k] for k in self._loaded.signatures}

    # ---- request checks ------------------------------------------------------

    def check_model_spec(self, model_spec) -> None:
        import grpc

        if model_spec.name != self.model_name:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: model `{model_spec.name}` "
                               f"(this server serves `{self.model_name}`).")
        if model_spec.HasField("version") and model_spec.version.value != self.version:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: `{self.model_name}` version "
                               f"{model_spec.version.value} (available: {self.version}).")
        if model_spec.version_label:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: version label `{model_spec.version_label}` "
                               "(this server defines no labels).")

    def _decode_inputs(self, signature_name: str, inputs: Mapping) -> dict:
        """TensorProtos -> numpy arrays, checked against the SignatureDef."""
        import grpc
        import tensorflow as tf

        sig = self.signature_defs[signature_name]
        expected, given = set(sig.inputs), set(inputs)
        if given != expected:
            missing, extra = sorted(expected - given), sorted(given - expected)
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"signature `{signature_name}` takes inputs {sorted(expected)}; "
                               f"missing {missing}, unexpected {extra}.")
        out, batch = {}, None
        for name in sorted(expected):
            info, tensor = sig.inputs[name], inputs[name]
            dims = [d.size for d in tensor.tensor_shape.dim]
            if tensor.tensor_shape.unknown_rank or any(d < 0 for d in dims):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"input `{name}` has an invalid shape {dims}: every dimension must be >= 0.")
            if tensor.dtype != info.dtype:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"input `{name}` must be {tf.dtypes.as_dtype(info.dtype).name}; "
                                   f"received {_dtype_name(tensor.dtype)}.")
            try:
                value = tf.make_ndarray(tensor)
            except Exception as e:  # malformed TensorProto: content size does not match shape, ...
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"input `{name}` is not a decodable tensor: {e}") from None
            want = [d.size for d in info.tensor_shape.dim]
            if value.ndim != len(want) or any(w >= 0 and w != g for w, g in zip(want[1:], value.shape[1:])):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"input `{name}` must have shape {_shape_str(want)}; received {list(value.shape)}.")
            if batch is None:
                batch = value.shape[0]
            elif value.shape[0] != batch:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"inputs disagree on the batch size: `{name}` has {value.shape[0]} rows, "
                                   f"the others {batch}.")
            if signature_name == RAW_SIGNATURE and self.spec is not None:  # the graph's raw-id rule, row named
                bad = first_bad_raw_input(self.spec, name, value)
                if bad is not None:
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input `{name}`, row {bad[0][0]}: {bad[1]}.")
            elif value.dtype.kind in "iu":
                bad = first_negative_id(value)
                if bad is not None:
                    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"input `{name}`, row {bad[0][0]}: negative id {bad[1]}; {ID_RULE}.")
            out[name] = value
        if batch is not None and batch > self.max_batch_size:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"batch of {batch} rows exceeds the server's max_batch_size {self.max_batch_size}.")
        return out

    def _explain(self, signature_name: str, inputs: Mapping, error: Exception) -> str:
        """One line for a request the graph refused: the first bad example and why, when it can tell."""
        import tensorflow as tf

        from export.exporter import raw_example_parse_spec
        from qin_tf.data import example_parse_spec

        examples = inputs.get(EXAMPLES_INPUT)
        if self.spec is not None and examples is not None and examples.ndim == 1:
            raw = signature_name == RAW_EXAMPLES_SIGNATURE
            parse_spec = (raw_example_parse_spec(self.spec) if raw else
                          example_parse_spec(self.spec, labelled=False, with_meta=False))
            for i, record in enumerate(examples.tolist()):
                try:
                    parsed = tf.io.parse_example(tf.constant([record], tf.string), parse_spec)
                except (tf.errors.InvalidArgumentError, UnicodeDecodeError) as e:
                    return (f"{EXAMPLES_INPUT}[{i}] is not a tf.train.Example of this model's features: "
                            f"{error_line(e)}")
                for name in self.spec.model_feature_names:
                    value = parsed[name]
                    value = (value.values if isinstance(value, tf.SparseTensor) else value).numpy()
                    if raw:
                        bad = first_bad_raw_input(self.spec, name, value)
                        if bad is not None:
                            return f"{EXAMPLES_INPUT}[{i}], feature `{name}`: {bad[1]}."
                        continue
                    bad = first_negative_id(value)
                    if bad is not None:
                        return f"{EXAMPLES_INPUT}[{i}], feature `{name}`: negative id {bad[1]}; {ID_RULE}."
        return error_line(error)

    # ---- RPCs ----------------------------------------------------------------

    def predict(self, request):
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        self.check_model_spec(request.model_spec)
        signature_name = request.model_spec.signature_name or SERVING_SIGNATURE
        if signature_name not in self.signatures:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Serving signature key `{signature_name}` not found; this model has "
                               f"{sorted(self.signatures)}.")
        sig = self.signature_defs[signature_name]
        outputs = list(request.output_filter) or sorted(sig.outputs)
        unknown = sorted(set(outputs) - set(sig.outputs))
        if unknown:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"output_filter names {unknown}, not outputs of `{signature_name}` "
                               f"({sorted(sig.outputs)}).")
        inputs = self._decode_inputs(signature_name, request.inputs)
        try:
            result = self.signatures[signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
        except (tf.errors.InvalidArgumentError, UnicodeDecodeError) as e:
            # e.g. an undecodable or incomplete tf.train.Example, or an id the graph refuses
            # (TF raises UnicodeDecodeError when its message quotes undecodable bytes).
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, self._explain(signature_name, inputs, e)) from None
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = self.version
        response.model_spec.signature_name = signature_name
        for key in outputs:
            response.outputs[key].CopyFrom(tf.make_tensor_proto(result[key].numpy()))
        return response

    def get_model_metadata(self, request):
        import grpc
        from tensorflow_serving.apis import get_model_metadata_pb2

        self.check_model_spec(request.model_spec)
        fields = list(request.metadata_field)
        if not fields:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "GetModelMetadataRequest must specify at least one metadata_field.")
        unsupported = sorted(set(fields) - {"signature_def"})
        if unsupported:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"metadata_field {unsupported} is not supported; only `signature_def` is.")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = self.version
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for k, v in self.signature_defs.items():
            sig_map.signature_def[k].CopyFrom(v)
        response.metadata["signature_def"].Pack(sig_map)
        return response

    def get_model_status(self, request):
        from tensorflow_serving.apis import get_model_status_pb2

        self.check_model_spec(request.model_spec)
        response = get_model_status_pb2.GetModelStatusResponse()
        status = response.model_version_status.add()
        status.version = self.version
        status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        status.status.error_code = 0  # OK
        return response




def _dtype_name(enum_value: int) -> str:
    import tensorflow as tf

    try:
        return tf.dtypes.as_dtype(enum_value).name
    except TypeError:
        return f"dtype enum {enum_value}"


def _shape_str(dims) -> str:
    return "[" + ", ".join("batch" if i == 0 else ("?" if d < 0 else str(d)) for i, d in enumerate(dims)) + "]"


def _handler(method):
    """Wraps a ServedModel RPC: RequestError -> its status code, anything else -> INTERNAL."""
    import grpc

    def rpc(self, request, context):
        try:
            return method(self.server.model, request)  # the version served now; a switch waits for no one
        except RequestError as e:
            context.abort(e.code, str(e))
        except Exception as e:  # keep serving; report the failure to this caller only
            logging.exception("request failed")
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {error_line(e)}")

    return rpc


def _servicers(server: "LocalServer"):
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        Predict = _handler(ServedModel.predict)
        GetModelMetadata = _handler(ServedModel.get_model_metadata)

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        GetModelStatus = _handler(ServedModel.get_model_status)

    prediction, status = PredictionService(), ModelService()
    prediction.server = status.server = server
    return prediction, status


class LocalServer:
    """The gRPC server around a :class:`ServedModel`; a context manager.

    Example::

        with LocalServer("runs/sample/export", port=0) as server:
            print(server.address)   # "127.0.0.1:<free port>"

    Args:
        model_base_path: the TF Serving model base path.
        host: interface to bind; loopback by default.
        port: TCP port; 0 picks a free one (see :attr:`port` after start).
        model_name, max_batch_size: see :class:`ServedModel`.
        max_workers: threads answering requests concurrently.
        poll_interval_s: seconds between looks at ``model_base_path`` for a
            version to switch to (:meth:`poll_once`; TF Serving's
            ``--file_system_poll_wait_seconds``); 0 serves the version found at start only.
        log: a callable taking one line (a version switch, a version that
            failed to load); default: absl logging.
    """

    def __init__(self, model_base_path: str, *, host: str = "127.0.0.1", port: int = 8500,
                 model_name: str = "qin", max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_workers: int = 16, poll_interval_s: float = DEFAULT_POLL_INTERVAL_S, log=None):
        if max_workers < 1:
            raise ValueError(f"`max_workers` must be >= 1. Received: max_workers={max_workers}")
        if poll_interval_s < 0:
            raise ValueError(f"`poll_interval_s` must be >= 0. Received: poll_interval_s={poll_interval_s}")
        if max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be >= 1. Received: max_batch_size={max_batch_size}")
        self.model_base_path = model_base_path
        self.max_batch_size = max_batch_size
        self.poll_interval_s = poll_interval_s
        self._log = log or logging.info
        #: version -> the state of its files when it failed to load (retried once they change).
        self._failed: dict[int, object] = {}
        self._gone_reported: int | None = None
        #: The version served now; replaced (one assignment) when the version to serve changes.
        self.model = self._load_at_start(model_name)
        self._stop = threading.Event()
        self._poller = None
        self.host = host
        self.port = port
        self.max_workers = max_workers
        self._server = None
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> "LocalServer":
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        with self._lock:
            if self._server is not None:
                return self
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="local_server"),
                options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                         ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                         ("grpc.so_reuseport", 0)])
            prediction, status = _servicers(self)
            prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction, server)
            model_service_pb2_grpc.add_ModelServiceServicer_to_server(status, server)
            host = f"[{self.host}]" if ":" in self.host else self.host
            port = server.add_insecure_port(f"{host}:{self.port}")
            if port == 0:
                raise OSError(f"could not bind {host}:{self.port}")
            self.port = port
            server.start()
            self._server = server
            if self.poll_interval_s > 0:
                self._stop.clear()
                self._poller = threading.Thread(target=self._poll, name="local_server_poll", daemon=True)
                self._poller.start()
        return self

    # ---- versions ------------------------------------------------------------

    def _files_state(self, version: int):
        """The names, sizes and times of a version's files: a failed load is retried once they change."""
        import tensorflow as tf

        root = os.path.join(self.model_base_path, str(version))
        try:
            state = []
            for directory, _, files in tf.io.gfile.walk(root):
                for name in files:
                    st = tf.io.gfile.stat(os.path.join(directory, name))
                    state.append((os.path.relpath(os.path.join(directory, name), root), st.length, st.mtime_nsec))
            return tuple(sorted(state))
        except Exception:  # e.g. a file removed while we looked: it changed
            return None

    def _try_load(self, version: int, model_name: str):
        """``(ServedModel, None)``, or ``(None, one-line reason)`` when ``version`` does not load."""
        path = os.path.join(self.model_base_path, str(version))
        state = self._files_state(version)
        try:
            model = ServedModel(self.model_base_path, model_name, self.max_batch_size, version_dir=path)
        except Exception as e:  # a version still being copied, or a broken one
            self._failed[version] = state
            return None, f"{type(e).__name__}: {error_line(e)}"
        self._failed.pop(version, None)
        return model, None

    def _load_at_start(self, model_name: str) -> "ServedModel":
        """The newest version that loads; a newer one that does not is reported (one line each).

        Raises :class:`~export.exporter.ExportError` naming the newest version
        directory when no version loads.
        """
        from export.exporter import ExportError, latest_version_dir, servable_versions

        latest_version_dir(self.model_base_path, log=logging.warning)  # no directory, no version: one line
        broken = []
        for version in reversed(servable_versions(self.model_base_path)):
            model, reason = self._try_load(version, model_name)
            if model is None:
                broken.append((os.path.join(self.model_base_path, str(version)), reason))
                continue
            for path, why in broken:
                logging.warning("%s: could not load this version (%s); serving version %d instead.",
                                path, why, version)
            return model
        path, why = broken[0]
        raise ExportError(f"{path}: could not load this version ({why}); "
                          + ("no older version loads either." if len(broken) > 1 else "no other version to serve."))

    def poll_once(self) -> bool:
        """Serves the newest version that loads, as TF Serving's file system poll does; True if it switched.

        A higher version is loaded while the current one goes on serving, then
        takes over (one assignment). When the version served was deleted, the
        newest remaining version takes over the same way (TF Serving unloads a
        deleted version: the documented rollback); with none left that loads,
        the deleted version goes on serving from memory, reported once. A
        version that failed to load (still being copied, or broken) is
        reported once and tried again when its files change.
        """
        from export.exporter import servable_versions

        current = self.model.version
        versions = servable_versions(self.model_base_path)
        present = current in versions
        for version in reversed(versions):
            if version == current or (present and version < current):
                return False
            if version in self._failed and self._failed[version] == self._files_state(version):
                continue  # failed before and unchanged since
            reported = version in self._failed
            model, reason = self._try_load(version, self.model.model_name)
            if model is None:
                if not reported:
                    self._log(f"{os.path.join(self.model_base_path, str(version))}: could not load this version "
                              f"({reason}); will retry when its files change; still serving version {current}.")
                continue
            self.model = model
            why = "" if present else f"; version {current} was deleted"
            self._log(f"Serving `{model.model_name}` version {version} (was version {current}{why}) from {model.path}.")
            return True
        if not present and self._gone_reported != current:
            self._gone_reported = current
            self._log(f"{os.path.join(self.model_base_path, str(current))}: this version was deleted and no other "
                      f"version loads; still serving version {current} from memory.")
        return False

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll_once()
            except Exception:  # e.g. the base path briefly unreadable: try again next time
                logging.exception("polling %s failed", self.model_base_path)

    def stop(self, grace: float | None = 1.0) -> None:
        self._stop.set()
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join()
            self._poller = None
        with self._lock:
            if self._server is not None:
                self._server.stop(grace).wait()
                self._server = None

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv):
    del argv
    import tensorflow as tf
    from absl import flags

    from export.exporter import ExportError
    from qin_tf.spec import SpecError

    FLAGS = flags.FLAGS
    try:
        server = LocalServer(FLAGS.model_base_path, host=FLAGS.host, port=FLAGS.port,
                             model_name=FLAGS.model_name, max_batch_size=FLAGS.max_batch_size,
                             max_workers=FLAGS.max_workers, poll_interval_s=FLAGS.poll_interval_s,
                             log=lambda line: print(line, flush=True)).start()
    except (ExportError, SpecError, OSError) as e:  # a wrong path, a port in use: one line, no traceback
        exit_error("local_server", str(e))
    except tf.errors.OpError as e:  # the same from a TensorFlow filesystem (gs://: permission, network)
        exit_error("local_server", e)
    # The one ready line (stdout): scripts wait for it.
    # SIGTERM (docker stop, kill) and SIGINT (Ctrl-C) stop it gracefully.
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(target=server.stop).start())
    print(f"Serving `{server.model.model_name}` version {server.model.version} on {server.address} "
          "(development server; production serving is TF Serving). Ctrl-C stops it.", flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model_base_path", None, "TF Serving model base path (numbered versions); "
                        "the newest version is served.", required=True)
    flags.DEFINE_string("host", "127.0.0.1", "Interface to bind. Loopback by default: this "
                        "development server has no TLS and no authentication.")
    flags.DEFINE_integer("port", 8500, "The gRPC port (TF Serving's default); 0 picks a free one.", lower_bound=0)
    flags.DEFINE_string("model_name", "qin", "Model name requests must address.")
    flags.DEFINE_integer("max_batch_size", DEFAULT_MAX_BATCH_SIZE, "Largest batch one request may carry.",
                         lower_bound=1)
    flags.DEFINE_integer("max_workers", 16, "Threads answering requests.", lower_bound=1)
    flags.DEFINE_float("poll_interval_s", DEFAULT_POLL_INTERVAL_S, "Seconds between looks for a higher version "
                       "in --model_base_path (TF Serving's --file_system_poll_wait_seconds); 0: never.",
                       lower_bound=0.0)


if __name__ == "__main__":
    from qin_tf.runtime import run_app

    _define_flags()
    run_app(main, tensorflow=True)
