"""Paths are URLs: what goes through ``tf.io.gfile`` works on TensorFlow's ``ram://`` filesystem.

``ram://`` stands for any non-local TensorFlow filesystem (``gs://``): a
path that ``os`` or ``open`` handled would land on the local disk instead
(``os.makedirs("ram://x")`` makes a local directory ``ram:``).
"""

from __future__ import annotations

import json
import uuid

import numpy as np

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
