"""Paths are URLs: what goes through ``tf.io.gfile`` works on TensorFlow's ``ram://`` filesystem.

``ram://`` stands for any non-local TensorFlow filesystem (``gs://``): a
path that ``os`` or ``open`` handled would land on the local disk instead
(``os.makedirs("ram://x")`` makes a local directory ``ram:``).
"""

from __future__ import annotations

import io
import json
import os
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from qin_tf import callbacks as qcb
from qin_tf.runtime import import_tensorflow

tf = import_tensorflow()
import keras  # noqa: E402


def _model_and_optimizer(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    optimizer = keras.optimizers.Adam(learning_rate=0.1)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def test_training_backup_and_json_round_trip_on_ram_filesystem():
    backup_dir = f"ram://qin_tf_test_{uuid.uuid4().hex}/model/backup"
    model, optimizer = _model_and_optimizer(1)
    variables = lambda: list(model.variables) + list(optimizer.variables)  # noqa: E731
    best = {"epoch": 0}
    cb = qcb.TrainingBackup(backup_dir, variables=variables, state_fn=lambda: {"plateau": {"wait": 2}},
                            best_epoch_fn=lambda: best["epoch"])
    cb.set_model(model)
    cb.on_epoch_end(0)
    best_values = [w.numpy().copy() for w in model.weights]
    for epoch in (1, 2):  # the weights and Adam's step move; epoch 0 stays the best
        for v in variables():
            v.assign(v + 1)
        cb.on_epoch_end(epoch)
    latest_values = [np.asarray(v.numpy()).copy() for v in variables()]

    # the best and the latest epoch are kept, the one in between is removed, no temporary is left
    assert sorted(tf.io.gfile.listdir(backup_dir)) == ["epoch-00001.npz", "epoch-00003.npz", "state.json"]
    state = qcb.TrainingBackup.read(backup_dir)
    assert state["next_epoch"] == 3 and state["latest"] == "epoch-00003.npz" and state["best"] == "epoch-00001.npz"
    assert state["callbacks"] == {"plateau": {"wait": 2}}

    other, other_optimizer = _model_and_optimizer(2)
    other_variables = list(other.variables) + list(other_optimizer.variables)
    restored_best = qcb.TrainingBackup.restore(backup_dir, state, other_variables, other.weights)
    for got, want in zip(restored_best, best_values):
        np.testing.assert_array_equal(got, want)
    for v, want in zip(other_variables, latest_values):
        np.testing.assert_array_equal(v.numpy(), want)
    assert int(other_optimizer.iterations.numpy()) == int(optimizer.iterations.numpy()) == 2

    path = backup_dir.rsplit("/", 1)[0] + "/metrics.json"
    qcb.write_json(path, {"auc": 0.75, "history": [1, 2]})
    with tf.io.gfile.GFile(path) as f:
        assert json.load(f) == {"auc": 0.75, "history": [1, 2]}
    assert not tf.io.gfile.exists(path + ".tmp")


# --------------------------------------------------------------------------
# The main job with every path on ram://
# --------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


class _InterruptAfterFirstEpoch(keras.callbacks.Callback):
    """Stops the run right after epoch 1's backup (the built-in callbacks run first), as a kill would."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise _Interrupted()


def test_train_resume_export_and_score_with_every_path_on_ram(sample_spec, tmp_path, capsys):
    from absl import flags as absl_flags

    from export import score
    from qin_tf import fileio, task, train
    from qin_tf.metrics import auc

    root = f"ram://qin_tf_test_{uuid.uuid4().hex}"
    data_dir = f"{root}/data"
    fileio.copy_tree(sample_spec.base_dir, data_dir)
    flagfile = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sample.flags")

    def args(model_dir, *extra):
        return [f"--flagfile={flagfile}", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
                "--epochs=2", "--steps_per_epoch=3", *extra]

    assert train.cli(["train", *args(f"{root}/uninterrupted")]) == 0

    # interrupted after epoch 1: a backup and no results on ram://
    killed = f"{root}/killed"
    fv = absl_flags.FlagValues()
    train.define_flags(fv)
    train.parse_flags(["train", *args(killed)], fv)
    with pytest.raises(_Interrupted):
        task.run(train.config_from_flags(fv), callbacks=[_InterruptAfterFirstEpoch()], print_fn=lambda s: None)
    assert qcb.TrainingBackup.read(f"{killed}/backup")["next_epoch"] == 1
    assert not tf.io.gfile.exists(f"{killed}/metrics.json")

    # resumed with the same command, plus the export: the same result as the uninterrupted run
    export_base = f"{root}/export"
    capsys.readouterr()
    assert train.cli(["train", *args(killed, f"--export_base={export_base}")]) == 0
    assert "1 epochs done" in capsys.readouterr().out
    resumed, uninterrupted = fileio.read_json(f"{killed}/metrics.json"), fileio.read_json(f"{root}/uninterrupted/metrics.json")
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    for a, b in zip(resumed["history"], uninterrupted["history"]):
        for k in ("loss", "val_auc", "val_logloss", "val_gauc", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["epoch"], k)
    for k in ("auc", "logloss", "gauc"):
        assert resumed["splits"]["test"][k] == pytest.approx(uninterrupted["splits"]["test"][k], abs=1e-7)
    for name in ("config.json", "data_fingerprint.json", "feature_spec.json", "best.keras", "curves.png",
                 "checkpoints/best.weights.h5", "checkpoints/latest.weights.h5"):
        assert tf.io.gfile.stat(f"{killed}/{name}").length > 0, name
    assert not tf.io.gfile.exists(f"{killed}/backup")  # removed once the run is complete
    assert resumed["export"] == f"{export_base}/1"
    assert tf.io.gfile.exists(f"{export_base}/1/saved_model.pb")
    assert tf.io.gfile.exists(f"{export_base}/1/assets.extra/tf_serving_warmup_requests")
    assert not [n for n in tf.io.gfile.listdir(export_base) if n.startswith(".")]  # no temporary left

    # scored from ram:// TFRecords to a ram:// parquet file: the run's test AUC, the scores written
    output = f"{root}/scores/test.parquet"
    result = score.score(export_base, f"{data_dir}/test-*.tfrecord.gz", output, log=lambda line: None)
    assert result["num_rows"] == sample_spec.splits["test"].num_rows
    assert result["auc"] == pytest.approx(resumed["splits"]["test"]["auc"], abs=1e-6)
    with tf.io.gfile.GFile(output, "rb") as f:
        table = pq.read_table(io.BytesIO(f.read()))
    np.testing.assert_array_equal(table.column("ctr").to_numpy(), result["scores"])
    assert auc(table.column(sample_spec.label).to_numpy(), table.column("ctr").to_numpy()) == result["auc"]
    assert [n for n in tf.io.gfile.listdir(f"{root}/scores")] == ["test.parquet"]
    with pytest.raises(score.InputError, match="the output exists; pass --overwrite"):
        score.score(export_base, f"{data_dir}/test-*.tfrecord.gz", output, log=lambda line: None)
    fileio.remove(root)
