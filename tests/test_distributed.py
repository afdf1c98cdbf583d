"""Distribution: MirroredStrategy behaves as one device; two workers end with the same weights.

Both run in subprocesses: logical CPU devices and MultiWorkerMirroredStrategy
must be set up before TensorFlow starts, and this test process has started it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

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


def test_two_workers_train_together_and_end_with_identical_weights(sample_spec, tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    model_dir = str(tmp_path / "model")  # shared, as a cluster's model_dir is
    args = [f"--flagfile={SAMPLE_FLAGS}", f"--data_dir={sample_spec.base_dir}", f"--model_dir={model_dir}",
            "--strategy=multi_worker", "--epochs=2", "--steps_per_epoch=4"]
    procs, tmpdirs = [], []
    for i in range(2):
        tmpdir = tmp_path / f"tmp{i}"
        tmpdir.mkdir()
        tmpdirs.append(tmpdir)
        env = _env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                   TMPDIR=str(tmpdir))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / f"w{i}.npz"), *args],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    assert outs[0].rstrip().endswith("chief 2") and outs[1].rstrip().endswith("not chief 2")
    assert "[worker 1] " in outs[1] and "num_replicas_in_sync=2" in outs[1]

    w0, w1 = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert len(w0.files) == len(w1.files) > 10
    for k in w0.files:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    # they trained: the weights moved away from a fresh model's
    m = _metrics(model_dir)
    assert m["strategy"] == "multi_worker" and m["num_replicas_in_sync"] == 2
    assert len(m["history"]) == 2 and m["history"][1]["loss"] < m["history"][0]["loss"]
    # only the chief wrote model_dir; the other worker's scratch directory is gone
    assert os.path.exists(os.path.join(model_dir, "best.keras"))
    assert os.listdir(tmpdirs[1]) == []
