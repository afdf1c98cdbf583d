"""Distribution: MirroredStrategy behaves as one device; two workers end with the same weights;
a killed worker stops the other with a clear message, and a restart resumes to the same result.

Both run in subprocesses: logical CPU devices and MultiWorkerMirroredStrategy
must be set up before TensorFlow starts, and this test process has started it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from qin_tf import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_FLAGS = os.path.join(REPO, "configs", "sample.flags")

# A worker of a multi-worker run: trains like `python -m qin_tf.train`, then
# saves its final (best-epoch) weights to argv[1] so the test can compare them.
WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from absl import flags
    from qin_tf import train
    fv = flags.FlagValues(); train.define_flags(fv); train.parse_flags(sys.argv[1:], fv)
    config = train.config_from_flags(fv)
    from qin_tf import task
    result = task.run(config, strategy=task.create_strategy(config.train.strategy))
    np.savez(sys.argv[1], *result.model.get_weights())
    print("chief" if result.is_chief else "not chief", result.num_replicas_in_sync, flush=True)
""")


def _env(**extra):
    env = dict(os.environ)
    for k in ("TF_CONFIG", "QIN_TF_VERBOSE"):
        env.pop(k, None)
    env.update(extra)
    return env


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _h5_weights(path):
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


# A few steps without dropout (its masks are per replica by nature), batch norm on.
FEW_STEPS = ["--dropout=0", "--batch_norm", "--epochs=2", "--steps_per_epoch=5", "--patience=2"]


def test_mirrored_matches_one_device(sample_spec, tmp_path, capsys):
    common = [f"--flagfile={SAMPLE_FLAGS}", f"--data_dir={sample_spec.base_dir}", *FEW_STEPS]
    one_dir, mirrored_dir = str(tmp_path / "one_device"), str(tmp_path / "mirrored")
    assert train.cli(["train", *common, f"--model_dir={one_dir}", "--strategy=one_device"]) == 0, \
        capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "qin_tf.train", *common, f"--model_dir={mirrored_dir}",
                           "--strategy=mirrored", "--logical_cpus=2"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "num_replicas_in_sync=2" in proc.stdout and "(128 per replica)" in proc.stdout

    one, mirrored = _metrics(one_dir), _metrics(mirrored_dir)
    assert one["num_replicas_in_sync"] == 1 and mirrored["num_replicas_in_sync"] == 2
    assert mirrored["strategy"] == "mirrored"
    for a, b in zip(one["history"], mirrored["history"]):
        for k in ("loss", "val_auc", "val_logloss", "lr"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["epoch"], k)
    for split in ("valid", "test"):
        assert mirrored["splits"][split]["auc"] == pytest.approx(one["splits"][split]["auc"], abs=1e-4)
    wa = _h5_weights(os.path.join(one_dir, "checkpoints", "latest.weights.h5"))
    wb = _h5_weights(os.path.join(mirrored_dir, "checkpoints", "latest.weights.h5"))
    assert wa.keys() == wb.keys() and len(wa) > 10
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], rtol=1e-3, atol=1e-5, err_msg=name)


# Long enough epochs to kill a worker in the middle of one; log_every_steps=1
# makes every step visible (the chunking of the loop does not change the numbers).
CLUSTER_FLAGS = ["--strategy=multi_worker", "--epochs=3", "--steps_per_epoch=12", "--log_every_steps=1"]


def _start_workers(tmp_path, tag, cluster, argv_for, *, script=None):
    """Starts one process per worker of ``cluster``; output goes to ``tmp_path/{tag}{i}.out``."""
    procs, outs = [], []
    for i in range(len(cluster["worker"])):
        tmpdir = tmp_path / f"{tag}tmp{i}"
        tmpdir.mkdir()
        env = _env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                   TMPDIR=str(tmpdir))
        out = tmp_path / f"{tag}{i}.out"
        cmd = [sys.executable, "-c", script, *argv_for(i)] if script else [sys.executable, "-m", "qin_tf.train",
                                                                           *argv_for(i)]
        with open(out, "w") as f:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.PIPE, text=True))
        outs.append(out)
    return procs, outs


def _finish(procs, timeout):
    """Waits for every process (killing all on timeout); returns their stderr."""
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=timeout)[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return errs


@pytest.fixture(scope="module")
def two_worker_run(sample_spec, tmp_path_factory):
    """An uninterrupted two-worker run on 127.0.0.1: (tmp dir, cluster args, model_dir, stdouts, stderrs)."""
    tmp_path = tmp_path_factory.mktemp("two_workers")
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    model_dir = str(tmp_path / "model")  # shared, as a cluster's model_dir is
    args = [f"--flagfile={SAMPLE_FLAGS}", f"--data_dir={sample_spec.base_dir}", *CLUSTER_FLAGS]
    procs, outs = _start_workers(tmp_path, "w", cluster,
                                 lambda i: [str(tmp_path / f"w{i}.npz"), *args, f"--model_dir={model_dir}"],
                                 script=WORKER)
    errs = _finish(procs, 300)
    stdouts = [o.read_text() for o in outs]
    for p, out, err in zip(procs, stdouts, errs):
        assert p.returncode == 0, out + err
    return tmp_path, args, model_dir, stdouts


def test_two_workers_train_together_and_end_with_identical_weights(two_worker_run):
    tmp_path, _, model_dir, outs = two_worker_run
    assert outs[0].rstrip().endswith("chief 2") and outs[1].rstrip().endswith("not chief 2")
    assert "[worker 1] " in outs[1] and "num_replicas_in_sync=2" in outs[1]

    w0, w1 = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert len(w0.files) == len(w1.files) > 10
    for k in w0.files:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    # they trained: the weights moved away from a fresh model's
    m = _metrics(model_dir)
    assert m["strategy"] == "multi_worker" and m["num_replicas_in_sync"] == 2
    assert len(m["history"]) == 3 and m["history"][1]["loss"] < m["history"][0]["loss"]
    # only the chief wrote model_dir; the other worker's scratch directory is gone
    assert os.path.exists(os.path.join(model_dir, "best.keras"))
    assert os.listdir(tmp_path / "wtmp1") == []


def _wait_for(path, text, procs, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    for p in procs:
        p.kill()
    pytest.fail(f"{text!r} did not appear in {path}: {path.read_text()[-2000:]}")


def test_a_killed_worker_stops_the_other_and_a_restart_resumes_to_the_same_result(two_worker_run, tmp_path):
    _, args, ref_dir, _ = two_worker_run
    victim, survivor = 1, 0
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    model_dir = str(tmp_path / "model")
    argv = lambda i: [*args, f"--model_dir={model_dir}"]  # noqa: E731

    procs, outs = _start_workers(tmp_path, "a", cluster, argv)
    _wait_for(outs[victim], "epoch 2/3  step 3/12", procs, 300)
    procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    # The survivor does not hang: the collective it is in fails (closed
    # socket), or the coordination service misses the dead worker's
    # heartbeats and aborts it; it exits with one clear line. 120 s bounds
    # "does not hang", generously for a loaded machine.
    errs = _finish(procs, 120)
    print(f"the survivor stopped {time.monotonic() - killed:.1f} s after the kill")
    assert procs[survivor].returncode == 1, outs[survivor].read_text() + errs[survivor]
    last = errs[survivor].strip().splitlines()[-1]
    assert last.startswith(f"train: error: worker {survivor} lost the cluster at epoch 2, step "), errs[survivor]
    assert f"a collective operation failed (peer: worker {victim}): " in last, last
    assert ("Restart every worker with the same TF_CONFIG: training resumes from the backup in "
            f"{os.path.join(model_dir, 'backup')} (1 epochs done).") in last, last
    assert "epoch 2/3 done" not in outs[survivor].read_text()
    with open(os.path.join(model_dir, "backup", "state.json")) as f:
        assert json.load(f)["next_epoch"] == 1
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))

    # A cluster manager restarts both with the same TF_CONFIG: they resume after epoch 1.
    procs, outs = _start_workers(tmp_path, "b", cluster, argv)
    errs = _finish(procs, 300)
    for p, out, err in zip(procs, outs, errs):
        assert p.returncode == 0, out.read_text() + err
        assert "resumed from" in out.read_text() and "1 epochs done" in out.read_text()
        assert "epoch 1/3" not in out.read_text() and "epoch 3/3 done" in out.read_text()

    # ... and end exactly where the uninterrupted run ended (the same steps on
    # the same data from bitwise the same state: equality holds with tolerance 0).
    resumed, uninterrupted = _metrics(model_dir), _metrics(ref_dir)
    assert resumed["best_epoch"] == uninterrupted["best_epoch"]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed["history"]] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in uninterrupted["history"]]
    assert resumed["splits"] == uninterrupted["splits"]
    for name in ("best.weights.h5", "latest.weights.h5"):
        wa = _h5_weights(os.path.join(ref_dir, "checkpoints", name))
        wb = _h5_weights(os.path.join(model_dir, "checkpoints", name))
        assert wa.keys() == wb.keys() and len(wa) > 10
        for k in wa:
            np.testing.assert_array_equal(wb[k], wa[k], err_msg=f"{name}: {k}")
