"""export.local_server serving versions as TF Serving does, and the raw-id rule at its door.

* A version copied in two steps (first incomplete, so its load fails) is
  loaded once complete; the failure is reported once.
* Deleting the newest version rolls back to the newest remaining one, with
  no failed request during the switch.
* A broken newest version at start: an older one is served (one line about
  the broken one); with none, one line naming the version and exit code 1.
* ``serving_raw`` / ``predict_raw_examples`` refuse what
  :data:`qin_tf.spec.RAW_ID_RULE` refuses, naming input and row, and score
  every accepted raw id as its dense id.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from export import exporter
from export.client import ServingClient
from export.local_server import LocalServer
from qin_tf.spec import RAW_ID_RULE
from tests.test_export import REPO, make_int_raw_spec, make_model_dir, split_rows

#: Seconds between the local server's polls here (TF Serving's default is 1).
POLL_S = 0.05


@pytest.fixture(scope="module")
def versions(sample_spec, tmp_path_factory):
    """(a dense-id version dir, an int64 raw-id version dir, the raw-id spec, the sample's test rows)."""
    tmp = tmp_path_factory.mktemp("versions")
    model = make_model_dir(sample_spec, str(tmp / "model"), seed=7)
    dense = exporter.export_from_model_dir(str(tmp / "model"), str(tmp / "dense"), data_dir=sample_spec.base_dir)
    raw_spec = make_int_raw_spec(sample_spec, str(tmp / "raw_data"))
    raw = exporter.export_model(model, raw_spec, str(tmp / "raw"))
    return dense, raw, raw_spec, split_rows(sample_spec, "test")[0]


def _wait(condition, what: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(POLL_S)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def _status(client) -> list[int]:
    return [s.version for s in client.model_status().model_version_status]


def _request(features, signature="serving_default") -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name, req.model_spec.signature_name = "qin", signature
    for k, v in features.items():
        req.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    return req


def _rows(features, n):
    return {k: v[:n] for k, v in features.items()}


# --------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------


def test_a_version_copied_in_two_steps_is_served_once_complete(versions, tmp_path):
    """The first load fails (variables not there yet); once they are, the poll loads it."""
    source, _, _, features = versions
    base = tmp_path / "base"
    shutil.copytree(source, base / "1")
    lines = []
    with LocalServer(str(base), port=0, poll_interval_s=POLL_S, log=lines.append) as local:
        with ServingClient(local.address, "qin") as client:
            want = client.predict(_rows(features, 5))
            shutil.copytree(source, base / "2", ignore=shutil.ignore_patterns("variables"))  # step 1: incomplete
            _wait(lambda: any(line.startswith(f"{base / '2'}: could not load") for line in lines),
                  "the incomplete version's failed load")
            time.sleep(20 * POLL_S)  # polls go by; the unchanged incomplete version is not loaded again
            assert _status(client) == [1]
            np.testing.assert_array_equal(client.predict(_rows(features, 5)), want)
            shutil.copytree(os.path.join(source, "variables"), base / "2" / "variables")  # step 2: complete
            _wait(lambda: _status(client) == [2], "version 2 served")
            np.testing.assert_array_equal(client.predict(_rows(features, 5)), want)
    failed = [line for line in lines if "could not load" in line]
    assert len(failed) == 1 and "\n" not in failed[0] and "{{" not in failed[0], lines
    assert failed[0].endswith("will retry when its files change; still serving version 1."), failed
    assert lines[-1] == f"Serving `qin` version 2 (was version 1) from {base / '2'}.", lines


def test_deleting_the_served_version_rolls_back_with_no_failed_request(versions, tmp_path):
    source, _, _, features = versions
    base = tmp_path / "base"
    for v in (1, 2):
        shutil.copytree(source, base / str(v))
    lines, answered, failed = [], [], []
    stop = threading.Event()
    with LocalServer(str(base), port=0, poll_interval_s=POLL_S, log=lines.append) as local:
        channel = grpc.insecure_channel(local.address)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        req = _request(_rows(features, 3))

        def load():
            while not stop.is_set():
                try:
                    answered.append(stub.Predict(req, timeout=30).model_spec.version.value)
                except grpc.RpcError as e:
                    failed.append(e)

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            _wait(lambda: len(answered) >= 5, "requests to version 2")
            shutil.rmtree(base / "2")
            _wait(lambda: answered[-1:] == [1], "requests to version 1")
            n = len(answered)
            _wait(lambda: len(answered) >= n + 5, "more requests to version 1")
        finally:
            stop.set()
            for t in threads:
                t.join()
            channel.close()
    assert failed == []
    assert answered[0] == 2 and answered[-1] == 1 and set(answered) == {1, 2}
    first_one = answered.index(1)
    assert set(answered[first_one + 3:]) == {1}  # at most one request in flight per thread at the switch
    assert lines == [f"Serving `qin` version 1 (was version 2; version 2 was deleted) from {base / '1'}."], lines


def _start_cli(base):
    return subprocess.Popen([sys.executable, "-m", "export.local_server", f"--model_base_path={base}", "--port=0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_serves_an_older_version_when_the_newest_is_broken_and_exits_1_with_none(versions, tmp_path):
    import signal

    source = versions[0]
    base = tmp_path / "base"
    shutil.copytree(source, base / "1")
    shutil.copytree(source, base / "2")
    (base / "2" / "saved_model.pb").write_bytes(b"not a SavedModel")
    proc = _start_cli(base)
    try:
        line = proc.stdout.readline()
        assert line.startswith("Serving `qin` version 1 on "), line + (proc.stderr.read() if proc.poll() else "")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    broken = [x for x in err.splitlines() if "could not load" in x]
    assert len(broken) == 1 and f"{base / '2'}: could not load this version (DecodeError: " in broken[0], err
    assert broken[0].endswith("serving version 1 instead.") and "Traceback" not in err, err

    shutil.rmtree(base / "1")
    proc = subprocess.run([sys.executable, "-m", "export.local_server", f"--model_base_path={base}", "--port=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"local_server: error: {base / '2'}: could not load this version (DecodeError: Error parsing message with type "
        "'tensorflow.SavedModel'); no other version to serve."], proc.stderr


# --------------------------------------------------------------------------
# Raw ids
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_server(versions):
    with LocalServer(os.path.dirname(versions[1]), port=0, poll_interval_s=0) as local:
        channel = grpc.insecure_channel(local.address)
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
        channel.close()


def _raw_row(spec):
    return {spec.target_item: np.array([14], np.int64), spec.sequence: np.array([[0, 21, 0, 28]], np.int64),
            spec.context[0]: np.array([23], np.int64)}


def test_local_server_scores_accepted_raw_ids_as_their_dense_ids(raw_server, versions):
    _, _, spec, _ = versions
    row = _raw_row(spec)
    row[spec.target_item] = np.array([2 ** 63 - 6])
    dense = {spec.target_item: np.array([2]), spec.sequence: np.array([[0] * (spec.max_len - 2) + [3, 4]]),
             spec.context[0]: np.array([2])}
    got = tf.make_ndarray(raw_server.Predict(_request(row, "serving_raw"), timeout=30).outputs["ctr"])
    want = tf.make_ndarray(raw_server.Predict(_request(dense), timeout=30).outputs["ctr"])
    ex = _request({"examples": np.array(exporter.raw_examples(spec, row), dtype=object)}, "predict_raw_examples")
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(tf.make_ndarray(raw_server.Predict(ex, timeout=30).outputs["ctr"]), want)


@pytest.mark.parametrize("name,value,why", [
    ("item_id", 0, "0 is padding, not an id"), ("item_id", -7, "-7 is negative"),
    ("item_seq", -3, "-3 is negative"), ("views_level", 0, "0 is padding, not an id"),
    ("views_level", -1, "-1 is negative")])
def test_local_server_refuses_what_the_raw_id_rule_refuses(name, value, why, raw_server, versions):
    spec = versions[2]
    row = _raw_row(spec)
    row[name] = row[name].copy()
    row[name].reshape(-1)[-1] = value
    with pytest.raises(grpc.RpcError) as err:
        raw_server.Predict(_request(row, "serving_raw"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == f"input `{name}`, row 0: {why}; {RAW_ID_RULE}."
    ex = _request({"examples": np.array(exporter.raw_examples(spec, row), dtype=object)}, "predict_raw_examples")
    with pytest.raises(grpc.RpcError) as err:
        raw_server.Predict(ex, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == f"examples[0], feature `{name}`: {why}; {RAW_ID_RULE}."
