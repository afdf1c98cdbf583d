"""The daily cycle as one command sequence: ``scripts/run_sample_cycle.sh`` on the bundled sample.

The script runs once per module, three days, day 3 corrupted
(``CORRUPT_DAY=3``: its train labels flipped after its build). As soon as
day 1's version is pushed, a local server (``python -m export.local_server``,
polling every 0.2 s) serves the base path and a client thread sends requests
without pause until the cycle has ended and the server serves the newest
version. Then: days 1 and 2 were blessed and pushed in order, as versions 1
and 2, byte for byte; the server switched to version 2 with no request
failing; each day's vocabularies extend the previous day's; each warm start
names the previous day's model_dir; day 3 was refused (validate's exit 1 in
the script's line), its record says so, and the serving tree is the same
before and after day 3.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.conftest import tree_hash

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "run_sample_cycle.sh")
#: A raw-id request (ids as the log has them), as README's "Serving" shows; unknown ids score as OOV.
REQUEST = {"item_id": np.asarray([3208, 513], np.int64), "item_seq": np.asarray([[109, 3570], [0, 1054]], np.int64),
           "views_level": np.asarray([3, 0], np.int64)}




def script_env(out, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "QIN_TF_VERBOSE")}
    env.update(OUT=str(out), PYTHON=sys.executable, PYTHONPATH=REPO, **extra)
    return env


class Requests(threading.Thread):
    """Sends REQUEST to `serving_raw` without pause; records (version answered, scores) or the error."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.address = address
        self.answers: list[tuple[int, np.ndarray]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self):
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        req = predict_pb2.PredictRequest()
        req.model_spec.name, req.model_spec.signature_name = "qin", "serving_raw"
        for name, value in REQUEST.items():
            req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        with grpc.insecure_channel(self.address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not self.stop.is_set():
                try:
                    resp = stub.Predict(req, timeout=30.0)
                    self.answers.append((resp.model_spec.version.value, tf.make_ndarray(resp.outputs["ctr"])))
                except Exception as e:  # every failure counts
                    self.failures.append(f"{type(e).__name__}: {e}")
                time.sleep(0.02)


@pytest.fixture(scope="module")
def cycle(tmp_path_factory):
    out = tmp_path_factory.mktemp("cycle") / "out"
    serving = out / "serving"
    proc = subprocess.Popen(["bash", SCRIPT], cwd=REPO, env=script_env(out, DAYS="3", EPOCHS="6", CORRUPT_DAY="3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, server, client, hash_before_day3 = [], None, None, None
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("day 1: validate: blessed"):  # version 1 is in place: serve it, send requests
                server = subprocess.Popen(
                    [sys.executable, "-m", "export.local_server", f"--model_base_path={serving}", "--port=0",
                     "--poll_interval_s=0.2"], cwd=REPO, env=script_env(out),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                ready = server.stdout.readline()
                assert "Serving `qin` version 1 on " in ready, ready + server.stderr.read()[-3000:]
                client = Requests(ready.split(" on ")[1].split(" ")[0])
                client.start()
            if line.startswith("day 2: validate: blessed"):
                hash_before_day3 = tree_hash(serving)
        rc = proc.wait(timeout=60)
        stderr = proc.stderr.read()
        # The cycle is over; wait (bounded) until the server answers from the newest version.
        deadline = time.monotonic() + 60
        while client is not None and time.monotonic() < deadline and not (
                client.answers and client.answers[-1][0] == 2):
            time.sleep(0.2)
        if client is not None:
            n = len(client.answers)
            while time.monotonic() < deadline and len(client.answers) < n + 5:  # a few more on the newest
                time.sleep(0.1)
    finally:
        if client is not None:
            client.stop.set()
            client.join(timeout=60)
        server_log = ""
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server_out, server_err = server.communicate(timeout=60)
            server_log = server_out + server_err
        if proc.poll() is None:
            proc.kill()
    return {"out": str(out), "serving": str(serving), "rc": rc, "lines": lines, "stderr": stderr,
            "client": client, "server_log": server_log, "hash_before_day3": hash_before_day3}


def test_the_script_reports_one_line_per_step_and_exits_0(cycle):
    assert cycle["rc"] == 0, cycle["stderr"][-3000:]
    assert cycle["stderr"] == ""
    lines = cycle["lines"]
    assert lines[0].startswith("cut: data/microlens_sample/raw/events.tsv -> 3 days")
    for d in (1, 2, 3):
        steps = [line.split(":")[1].split()[0] for line in lines if line.startswith(f"day {d}: ")]
        assert steps == ["build", "preprocess", "train", "export", "validate"] if d < 3 else \
            ["build", "CORRUPT_DAY", "preprocess", "train", "export", "validate"], lines
    assert lines[-1].startswith(f"done: {cycle['serving']} serves version 2")
    assert len(lines) == 1 + 5 + 5 + 6 + 1


def test_blessed_versions_are_pushed_in_order_byte_for_byte(cycle):
    from export import exporter, validate

    out, serving = cycle["out"], cycle["serving"]
    assert exporter.list_versions(serving) == [1, 2]
    for d in (1, 2):
        candidate = os.path.join(out, f"day{d}", "export", str(d))
        with open(validate.record_path(candidate)) as f:
            record = json.load(f)
        assert record["blessed"] is True and record["first_version"] is (d == 1)
        assert record["pushed"]["serving_version"] == d
        assert record["data"]["split"] == "valid"
        assert validate.fingerprint(os.path.join(serving, str(d))) == validate.fingerprint(candidate) == \
            record["candidate"]["fingerprint"]
        if d == 2:
            assert record["serving"]["version"] == 1
        assert f"day {d}: validate: blessed ({candidate}.validation.json); pushed as version {d} -> " \
               f"{serving}/{d}" in cycle["lines"]


def test_the_server_switches_to_the_newest_version_with_no_failed_request(cycle):
    client = cycle["client"]
    assert client.failures == []
    versions = [v for v, _ in client.answers]
    assert versions[0] == 1 and versions[-1] == 2
    assert versions == sorted(versions)  # 1, ..., 1, 2, ..., 2: one switch, never back
    assert versions.count(1) >= 2 and versions.count(2) >= 2
    # Each version answers the same request the same way; the two versions differ.
    by_version = {v: s for v, s in client.answers}
    for v, s in client.answers:
        np.testing.assert_array_equal(s, by_version[v])
        assert s.shape == (2,) and ((s > 0) & (s < 1)).all()
    assert not np.array_equal(by_version[1], by_version[2])
    assert "(was version 1)" in cycle["server_log"] and "Traceback" not in cycle["server_log"]


def test_each_days_vocabularies_extend_the_previous_days(cycle):
    out = cycle["out"]
    names = sorted(os.listdir(os.path.join(out, "day1", "examples", "vocab")))
    assert "item_id.txt" in names
    for d in (2, 3):
        assert sorted(os.listdir(os.path.join(out, f"day{d}", "examples", "vocab"))) == names
        for name in names:
            with open(os.path.join(out, f"day{d - 1}", "examples", "vocab", name)) as f:
                before = f.read().splitlines()
            with open(os.path.join(out, f"day{d}", "examples", "vocab", name)) as f:
                after = f.read().splitlines()
            assert after[:len(before)] == before, (d, name)
        with open(os.path.join(out, f"day{d}", "examples", "state", "state.json")) as f:
            assert json.load(f)["builds"] == d
    # Every item of the days' events has its id (on the sample the catalog already names them all on day 1,
    # so the item vocabulary is complete from the start and stays equal).
    import pyarrow.parquet as pq

    with open(os.path.join(out, "day3", "examples", "vocab", "item_id.txt")) as f:
        items = f.read().splitlines()
    assert len(items) == len(set(items))
    seen = {str(i) for d in (1, 2, 3) for i in pq.read_table(
        os.path.join(out, "days", f"events-day{d}.parquet"), columns=["item"]).column("item").to_pylist()}
    assert seen and seen <= set(items)


def test_each_warm_start_names_the_previous_days_model_dir(cycle):
    out = cycle["out"]
    assert not os.path.exists(os.path.join(out, "day1", "model", "warm_start.json"))
    for d in (2, 3):
        with open(os.path.join(out, f"day{d}", "model", "warm_start.json")) as f:
            warm = json.load(f)
        assert os.path.realpath(warm["source"]) == os.path.realpath(os.path.join(out, f"day{d - 1}", "model"))
        with open(os.path.join(out, f"day{d - 1}", "model", "best.keras"), "rb") as f:
            assert warm["source_model_sha256"] == hashlib.sha256(f.read()).hexdigest()


def test_the_corrupted_day_is_refused_and_the_serving_base_is_unchanged(cycle):
    from export import validate

    out, serving = cycle["out"], cycle["serving"]
    (line,) = [line for line in cycle["lines"] if line.startswith("day 3: validate")]
    candidate = os.path.join(out, "day3", "export", "3")
    assert line.startswith("day 3: validate (exit 1): refused: AUC "), line
    assert line.endswith(f"({candidate}.validation.json); not pushed, still serving version 2")
    with open(validate.record_path(candidate)) as f:
        record = json.load(f)
    assert record["blessed"] is False and record["decision"] == "refused" and record["pushed"] is None
    assert record["serving"]["version"] == 2
    assert record["candidate"]["metrics"]["auc"] < record["serving"]["metrics"]["auc"] - \
        record["thresholds"]["auc_tolerance"]
    with open(os.path.join(out, "logs", "day3-validate.log")) as f:
        last = f.read().strip().splitlines()[-1]
    assert last.startswith("validate: refused: AUC ") and f"(exit 1): {last[len('validate: '):]} (" in line
    assert cycle["hash_before_day3"] is not None and tree_hash(serving) == cycle["hash_before_day3"]


# ------------------------------------------------------------------ bad input


def test_an_existing_output_is_refused_in_one_line_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = subprocess.run(["bash", SCRIPT], cwd=REPO, env=script_env(out), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"run_sample_cycle: error: {out} exists and is not empty; remove it or set OUT\n"
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_a_failing_step_stops_the_cycle_with_one_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", SCRIPT], cwd=REPO, env=script_env(out, DAYS="0"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == ("run_sample_cycle: error: day 0 cut failed: cut_days: error: --days must be in "
                           f"1..2211, got 0 (log: {out}/logs/day0-cut.log)\n")
    assert os.listdir(out / "serving") == []


# ------------------------------------------------------------------ the days


def test_cut_days_is_deterministic_and_spreads_each_day_over_its_day(tmp_path):
    import pyarrow.parquet as pq

    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import cut_days

    a = cut_days.cut_days(str(tmp_path / "a"), 3)
    b = cut_days.cut_days(str(tmp_path / "b"), 3)
    assert a == b == [(d, float(cut_days.DAY0 + (d - 1) * 86400 + 0.6 * 86400),
                       float(cut_days.DAY0 + (d - 1) * 86400 + 0.8 * 86400)) for d in (1, 2, 3)]
    events = []
    for d in (1, 2, 3):
        with open(tmp_path / "a" / f"events-day{d}.parquet", "rb") as f, \
                open(tmp_path / "b" / f"events-day{d}.parquet", "rb") as g:
            assert f.read() == g.read()
        rows = pq.read_table(tmp_path / "a" / f"events-day{d}.parquet").to_pylist()
        ts = [r["ts"] for r in rows]
        start = cut_days.DAY0 + (d - 1) * 86400
        assert ts[0] == start and ts == sorted(set(ts)) and ts[-1] < start + 86400
        assert len(rows) in (737, 738)
        events += [(r["user"], r["item"]) for r in rows]
        with open(tmp_path / "a" / f"day{d}.json") as f:
            cfg = json.load(f)
        assert cfg["events"]["files"] == str(tmp_path / "a" / f"events-day{d}.parquet")
        assert cfg["split"]["method"] == "time" and os.path.isfile(cfg["catalog"]["files"])
    assert events == cut_days.ordered_events() and len(events) == 2211
    # each user's events keep their order
    first = {}
    with open(cut_days.RAW_EVENTS) as f:
        for line in f:
            user, items = line.rstrip("\n").split("\t")
            first[int(user)] = [int(i) for i in items.split()]
    assert {u: [i for uu, i in events if uu == u] for u in first} == first
