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
from tests.cli_in_process import run_main
from tests.test_export import (REPO, SAMPLE_DIR, TINY_TRANSFORMER_DCN, assert_scores_equal, keras_scores,
                               make_model_dir, make_raw_spec, split_rows)

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


def _raw_request(signature: str, tensors: dict) -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "qin"
    req.model_spec.signature_name = signature
    for name, proto in tensors.items():
        req.inputs[name].CopyFrom(proto)
    return req


def _server_side_malformed(case: str, spec, features, serialized) -> predict_pb2.PredictRequest:
    """Requests the client would refuse to send (or cannot build): sent through a bare stub."""
    protos = {k: tf.make_tensor_proto(v) for k, v in _rows(features, 3).items()}
    if case == "undecodable_examples":
        return _raw_request("predict_examples", {"examples": tf.make_tensor_proto([b"\xff\xff\xff"], tf.string)})
    if case == "negative_dimension":
        protos[spec.target_item].tensor_shape.dim[0].size = -1
        return _raw_request("serving_default", protos)
    if case == "negative_id":
        seq = _rows(features, 3)[spec.sequence].copy()  # never the fixture's rows
        seq[2, -1] = -5
        protos[spec.sequence] = tf.make_tensor_proto(seq)
        return _raw_request("serving_default", protos)
    if case == "negative_id_example":
        example = tf.train.Example.FromString(serialized[4])
        example.features.feature[spec.target_item].int64_list.value[:] = [-1]
        return _raw_request("predict_examples", {"examples": tf.make_tensor_proto(
            [serialized[3], example.SerializeToString()], tf.string)})
    raise ValueError(case)


@pytest.mark.parametrize("case,words", [
    ("undecodable_examples", "examples[0] is not a tf.train.Example"),
    ("negative_dimension", "every dimension must be >= 0"),
    ("negative_id", "input `item_seq`, row 2: negative id -5; ids must be >= 0"),
    ("negative_id_example", "examples[1], feature `item_id`: negative id -1; ids must be >= 0"),
])
def test_server_refuses_bad_tensors_as_invalid_argument(case, words, server, served, sample_spec, monkeypatch):
    """Undecodable examples, a -1 dimension, negative ids: INVALID_ARGUMENT in one line, no traceback logged."""
    from export import local_server

    logged = []
    monkeypatch.setattr(local_server.logging, "exception", lambda *a, **k: logged.append(a))
    features, _, serialized = served[2]
    request = _server_side_malformed(case, sample_spec, features, serialized)
    with grpc.insecure_channel(server[1]) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(request, timeout=30)
    assert err.value.code() == CODE.INVALID_ARGUMENT, err.value.details()
    if server[0] == "local":
        assert words in err.value.details() and "\n" not in err.value.details(), err.value.details()
        assert logged == []
    with ServingClient(server[1], "qin") as client:
        assert_scores_equal(client.predict(_rows(features, 5, 10)), served[3][10:15])


def test_client_refuses_negative_ids_before_sending(served, sample_spec):
    features = {k: v.copy() for k, v in _rows(served[2][0], 2).items()}  # never the fixture's rows
    features[sample_spec.target_item][1] = -3
    with ServingClient(f"127.0.0.1:{_free_port()}", "qin", deadline_s=2.0) as client:  # nobody listens
        with pytest.raises(ServingError) as err:
            client.predict(features)
    assert err.value.code == CODE.INVALID_ARGUMENT
    assert "input `item_id`, row 1: negative id -3; ids must be >= 0" in str(err.value)


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
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert (line + out + err).count(f" on {address}") == 1, line + out + err  # one ready line


@pytest.mark.parametrize("case", ["typo", "empty"])
def test_local_server_cli_bad_base_path_is_one_line(case, tmp_path):
    base = tmp_path / "typo" if case == "typo" else tmp_path
    args = [f"--model_base_path={base}", "--port=0"]
    if case == "typo":  # launched once; the other case runs the same main in process
        proc = subprocess.run([sys.executable, "-m", "export.local_server", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    else:
        proc = run_main("export.local_server", *args)
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (f"{base}: no such directory" if case == "typo" else "no SavedModel version here") in proc.stderr


def test_local_server_skips_an_empty_version_next_to_a_good_one(served, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(os.path.join(served[0], "1"), base / "1")
    (base / "2").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "export.local_server", f"--model_base_path={base}", "--port=0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "Serving `qin` version 1 on " in line, line + (proc.stderr.read()[-3000:] if proc.poll() else "")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert f"{base / '2'}: skipped, no saved_model.pb" in err and "Traceback" not in err, err


def _jsonl_rows(n=None):
    """The sample's test rows as JSON lines, histories unpadded as the log has them (some beyond max_len)."""
    import json

    import pyarrow.parquet as pq

    rows = pq.read_table(os.path.join(SAMPLE_DIR, "test.parquet")).to_pylist()[:n]
    return "".join(json.dumps({"item_id": r["item_id"], "item_seq": [i for i in r["item_seq"] if i],
                               "views_level": r["views_level"],
                               "user_id": r["user_id"]}) + "\n" for r in rows)


def test_client_cli_scores_json_lines_from_stdin_over_grpc_and_in_process(server, served):
    text = _jsonl_rows()
    assert max(len(__import__("json").loads(line)["item_seq"]) for line in text.splitlines()) > 16
    for where in (f"--server={server[1]}", f"--saved_model={served[0]}"):
        args = [where, "--input=-", "--batch_size=64"]
        if where.startswith("--server"):  # launched; in process with --saved_model
            proc = subprocess.run([sys.executable, "-m", "export.client", *args], input=text, cwd=REPO,
                                  capture_output=True, text=True, timeout=300)
        else:
            proc = run_main("export.client", *args, stdin=text)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_scores_equal(np.array(proc.stdout.split(), dtype=np.float64), served[3])


@pytest.mark.parametrize("line,words", [
    ('{"item_id": 5, "item_seq": [1, -2], "views_level": 1}',
     "<stdin>: row 1, column `item_seq`: negative item id -2 at position 1 of the list; ids must be >= 0"),
    ('{"item_id": 5, "item_seq": [1]}', "<stdin>: row 1, column `views_level`: missing key"),
    ('{"item_id": "5", "item_seq": [1], "views_level": 1}',
     "<stdin>: row 1, column `item_id`: expected an integer id"),
    ("[1, 2]", "<stdin>: row 1: expected a JSON object"),
])
def test_client_cli_json_lines_errors_name_row_and_key(line, words, served):
    text = _jsonl_rows(1) + line + "\n"
    args = [f"--saved_model={served[0]}", "--input=-"]
    if words.endswith("ids must be >= 0"):  # launched on the first case; the others run the same main in process
        proc = subprocess.run([sys.executable, "-m", "export.client", *args], input=text, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    else:
        proc = run_main("export.client", *args, stdin=text)
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(f"client: error: {words}"), proc.stderr


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


# --------------------------------------------------------------------------
# Raw ids over gRPC
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_served(served, sample_spec, tmp_path_factory):
    """(raw-id spec, export base, local server address) of the served model exported with vocabularies."""
    spec = make_raw_spec(sample_spec, str(tmp_path_factory.mktemp("raw_data")))
    base = str(tmp_path_factory.mktemp("raw_export") / "qin")
    exporter.export_model(served[1], spec, base)
    with LocalServer(base, port=0) as local:
        yield spec, base, local.address


def test_raw_id_grpc_request_scores_bitwise_as_dense(raw_served, served):
    spec, _, address = raw_served
    raw, dense = exporter.raw_rows(spec, served[2][0])
    with ServingClient(address, "qin") as client:
        got = client.predict(raw, "serving_raw")
        want = client.predict(dense)
        got_examples = client.predict_examples(exporter.raw_examples(spec, raw), "predict_raw_examples")
        features = {f.name: (f.dtype, f.shape) for f in client.features("serving_raw")}
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_examples, want)
    assert features == {"item_id": ("string", ()), "item_seq": ("string", (-1,)), "views_level": ("int64", ())}


def test_client_cli_scores_raw_json_lines_over_grpc_and_in_process(raw_served, served):
    import json

    spec, base, address = raw_served
    raw, dense = exporter.raw_rows(spec, served[2][0])
    lines = "".join(json.dumps({"item_id": raw["item_id"][i], "item_seq": [x for x in raw["item_seq"][i] if x],
                                "views_level": int(raw["views_level"][i])}) + "\n" for i in range(600))
    with ServingClient(address, "qin") as client:
        want = client.predict(dense)
    for where in (f"--server={address}", f"--saved_model={base}"):
        args = [where, "--raw_ids", "--input=-", "--batch_size=600"]
        if where.startswith("--server"):  # launched; in process with --saved_model
            proc = subprocess.run([sys.executable, "-m", "export.client", *args], input=lines, cwd=REPO,
                                  capture_output=True, text=True, timeout=300)
        else:
            proc = run_main("export.client", *args, stdin=lines)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # Another process (the CLI) may block its float sums differently: equal to float rounding here;
        # bit for bit within one process in test_raw_id_grpc_request_scores_bitwise_as_dense.
        assert_scores_equal(np.array(proc.stdout.split(), dtype=np.float32), want)


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


def test_local_server_serves_a_model_base_path_on_ram(served):
    """``--model_base_path`` on a TensorFlow filesystem (``ram://`` for ``gs://``), and a parquet input there."""
    import uuid

    from qin_tf import fileio

    root = f"ram://qin_tf_test_{uuid.uuid4().hex}"
    fileio.copy_tree(served[0], f"{root}/export")
    tf.io.gfile.copy(os.path.join(SAMPLE_DIR, "test.parquet"), f"{root}/test.parquet")
    with LocalServer(f"{root}/export", port=0) as local:
        with ServingClient(local.address, "qin") as client:
            assert [s.version for s in client.model_status().model_version_status] == [1]
            got = score_file(client, f"{root}/test.parquet", batch_size=256)
    assert_scores_equal(got, served[3])
    fileio.remove(root)
