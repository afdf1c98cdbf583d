"""Serving over gRPC: the client against every server available here.

The local development server (export.local_server) is always there; when a
``tensorflow_model_server`` binary is on PATH the same tests run against it
too (started on a free loopback port with export/models.config and
export/batching_parameters.txt). Every address is a loopback address.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from export import exporter
from export.client import ServingClient, ServingError, score_file
from export.local_server import LocalServer
from tests.test_export import (REPO, SAMPLE_DIR, TINY_TRANSFORMER_DCN, assert_scores_equal, keras_scores,
                               make_model_dir, split_rows)

TF_SERVING = shutil.which("tensorflow_model_server")
SERVERS = ["local"] + (["tf_serving"] if TF_SERVING else [])
#: The largest request; the same as max_batch_size in export/batching_parameters.txt.
MAX_BATCH = 1024
CODE = grpc.StatusCode


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_available(address: str, proc: subprocess.Popen, log_path: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    with ServingClient(address, "qin", deadline_s=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
            try:
                status = client.model_status()
                if status.model_version_status and status.model_version_status[0].state == 30:  # AVAILABLE
                    return
            except ServingError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"the server did not serve within {timeout_s} s:\n{open(log_path).read()[-3000:]}")


def _start_tf_serving(base: str, tmp) -> tuple[str, subprocess.Popen]:
    """tensorflow_model_server with the repo's example configuration, on a free port."""
    with open(os.path.join(REPO, "export", "models.config")) as f:
        config = f.read().replace('base_path: "/models/qin"', f'base_path: "{base}"')
    (tmp / "models.config").write_text(config)
    port = _free_port()
    log_path = str(tmp / "tf_serving.log")
    proc = subprocess.Popen([TF_SERVING, f"--port={port}", "--rest_api_port=0",
                             f"--model_config_file={tmp / 'models.config'}", "--enable_batching",
                             f"--batching_parameters_file={os.path.join(REPO, 'export', 'batching_parameters.txt')}"],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        _wait_available(address, proc, log_path)
    except BaseException:
        proc.kill()
        raise
    return address, proc


@pytest.fixture(scope="module")
def served(sample_spec, tmp_path_factory):
    """(export base, Keras model, test rows, expected scores)."""
    tmp = tmp_path_factory.mktemp("serving")
    model = make_model_dir(sample_spec, str(tmp / "model"), seed=3)
    base = str(tmp / "export")
    exporter.export_from_model_dir(str(tmp / "model"), base, data_dir=sample_spec.base_dir)
    features, labels, serialized = split_rows(sample_spec, "test")
    return base, model, (features, labels, serialized), keras_scores(model, features)


@pytest.fixture(scope="module", params=SERVERS)
def server(request, served, tmp_path_factory):
    """(kind, address) of a running server of the export."""
    if request.param == "local":
        with LocalServer(served[0], port=0, max_batch_size=MAX_BATCH) as local:
            yield "local", local.address
        return
    address, proc = _start_tf_serving(served[0], tmp_path_factory.mktemp("tf_serving"))
    try:
        yield "tf_serving", address
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --------------------------------------------------------------------------
# Scores through the client equal in-process predictions
# --------------------------------------------------------------------------


def test_client_scores_parquet_like_in_process(server, served):
    """Raw MMCTR parquet -> (client-side preprocessing) -> serving_default == Keras on the TFRecords."""
    with ServingClient(server[1], "qin") as client:
        got = score_file(client, os.path.join(SAMPLE_DIR, "test.parquet"), batch_size=128)
    assert got.shape == (600,)
    assert_scores_equal(got, served[3])


def test_client_scores_tfrecords_through_predict_examples(server, served, sample_spec):
    want, got = served[3], []
    with ServingClient(server[1], "qin") as client:
        for path in sample_spec.split_files("test"):
            got.append(score_file(client, path, batch_size=100))
    assert_scores_equal(np.concatenate(got), want)


def test_client_with_feature_spec_instead_of_metadata(server, served, sample_spec):
    with ServingClient(server[1], "qin") as client:
        got = score_file(client, os.path.join(SAMPLE_DIR, "test.parquet"), batch_size=250,
                         feature_spec=sample_spec)
    assert_scores_equal(got, served[3])


def test_status_and_metadata(server, sample_spec):
    with ServingClient(server[1], "qin") as client:
        (status,) = client.model_status().model_version_status
        assert (status.version, status.state, status.status.error_code) == (1, 30, 0)  # AVAILABLE, OK
        defs = client.signature_defs()
        assert {"serving_default", "predict_examples"} <= set(defs)
        assert defs["serving_default"].method_name == "tensorflow/serving/predict"
        features = client.features()
        assert {f.name: f.shape for f in features} == {f.name: f.shape for f in sample_spec.model_features}
        assert all(f.dtype == "int64" for f in features)
        assert [(f.name, f.dtype, f.shape) for f in client.features("predict_examples")] == [
            ("examples", "string", ())]


# --------------------------------------------------------------------------
# Malformed requests: an error code, and the server keeps serving
# --------------------------------------------------------------------------


def _rows(features, n, start=0):
    return {k: np.ascontiguousarray(v[start:start + n]) for k, v in features.items()}


def _malformed(case: str, spec, features, serialized):
    """(model_name, version, signature, inputs, output) of a malformed request."""
    ok = _rows(features, 3)
    seq, target = spec.sequence, spec.target_item
    if case == "unknown_model":
        return "no_such_model", None, "serving_default", ok, "ctr"
    if case == "unknown_version":
        return "qin", 99, "serving_default", ok, "ctr"
    if case == "unknown_signature":
        return "qin", None, "no_such_signature", ok, "ctr"
    if case == "unknown_output":
        return "qin", None, "serving_default", ok, "no_such_output"
    if case == "missing_input":
        return "qin", None, "serving_default", {k: v for k, v in ok.items() if k != seq}, "ctr"
    if case == "extra_input":
        return "qin", None, "serving_default", dict(ok, user_id=np.arange(3, dtype=np.int64)), "ctr"
    if case == "wrong_dtype":
        return "qin", None, "serving_default", dict(ok, **{target: ok[target].astype(np.int32)}), "ctr"
    if case == "wrong_shape":
        return "qin", None, "serving_default", dict(ok, **{seq: ok[seq][:, 1:]}), "ctr"
    if case == "wrong_rank":
        return "qin", None, "serving_default", dict(ok, **{target: ok[target][:, None]}), "ctr"
    if case == "batch_mismatch":
        return "qin", None, "serving_default", dict(ok, **{target: ok[target][:2]}), "ctr"
    if case == "too_large_batch":
        big = {k: np.resize(v, (MAX_BATCH + 1, *v.shape[1:])) for k, v in features.items()}
        return "qin", None, "serving_default", big, "ctr"
    if case == "garbage_examples":
        return "qin", None, "predict_examples", {"examples": np.array([b"not an Example"], dtype=object)}, "ctr"
    if case == "incomplete_example":
        example = tf.train.Example.FromString(serialized[0])
        del example.features.feature[seq]
        return ("qin", None, "predict_examples",
                {"examples": np.array([serialized[1], example.SerializeToString()], dtype=object)}, "ctr")
    raise ValueError(case)


MALFORMED = {  # case -> the local server's code
    "unknown_model": CODE.NOT_FOUND, "unknown_version": CODE.NOT_FOUND,
    "unknown_signature": CODE.INVALID_ARGUMENT, "unknown_output": CODE.INVALID_ARGUMENT,
    "missing_input": CODE.INVALID_ARGUMENT, "extra_input": CODE.INVALID_ARGUMENT,
    "wrong_dtype": CODE.INVALID_ARGUMENT, "wrong_shape": CODE.INVALID_ARGUMENT,
    "wrong_rank": CODE.INVALID_ARGUMENT, "batch_mismatch": CODE.INVALID_ARGUMENT,
    "too_large_batch": CODE.INVALID_ARGUMENT, "garbage_examples": CODE.INVALID_ARGUMENT,
    "incomplete_example": CODE.INVALID_ARGUMENT,
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_is_refused_and_serving_goes_on(case, server, served, sample_spec):
    features, _, serialized = served[2]
    name, version, signature, inputs, output = _malformed(case, sample_spec, features, serialized)
    with ServingClient(server[1], name, version=version) as bad:
        with pytest.raises(ServingError) as err:
            bad.predict(inputs, signature, output=output)
    if server[0] == "local":
        assert err.value.code == MALFORMED[case], err.value
    else:  # TF Serving words some of these as FAILED_PRECONDITION
        assert err.value.code in (MALFORMED[case], CODE.FAILED_PRECONDITION), err.value
    assert err.value.details
    with ServingClient(server[1], "qin") as client:
        assert_scores_equal(client.predict(_rows(features, 5, 10)), served[3][10:15])


class _UnansweringPredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Holds every Predict until the client gives up (at most 30 s): slower than any deadline."""

    def Predict(self, request, context):
        give_up = time.monotonic() + 30.0
        while context.is_active() and time.monotonic() < give_up:
            time.sleep(0.005)
        return predict_pb2.PredictResponse()


def test_deadline_is_applied(server, served):
    """The client's deadline ends a request the server is too slow for; the client goes on working.

    The slow side is a stand-in that never answers: gRPC keeps deadlines to
    the millisecond, so a tiny deadline against a fast server is a race.
    """
    features = served[2][0]
    slow = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_UnansweringPredictionService(), slow)
    port = slow.add_insecure_port("127.0.0.1:0")
    slow.start()
    try:
        with ServingClient(f"127.0.0.1:{port}", "qin", deadline_s=0.05) as hasty:
            with pytest.raises(ServingError) as err:
                hasty.predict(_rows(features, 600))
    finally:
        slow.stop(grace=None)
    assert err.value.code == CODE.DEADLINE_EXCEEDED
    with ServingClient(server[1], "qin") as client:
        assert_scores_equal(client.predict(_rows(features, 4)), served[3][:4])


def test_unreachable_server_is_a_clear_error():
    with ServingClient(f"127.0.0.1:{_free_port()}", "qin", deadline_s=2.0) as client:
        with pytest.raises(ServingError, match="unavailable") as err:
            client.model_status()
    assert err.value.code == CODE.UNAVAILABLE


# --------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------


def test_concurrent_clients_all_answered_correctly(server, served):
    """8 clients x 200 requests at once, random batches of 1..8 rows, both signatures."""
    features, _, serialized = served[2]
    want = served[3]
    results, errors = [], []

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            with ServingClient(server[1], "qin", deadline_s=60.0) as client:
                for i in range(200):
                    n = int(rng.integers(1, 9))
                    start = int(rng.integers(0, 600 - n))
                    if i % 2:
                        got = client.predict_examples(serialized[start:start + n])
                    else:
                        got = client.predict(_rows(features, n, start))
                    results.append(bool(np.allclose(got, want[start:start + n], rtol=1e-5, atol=1e-6)))
        except Exception as e:  # reported below, with the thread's seed
            errors.append((seed, repr(e)))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    assert len(results) == 1600 and all(results)


# --------------------------------------------------------------------------
# The command lines
# --------------------------------------------------------------------------


def test_client_cli_writes_scores(server, served, tmp_path):
    out = tmp_path / "scores.csv"
    proc = subprocess.run([sys.executable, "-m", "export.client", f"--server={server[1]}", "--model_name=qin",
                           f"--input={os.path.join(SAMPLE_DIR, 'test.parquet')}", f"--output={out}",
                           "--batch_size=200", "--deadline_s=30"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert lines[0] == "row,ctr"
    rows = np.array([line.split(",") for line in lines[1:]], dtype=np.float64)
    np.testing.assert_array_equal(rows[:, 0], np.arange(600))
    assert_scores_equal(rows[:, 1], served[3])


def test_client_cli_reports_a_bad_request(server, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "export.client", f"--server={server[1]}",
                           "--model_name=no_such_model", f"--input={os.path.join(SAMPLE_DIR, 'test.parquet')}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "NOT_FOUND" in proc.stderr and proc.stdout == ""


def test_local_server_cli(served):
    """`python -m export.local_server`: binds loopback, serves the newest version, stops on SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-m", "export.local_server", f"--model_base_path={served[0]}",
                             "--port=0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "development server" in line, line + proc.stderr.read()[-3000:] if proc.poll() else line
        address = line.split(" on ")[1].split(" ")[0]
        assert address.startswith("127.0.0.1:")
        with ServingClient(address, "qin") as client:
            (status,) = client.model_status().model_version_status
            assert status.version == 1
            assert_scores_equal(client.predict(_rows(served[2][0], 3)), served[3][:3])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_local_server_serves_the_newest_version(served, sample_spec, tmp_path):
    base = str(tmp_path / "base")
    for version in (2, 5):
        exporter.export_model(served[1], sample_spec, base, version=version)
    with LocalServer(base, port=0) as local:
        with ServingClient(local.address, "qin") as client:
            assert [s.version for s in client.model_status().model_version_status] == [5]
        with ServingClient(local.address, "qin", version=2) as pinned:
            with pytest.raises(ServingError) as err:
                pinned.model_status()
            assert err.value.code == CODE.NOT_FOUND


def test_local_server_serves_the_transformer_dcn(sample_spec, served, tmp_path):
    """The challenge winner's model (keras-rs FeatureCross inside) is served like QIN."""
    model = make_model_dir(sample_spec, str(tmp_path / "model"), TINY_TRANSFORMER_DCN, seed=5)
    base = str(tmp_path / "export")
    exporter.export_from_model_dir(str(tmp_path / "model"), base, data_dir=sample_spec.base_dir)
    features = served[2][0]
    with LocalServer(base, port=0) as local:
        with ServingClient(local.address, "qin") as client:
            got = client.predict(_rows(features, 50))
    assert_scores_equal(got, keras_scores(model, _rows(features, 50)))
