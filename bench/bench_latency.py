"""Serving latency: the exported ``serving_default`` signature in-process, and over gRPC.

    python bench/bench_latency.py --data_dir=runs/microlens50k/data [--model_dir=runs/microlens50k/model]
    python bench/bench_latency.py --data_dir=runs/sample/data --calls=50 --nogrpc
    python bench/bench_latency.py --data_dir=runs/sample/data --versions=din=runs/din_export/1,ens=runs/ens/1

Exports the model (``--model_dir``'s ``best.keras``, or an untrained QIN with
the released hyperparameters: latency does not depend on the weights'
values) into a temporary export base as production does (QNN rows summed,
ASTA's projections multiplied out, item vectors precomputed: ``folded``)
and, for the fold levers (``--unfolded``), with one fold less at a time
(``qnn_and_asta_folded``, ``qnn_folded``, ``unfolded``), then measures per
call, for each of
``--batch_sizes`` (1, 64, 1024 by default; inputs are the first rows of the
test split):

* in-process: ``tf.saved_model.load(...).signatures["serving_default"]``
  called with the batch's tensors, ``--calls`` times after ``--warmup``
  calls; p50/p90/p99 and mean of each export, the exports alternating call
  by call so that load on the machine hits them alike;
* round trip over gRPC (``--grpc``): ``export.local_server`` started as its
  own process on a free loopback port, ``export.client.ServingClient.predict``
  from this process: request encoding, the network stack, the server's
  checks and decoding, the model, the response; p50/p90/p99. Its peak RSS is
  read when it exits.

With ``--xla``, the same for two ``tf.function``s of the Keras model (the
lever "XLA for the serving function"): the folded sparse-history model as
exported, and the folded dense-history model compiled with
``jit_compile=True`` (``tf.unique`` has no XLA kernel, so XLA needs the dense
path). Each batch's scores are checked to be the same in every export, the
XLA function and over gRPC before timing. Prints one JSON line (see ``bench/common.py``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402

_DATA = flags.DEFINE_string("data_dir", None, "Output of pipelines.preprocess (feature_spec.json).", required=True)
_MODEL = flags.DEFINE_string("model_dir", None, "Training run directory (best.keras); default: an untrained QIN.")
_SIZES = flags.DEFINE_list("batch_sizes", ["1", "64", "1024"], "Rows per call.")
_CALLS = flags.DEFINE_integer("calls", 300, "Timed calls per batch size and export (batch 1024: a third).",
                              lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed calls first.", lower_bound=1)
_GRPC = flags.DEFINE_bool("grpc", True, "Also measure the round trip through export.local_server.")
_UNFOLDED = flags.DEFINE_bool("unfolded", True, "Also measure exports with less folded (the fold levers' before).")
_INTRA = flags.DEFINE_integer("intra_op_threads", 0, "TF intra-op threads (0: TF's default).", lower_bound=0)
_INTER = flags.DEFINE_integer("inter_op_threads", 0, "TF inter-op threads (0: TF's default).", lower_bound=0)
_SPARSE = flags.DEFINE_bool("sparse_history", True, "ModelConfig.sparse_history of the untrained model.")
_VERSIONS = flags.DEFINE_list("versions", None, "Measure these exported versions instead of exporting a model: "
                               "NAME=VERSION_DIR, comma-separated (e.g. members and their ensemble); each is the "
                               "newest version of its base for the gRPC round trip.")
_XLA = flags.DEFINE_bool("xla", False, "Lever: also time, in-process, tf.functions of the Keras model "
                         "(sparse history, as exported) against the dense-history model XLA-compiled "
                         "(jit_compile=True), same weights.")


def _calls_for(batch: int) -> int:
    return max(10, _CALLS.value // 3) if batch >= 1024 else _CALLS.value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_process(signatures: dict, inputs: dict, calls: int, warmup: int) -> dict:
    """Per-call latency of each signature, calls interleaved round-robin."""
    names = list(signatures)
    times = {n: [] for n in names}
    for _ in range(warmup):
        for n in names:
            signatures[n](**inputs)
    for _ in range(calls):
        for n in names:
            t0 = time.perf_counter()
            out = signatures[n](**inputs)["ctr"]
            out.numpy()
            times[n].append(time.perf_counter() - t0)
    return {n: common.percentiles_ms(t) for n, t in times.items()}


def _grpc(export_base: str, batches: dict, want: dict, calls_for, warmup: int) -> dict:
    import numpy as np

    from export.client import ServingClient

    port = _free_port()
    log_path = os.path.join(tempfile.gettempdir(), f"bench_latency_server_{port}.log")
    env = dict(os.environ, PYTHONPATH=common.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "export.local_server", f"--model_base_path={export_base}", f"--port={port}"]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=common.REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    out = {}
    try:
        address = f"127.0.0.1:{port}"
        with ServingClient(address, "qin", deadline_s=30.0) as client:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the local server exited: {open(log_path).read()[-2000:]}")
                try:
                    client.model_status()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            for batch, inputs in batches.items():
                got = client.predict(inputs)
                np.testing.assert_allclose(got, want[batch], rtol=1e-5, atol=1e-6)
                for _ in range(warmup):
                    client.predict(inputs)
                times = []
                for _ in range(calls_for(batch)):
                    t0 = time.perf_counter()
                    client.predict(inputs)
                    times.append(time.perf_counter() - t0)
                out[str(batch)] = common.percentiles_ms(times)
                common.log(f"gRPC batch {batch}: {out[str(batch)]}")
    finally:
        # VmHWM, not wait4's rusage: a child's ru_maxrss includes this process's size at fork.
        out["server_peak_rss_mb"] = common.vm_hwm_mb(proc.pid)
        proc.terminate()
        proc.wait()
    return out


def _xla_lever(model, spec, features, sizes) -> dict:
    """Keras-level tf.functions: the QNN- and ASTA-folded model vs its dense-history form under XLA."""

    import numpy as np
    import tensorflow as tf

    import qin_tf.model as qm
    from export.exporter import fold_for_inference
    from qin_tf.config import ModelConfig

    folded = fold_for_inference(model, item_vectors=False)
    qnn = model.get_layer("qnn").get_config()
    config = ModelConfig(embedding_dim=model.get_layer("item_embedding").embedding_dim,
                         attention_dim=model.get_layer("asta").attention_dim, num_layers=qnn["num_layers"],
                         num_row=1, dropout=qnn["dropout"], batch_norm=qnn["batch_norm"], sparse_history=False,
                         asta_form="folded" if folded.get_layer("asta").folded else "reassociated")
    dense = qm.build_model(spec, config, load_item_table=False)
    dense.set_weights(folded.get_weights())
    fns = {"sparse_graph": tf.function(lambda x: folded(x, training=False)),
           "dense_xla": tf.function(lambda x: dense(x, training=False), jit_compile=True)}
    out = {}
    for n in sizes:
        x = {k: tf.constant(v[:n]) for k, v in features.items()}
        want = fns["sparse_graph"](x).numpy()
        np.testing.assert_allclose(fns["dense_xla"](x).numpy(), want, rtol=1e-3, atol=1e-4)
        sigs = {k: (lambda f: (lambda **kw: {"ctr": f(kw)}))(f) for k, f in fns.items()}
        out[str(n)] = _in_process(sigs, x, _calls_for(n), _WARMUP.value)
        common.log(f"XLA lever batch {n}: {out[str(n)]}")
    return out


def _test_rows(spec, sizes) -> tuple[list[bytes], dict]:
    """The first ``max(sizes)`` rows of the test split (else the spec's first split): serialized, and parsed."""
    from export import exporter

    rows = exporter.read_examples(spec, max(sizes), splits=["test"] if "test" in spec.splits else None)
    if len(rows) < max(sizes):
        raise SystemExit(f"the test split has only {len(rows)} rows; --batch_sizes asks for {max(sizes)}.")
    return rows, exporter.parse_examples(spec, rows)


def _versions(spec, sizes) -> None:
    """--versions: each named version directory's serving_default in-process (calls interleaved), then over
    gRPC through export.local_server serving its base."""
    import tensorflow as tf

    from export import exporter

    dirs = {}
    for item in _VERSIONS.value:
        name, sep, path = item.partition("=")
        if not sep or not name or not os.path.isdir(path):
            raise SystemExit(f"--versions: {item!r} is not NAME=VERSION_DIR of an existing directory.")
        if exporter.latest_version_dir(os.path.dirname(path)) != path.rstrip("/"):
            raise SystemExit(f"--versions: {path} is not the newest version of its base (the gRPC server serves that).")
        dirs[name] = path.rstrip("/")
    _, features = _test_rows(spec, sizes)
    signatures = {k: tf.saved_model.load(p).signatures[exporter.SERVING_SIGNATURE] for k, p in dirs.items()}
    record = {"bench": "latency", "versions": dirs, "max_len": spec.max_len,
              "intra_op_threads": _INTRA.value, "inter_op_threads": _INTER.value}
    batches, want, in_process = {}, {k: {} for k in dirs}, {}
    for n in sizes:
        inputs = {k: tf.constant(v[:n]) for k, v in features.items()}
        batches[n] = {k: v[:n] for k, v in features.items()}
        for k, sig in signatures.items():
            want[k][n] = sig(**inputs)["ctr"].numpy()
        in_process[str(n)] = _in_process(signatures, inputs, _calls_for(n), _WARMUP.value)
        common.log(f"in-process batch {n}: {in_process[str(n)]}")
    record["in_process"] = in_process
    record["in_process_peak_rss_mb"] = common.peak_rss_mb()
    if _GRPC.value:
        record["grpc_round_trip"] = {k: _grpc(os.path.dirname(p), batches, want[k], _calls_for, _WARMUP.value)
                                     for k, p in dirs.items()}
    common.emit(record)


def main(argv):
    del argv
    from qin_tf.runtime import import_tensorflow

    common.configure_threads(_INTRA.value, _INTER.value)
    tf = import_tensorflow()
    import numpy as np

    from export import exporter
    from qin_tf.config import ModelConfig
    from qin_tf.model import build_model
    from qin_tf.spec import FeatureSpec

    spec = FeatureSpec.load(_DATA.value)
    sizes = [int(s) for s in _SIZES.value]
    if _VERSIONS.value:
        return _versions(spec, sizes)
    if _MODEL.value:
        model = exporter.load_keras_model(_MODEL.value)
    else:
        model = build_model(spec, ModelConfig(sparse_history=_SPARSE.value))
    rows, features = _test_rows(spec, sizes)
    record = {"bench": "latency", "model": _MODEL.value or "untrained QIN (released hyperparameters)",
              "max_len": spec.max_len, "intra_op_threads": _INTRA.value, "inter_op_threads": _INTER.value,
              "sparse_history": model.get_layer("item_embedding").output_mode == "indexed"}
    with tempfile.TemporaryDirectory(prefix="bench_latency_") as tmp:
        exports = {"folded": exporter.export_model(model, spec, os.path.join(tmp, "folded"),
                                                   warmup_examples=rows[:8])}
        if _UNFOLDED.value:
            for name, folds in (("qnn_and_asta_folded", dict(fold_item_vectors=False)),
                                ("qnn_folded", dict(fold_attention=False, fold_item_vectors=False)),
                                ("unfolded", dict(fold_qnn=False, fold_attention=False, fold_item_vectors=False))):
                exports[name] = exporter.export_model(model, spec, os.path.join(tmp, name), warmup_examples=rows[:8],
                                                      **folds)
        signatures = {k: tf.saved_model.load(p).signatures[exporter.SERVING_SIGNATURE] for k, p in exports.items()}
        batches, want, in_process = {}, {}, {}
        for n in sizes:
            inputs = {k: tf.constant(v[:n]) for k, v in features.items()}
            outs = {k: s(**inputs)["ctr"].numpy() for k, s in signatures.items()}
            for k, o in outs.items():
                np.testing.assert_allclose(o, outs["folded"], rtol=1e-3, atol=1e-4, err_msg=k)
            batches[n], want[n] = {k: v[:n] for k, v in features.items()}, outs["folded"]
            in_process[str(n)] = _in_process(signatures, inputs, _calls_for(n), _WARMUP.value)
            common.log(f"in-process batch {n}: {in_process[str(n)]}")
        record["in_process"] = in_process
        if _XLA.value:
            record["xla_lever"] = _xla_lever(model, spec, features, sizes)
        record["in_process_peak_rss_mb"] = common.peak_rss_mb()
        if _GRPC.value:
            record["grpc_round_trip"] = _grpc(os.path.dirname(exports["folded"]), batches, want, _calls_for,
                                              _WARMUP.value)
    common.emit(record)


if __name__ == "__main__":
    app.run(main)
