"""Callbacks of the training loop in :mod:`qin_tf.task`, and the backup they resume from.

They are ``keras.callbacks.Callback`` s, driven by a ``keras.callbacks.CallbackList``
(``on_train_begin``, ``on_epoch_begin``, ``on_train_batch_end``,
``on_epoch_end``, ``on_train_end``); the loop puts the exact validation
metrics (``val_auc``, ``val_logloss``, ``val_gauc``) and the learning rate of
the epoch (``lr``) into the epoch's ``logs`` before calling them, in order:

* :class:`PlateauSchedule`: the original's schedule (FuxiCTR
  ``checkpoint_and_earlystop`` with ``reduce_lr_on_plateau``): an epoch whose
  ``val_auc`` is not at least ``best + min_delta`` multiplies the learning
  rate by ``factor`` (floor ``min_lr``) and counts towards ``patience``; an
  improving epoch resets the count and becomes the best; ``patience`` epochs
  in a row without improvement stop the run. It keeps the best weights and
  restores them at the end.
* :class:`History`: one record per epoch (for ``metrics.json``, the curves
  and the backup).
* :class:`ProgressLogger`: progress within an epoch (a progress bar on a
  terminal, periodic lines in logs) and a line per epoch.
* :class:`TensorBoardLogger`: scalars under ``logs/train`` and ``logs/valid``.
* :class:`TrainingBackup`: writes the whole training state at the end of
  every epoch (all variables of the model -- dropout seeds included -- and of
  the optimizer, and the state of the stateful callbacks) so that a run that
  is killed resumes at the next epoch as if it had never stopped. It writes
  a new file per epoch and then atomically replaces ``state.json``, which
  names the files; a kill at any moment leaves a consistent backup. It reads
  and writes through ``tf.io.gfile``, so the backup directory may be on any
  TensorFlow filesystem (``gs://``; ``ram://`` in tests), as may the JSON
  files of :func:`write_json` (from :mod:`qin_tf.fileio`).

Example::

    plateau = PlateauSchedule(optimizer, patience=2)
    cbs = keras.callbacks.CallbackList([plateau, History()], model=model)
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from typing import Callable, Sequence

import keras
import numpy as np

from qin_tf.fileio import gfile as _gfile
from qin_tf.fileio import write_bytes, write_json  # noqa: F401  (write_json: qcb.write_json for the callers)

#: Files of a backup directory.
BACKUP_STATE = "state.json"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if (abs(value) < 1e-3 and value != 0) else f"{value:.4f}"
    return str(value)


class PlateauSchedule(keras.callbacks.Callback):
    """Learning-rate halving on plateau, early stopping, best-weights restore.

    Args:
        optimizer: the optimizer whose ``learning_rate`` to decay.
        monitor: the ``logs`` key to maximise (``"val_auc"``).
        min_delta: an epoch improves if ``value >= best + min_delta``.
        factor: learning-rate multiplier after a non-improving epoch, in (0, 1].
        min_lr: floor of the learning rate.
        patience: stop after this many non-improving epochs in a row.
        on_improvement: called with ``epoch`` (0-based) after an improving
            epoch, e.g. to save the best checkpoint.
        print_fn: where decisions are reported.
    """

    def __init__(self, optimizer, *, monitor: str = "val_auc", min_delta: float = 1e-6, factor: float = 0.5,
                 min_lr: float = 1e-6, patience: int = 2, on_improvement: Callable[[int], None] | None = None,
                 print_fn: Callable[[str], None] = print):
        super().__init__()
        if patience < 1:
            raise ValueError(f"`patience` must be >= 1. Received: patience={patience}")
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"`factor` must be in (0, 1]. Received: factor={factor}")
        self.optimizer = optimizer
        self.monitor = monitor
        self.min_delta = float(min_delta)
        self.factor = float(factor)
        self.min_lr = float(min_lr)
        self.patience = int(patience)
        self.on_improvement = on_improvement
        self.print_fn = print_fn
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self.best_weights: list[np.ndarray] | None = None

    # ---- state for the backup ------------------------------------------

    def get_state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "stopped_epoch": self.stopped_epoch}

    def set_state(self, state: dict) -> None:
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.wait = int(state["wait"])
        self.stopped_epoch = state["stopped_epoch"]

    @property
    def learning_rate(self) -> float:
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

    # ---- callback ------------------------------------------------------

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        if self.monitor not in logs:
            raise KeyError(f"PlateauSchedule: `{self.monitor}` is not in the epoch's logs {sorted(logs)}.")
        value = float(logs[self.monitor])
        if math.isnan(value):
            raise ValueError(f"PlateauSchedule: `{self.monitor}` is NaN at epoch {epoch + 1}.")
        if self.best is None or value >= self.best + self.min_delta:
            previous = self.best
            self.best, self.best_epoch, self.wait = value, epoch, 0
            self.best_weights = self.model.get_weights()
            if previous is not None:
                self.print_fn(f"  {self.monitor} improved {_fmt(previous)} -> {_fmt(value)}: best epoch {epoch + 1}")
            if self.on_improvement is not None:
                self.on_improvement(epoch)
        else:
            self.wait += 1
            old = self.learning_rate
            new = max(old * self.factor, self.min_lr)
            self.optimizer.learning_rate = new
            self.print_fn(f"  {self.monitor} {_fmt(value)} did not improve on {_fmt(self.best)} "
                          f"(epoch {self.best_epoch + 1}) by {self.min_delta:g}: learning rate "
                          f"{old:.3g} -> {new:.3g}; {self.wait}/{self.patience} epochs of patience used")
            if self.wait >= self.patience:
                self.stopped_epoch = epoch
                self.model.stop_training = True
                self.print_fn(f"  early stop after epoch {epoch + 1}: best {self.monitor} {_fmt(self.best)} "
                              f"at epoch {self.best_epoch + 1}")
        logs["best_" + self.monitor] = self.best

    def restore_best(self) -> None:
        """Sets the model's weights to the best epoch's (no-op before any epoch)."""
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


class History(keras.callbacks.Callback):
    """Records every epoch's logs (1-based ``epoch``, ``seconds``) as plain floats."""

    def __init__(self):
        super().__init__()
        self.records: list[dict] = []
        self._start = None

    def get_state(self) -> list[dict]:
        return list(self.records)

    def set_state(self, records: Sequence[dict]) -> None:
        self.records = [dict(r) for r in records]

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        rec = {"epoch": epoch + 1}
        for k, v in (logs or {}).items():
            try:
                rec[k] = None if v is None else float(v)
            except (TypeError, ValueError):  # not a scalar: not part of the history
                continue
        rec["seconds"] = time.perf_counter() - self._start if self._start is not None else None
        self.records = [r for r in self.records if r["epoch"] != epoch + 1] + [rec]


class ProgressLogger(keras.callbacks.Callback):
    """Shows the progress of training within an epoch, and a line after every epoch.

    On an interactive terminal (``interactive=True``) a Keras progress bar is
    redrawn as steps end (steps done, time left, running loss and AUC). In a
    log or CI output, a plain line is printed every ``every_steps`` steps (0:
    never) and whenever ``every_seconds`` seconds have passed since the last
    line (0: never), whichever comes first. Expects ``logs`` with ``loss``
    (and ``auc``) at step ends, the exact validation metrics and ``lr`` at
    epoch ends.

    Args:
        epochs, steps_per_epoch, global_batch_size: for the counts and the
            throughput shown.
        every_steps, every_seconds: when to print a line (not interactive).
        interactive: draw a progress bar instead of lines (on standard output).
        print_fn: where lines go.
        clock: seconds (``time.perf_counter``), for tests.
    """

    def __init__(self, *, epochs: int, steps_per_epoch: int, global_batch_size: int, every_steps: int = 100,
                 every_seconds: float = 30.0, interactive: bool = False, print_fn: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.perf_counter):
        super().__init__()
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.global_batch_size = global_batch_size
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.interactive = interactive
        self.print_fn = print_fn
        self.clock = clock
        self._epoch = 0
        self._t0 = None
        self._last = None
        self._bar = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._t0 = self.clock()
        self._last = (self._t0, 0)
        if self.interactive:
            self.print_fn(f"epoch {epoch + 1}/{self.epochs}")
            self._bar = keras.utils.Progbar(self.steps_per_epoch, stateful_metrics=("loss", "auc"))

    def on_train_batch_end(self, batch, logs=None):
        step = batch + 1
        logs = logs or {}
        values = [(k, float(logs[k])) for k in ("loss", "auc") if k in logs]
        if self._bar is not None:
            self._bar.update(step, values)
            return
        now = self.clock()
        t_last, s_last = self._last
        due_by_steps = self.every_steps and step // self.every_steps > s_last // self.every_steps
        due_by_time = self.every_seconds and now - t_last >= self.every_seconds
        if not (due_by_steps or due_by_time):
            return
        rate = (step - s_last) * self.global_batch_size / max(now - t_last, 1e-9)
        self._last = (now, step)
        parts = [f"epoch {self._epoch + 1}/{self.epochs}", f"step {step}/{self.steps_per_epoch}"]
        parts += [f"{k} {_fmt(v)}" for k, v in values]
        parts.append(f"{rate:,.0f} examples/s")
        self.print_fn("  ".join(parts))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self._bar = None  # it ended its line at the epoch's last step
        secs = self.clock() - self._t0 if self._t0 is not None else float("nan")
        keys = ["loss", "logloss", "auc", "val_auc", "val_logloss", "val_gauc", "lr"]
        keys += sorted(k for k in logs if k not in keys)  # e.g. test_auc from --monitor_splits
        parts = [f"{k} {_fmt(float(logs[k]))}" for k in keys if logs.get(k) is not None]
        self.print_fn(f"epoch {epoch + 1}/{self.epochs} done in {secs:.1f}s: " + "  ".join(parts))


class TensorBoardLogger(keras.callbacks.Callback):
    """Writes scalars for TensorBoard: ``log_dir/train`` (loss, logloss, auc, lr) and ``log_dir/valid``.

    Step-level training loss goes under ``batch_loss`` against the global
    step; epoch-level scalars against the 1-based epoch.
    """

    def __init__(self, log_dir: str, *, steps_per_epoch: int):
        super().__init__()
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self._tf = tf
        # The scalars plugin's metadata, as tensorboard.summary.scalar writes
        # it; tf.summary.write needs no TensorBoard installed.
        self._metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        self.log_dir = log_dir
        self.steps_per_epoch = steps_per_epoch
        self._train = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
        self._valid = tf.summary.create_file_writer(os.path.join(log_dir, "valid"))
        self._epoch = 0

    def _scalar(self, tag: str, value, step: int) -> None:
        self._tf.summary.write(tag, self._tf.constant(float(value), self._tf.float32), step=step,
                               metadata=self._metadata)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if logs and "loss" in logs:
            with self._train.as_default():
                self._scalar("batch_loss", logs["loss"], self._epoch * self.steps_per_epoch + batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        with self._train.as_default():
            for k in ("loss", "logloss", "auc", "lr"):
                if logs.get(k) is not None:
                    self._scalar(k, logs[k], epoch + 1)
        with self._valid.as_default():
            for k, v in logs.items():
                if k.startswith("val_") and v is not None:
                    self._scalar(k[4:], v, epoch + 1)
        self._train.flush()
        self._valid.flush()

    def on_train_end(self, logs=None):
        self._train.close()
        self._valid.close()


# --------------------------------------------------------------------------
# Backup: the whole training state, for resuming a killed run
# --------------------------------------------------------------------------


def save_variables(path: str, variables: Sequence) -> None:
    """Saves variables' values to ``path`` (``.npz``) atomically, with their paths."""
    arrays = {f"v{i:05d}": np.asarray(keras.ops.convert_to_numpy(v)) for i, v in enumerate(variables)}
    arrays["paths"] = np.asarray([getattr(v, "path", getattr(v, "name", str(i))) for i, v in enumerate(variables)])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def load_variables(path: str, variables: Sequence) -> None:
    """Assigns the values saved by :func:`save_variables`; shapes and count must match."""
    with _gfile().GFile(path, "rb") as f:
        data = io.BytesIO(f.read())
    with np.load(data) as z:
        paths = [str(p) for p in z["paths"]]
        if len(paths) != len(variables):
            raise ValueError(f"{path}: holds {len(paths)} variables, the model and optimizer have "
                             f"{len(variables)}: it is the backup of a different model.")
        values = [z[f"v{i:05d}"] for i in range(len(paths))]
    for v, value, p in zip(variables, values, paths):
        if tuple(v.shape) != value.shape:
            raise ValueError(f"{path}: variable {p} has shape {value.shape}, the model's "
                             f"{getattr(v, 'path', '?')} has {tuple(v.shape)}: a different model.")
    for v, value in zip(variables, values):
        v.assign(value)


class TrainingBackup(keras.callbacks.Callback):
    """Backs up the training state after every epoch; :meth:`restore` resumes from it.

    Args:
        backup_dir: where to write (the chief: ``model_dir/backup``; other
            workers: a temporary directory).
        variables: callable returning every variable to save: the model's
            (``model.variables``: weights, batch-norm statistics, dropout
            seeds) and the optimizer's (step, learning rate, moments).
        state_fn: callable returning the JSON-able state of the stateful
            callbacks, stored under ``"callbacks"``.
        best_epoch_fn: callable returning the best epoch so far (0-based) or
            ``None``; that epoch's file is kept so the best weights survive.
    """

    def __init__(self, backup_dir: str, *, variables: Callable[[], Sequence],
                 state_fn: Callable[[], dict], best_epoch_fn: Callable[[], int | None]):
        super().__init__()
        self.backup_dir = backup_dir
        self.variables = variables
        self.state_fn = state_fn
        self.best_epoch_fn = best_epoch_fn

    @staticmethod
    def epoch_file(epoch: int) -> str:
        return f"epoch-{epoch + 1:05d}.npz"

    def on_epoch_end(self, epoch, logs=None):
        gfile = _gfile()
        gfile.makedirs(self.backup_dir)
        name = self.epoch_file(epoch)
        save_variables(os.path.join(self.backup_dir, name), self.variables())
        best = self.best_epoch_fn()
        state = {
            "next_epoch": epoch + 1,
            "stopped": bool(getattr(self.model, "stop_training", False)),
            "latest": name,
            "best": self.epoch_file(best) if best is not None else None,
            "callbacks": self.state_fn(),
        }
        write_json(os.path.join(self.backup_dir, BACKUP_STATE), state)
        keep = {name, state["best"], BACKUP_STATE}
        for f in gfile.listdir(self.backup_dir):
            if f.rstrip("/") not in keep:
                gfile.remove(os.path.join(self.backup_dir, f))

    @staticmethod
    def read(backup_dir: str) -> dict | None:
        """The backup's state, or ``None`` when there is none."""
        path = os.path.join(backup_dir, BACKUP_STATE)
        gfile = _gfile()
        if not gfile.exists(path):
            return None
        with gfile.GFile(path, "r") as f:
            return json.load(f)

    @staticmethod
    def restore(backup_dir: str, state: dict, variables: Sequence, weights: Sequence) -> list[np.ndarray] | None:
        """Loads the latest epoch into ``variables``; returns the best epoch's ``weights`` values.

        Args:
            backup_dir: the backup directory.
            state: what :meth:`read` returned.
            variables: every variable, as given to the constructor.
            weights: the model's weights (``model.weights``), a subset of
                ``variables``, whose best-epoch values are returned.
        """
        best = None
        if state.get("best"):
            load_variables(os.path.join(backup_dir, state["best"]), variables)
            best = [np.asarray(keras.ops.convert_to_numpy(w)) for w in weights]
        load_variables(os.path.join(backup_dir, state["latest"]), variables)
        return best
