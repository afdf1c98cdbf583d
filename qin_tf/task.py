"""The training task: what ``python -m qin_tf.train`` does, as functions tests call.

    config -> strategy -> feature spec -> model -> training loop -> exact evaluation -> artefacts

:func:`create_strategy` must run before anything else starts TensorFlow's
runtime (``MultiWorkerMirroredStrategy`` configures collective ops at
startup; logical CPU devices are fixed at startup too); :func:`run` checks
the inputs and ``model_dir``, and a :class:`Trainer` takes the named steps
(start, build, watch, restore, fit = fit_epoch + evaluate, finish) that
leave in ``model_dir``:

    config.json         the resolved ExperimentConfig
    feature_spec.json   a copy of the spec the model was trained on
    data_fingerprint.json  the data the run started on (spec + shard names and sizes)
    checkpoints/        best.weights.h5 (best epoch) and latest.weights.h5 (last epoch)
    backup/             the training state after the last epoch (removed when the run ends)
    logs/               TensorBoard scalars (train/, valid/)
    best.keras          the whole model with the best epoch's weights
    metrics.json        exact AUC, logloss, gAUC of every labelled evaluation split at the
                        best epoch, and the per-epoch history
    curves.png          per-epoch curves and the calibration plot

The training loop
-----------------
A custom loop over ``strategy.run`` rather than ``keras.Model.fit``: Keras 3's
``fit`` cannot take a ``MultiWorkerMirroredStrategy`` dataset of (features,
label) (it all-reduces a batch structure to build the model and fails;
keras-team/keras#20585, #20329). The loop is what ``fit`` does, made
explicit and the same under every strategy:

* Data: ``strategy.distribute_datasets_from_function`` with
  :func:`qin_tf.data.make_dataset` and the input context: every input
  pipeline reads its share and batches ``global_batch_size /
  num_replicas_in_sync``. Each epoch reads ``steps_per_epoch`` batches of an
  endless shuffled stream seeded with ``(seed, epoch)``, so an epoch's data
  depends only on the seed and the epoch: a resumed run sees exactly what
  an uninterrupted one would.
* Loss of a replica: ``sum(BCE) / global_batch_size + sum(L2) /
  num_replicas_in_sync``; gradients summed over replicas equal the
  one-device gradient of the mean loss.
* Gradient clipping by global norm is applied to the gradient summed over
  replicas (Keras' optimizer would clip each replica's part, which differs
  from one device as soon as clipping is active).
* Evaluation after every epoch on the whole validation split, on every
  worker, outside the strategy: exact AUC / logloss / gAUC
  (:mod:`qin_tf.metrics`), identical on all workers, so the learning-rate
  schedule and early stopping decide alike everywhere.
* A NaN or infinite loss stops the run at that step with
  :class:`NonFiniteLossError`.

Only the chief writes ``model_dir``; other workers write to a temporary
directory that is removed at the end. Resuming reads ``model_dir/backup``
on every worker (``model_dir`` must be shared, as for Keras'
``BackupAndRestore``), and only on the data the run started on: the
fingerprint of the feature spec and of its shards' names and sizes
(:func:`data_fingerprint`) must match, wherever ``--data_dir`` now is.

A shard that does not read back (``DataLossError``) stops the run with
:class:`TrainingError` naming the file and the record.

A worker that dies (its sockets close) or freezes (the coordination service
misses its heartbeats) makes the other workers' collectives fail; each of
them stops with :class:`ClusterError`, one line naming the peer and saying
to restart every worker with the same ``TF_CONFIG``, which resumes from the
backup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Callable, Sequence

for _k, _v in (("TF_CPP_MIN_LOG_LEVEL", "2"), ("KERAS_BACKEND", "tensorflow"), ("GRPC_VERBOSITY", "ERROR")):
    os.environ.setdefault(_k, _v)

from qin_tf.runtime import import_tensorflow, resolve_dtype_policy, silenced_stderr  # noqa: E402

with silenced_stderr():
    # Imported, not started: create_strategy() may still configure the runtime.
    import keras  # noqa: E402
    import numpy as np  # noqa: E402
    import tensorflow as tf  # noqa: E402

from qin_tf import callbacks as qcb  # noqa: E402
from qin_tf import fileio  # noqa: E402
from qin_tf import metrics as qmetrics  # noqa: E402
from qin_tf import report  # noqa: E402
from qin_tf import warm_start  # noqa: E402
from qin_tf.config import RESUMABLE_CHANGES, ExperimentConfig, STRATEGIES  # noqa: E402
from qin_tf.cli import error_line  # noqa: E402
from qin_tf.data import find_unreadable_record, make_dataset, model_inputs  # noqa: E402
from qin_tf.model import build_model  # noqa: E402
from qin_tf.signatures import MODEL_FILENAME, OUTPUT  # noqa: E402
from qin_tf.spec import SPEC_FILENAME, FeatureSpec, SpecError  # noqa: E402

CONFIG_FILENAME = "config.json"
METRICS_FILENAME = "metrics.json"
CURVES_FILENAME = "curves.png"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = "best.weights.h5"
LATEST_CHECKPOINT = "latest.weights.h5"
BACKUP_DIR = "backup"
LOG_DIR = "logs"
FINGERPRINT_FILENAME = "data_fingerprint.json"
#: What a run writes into model_dir (removed by --overwrite before starting over).
ARTEFACTS = (CONFIG_FILENAME, SPEC_FILENAME, CHECKPOINT_DIR, BACKUP_DIR, LOG_DIR, MODEL_FILENAME,
             METRICS_FILENAME, CURVES_FILENAME, FINGERPRINT_FILENAME, warm_start.WARM_START_FILENAME)
#: The metric that selects the best epoch (on ``TrainConfig.valid_split``).
MONITOR = "val_auc"


class TrainingError(RuntimeError):
    """A run cannot go on; the message says why and what to do. The CLI exits with status 1."""


class NonFiniteLossError(TrainingError):
    """The training loss became NaN or infinite."""


class ClusterError(TrainingError):
    """A collective operation failed: another worker stopped or cannot be reached."""


#: What a collective operation raises when a peer is gone (closed socket,
#: reset connection, aborted collectives) or does not answer in time.
COLLECTIVE_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                     tf.errors.CancelledError)


_PEER_PATTERNS = (r"remote target /job:(\w+)/replica:\d+/task:(\d+)",  # a closed or reset connection
                  r"Error reported from /job:(\w+)/(?:replica:\d+/)?task:(\d+)",  # the coordination service
                  r"stopped sending heartbeats\):\s*/job:(\w+)/replica:\d+/task:(\d+)")


def _collective_failure(error: tf.errors.OpError, *, label: str, epoch: int, step: int, model_dir: str) -> str:
    """One line: which worker lost the cluster where, which peer, why (TensorFlow's words), what to do."""
    text = error.message or str(error)
    peer = next((m for m in (re.search(p, text) for p in _PEER_PATTERNS) if m), None)
    cause = re.search(r"aborted by: (.*)", text, re.S)
    cause = cause.group(1) if cause else text
    cause = re.split(r"\n(?:Additional GRPC error|The error could be from|The tasks have crashed)", cause)[0]
    cause = re.sub(r"\s*\[type\.googleapis\.com[^\]]*\]", "", " ".join(cause.split()))
    who = label.strip().strip("[]") or "this worker"
    state = qcb.TrainingBackup.read(os.path.join(model_dir, BACKUP_DIR))
    resume = (f"training resumes from the backup in {os.path.join(model_dir, BACKUP_DIR)} "
              f"({state['next_epoch']} epochs done)" if state else "no epoch had finished, so training starts over")
    return (f"{who} lost the cluster at epoch {epoch + 1}, step {step + 1}: a collective operation failed"
            f"{f' (peer: {peer.group(1)} {peer.group(2)})' if peer else ''}: {type(error).__name__}: {cause}. "
            f"Another worker stopped or cannot be reached, and MultiWorkerMirroredStrategy cannot go on "
            f"without it. Restart every worker with the same TF_CONFIG: {resume}.")


# --------------------------------------------------------------------------
# Strategy
# --------------------------------------------------------------------------


def _tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise TrainingError(f"TF_CONFIG is not valid JSON: {e}") from None


def _cluster_size(tf_config: dict) -> int:
    cluster = tf_config.get("cluster", {})
    return sum(len(cluster.get(job, [])) for job in ("chief", "worker"))


def _split_cpu(n: int) -> None:
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != n:
            raise TrainingError(
                f"cannot split the CPU into {n} logical devices: TensorFlow has already started with "
                f"{have}. Split it before anything uses TensorFlow (python -m qin_tf.train "
                f"--logical_cpus={n} does).") from None


def create_strategy(name: str = "auto", *, logical_cpus: int = 0) -> tf.distribute.Strategy:
    """Creates the distribution strategy (call it before anything else runs TensorFlow).

    Args:
        name: ``auto`` (``multi_worker`` if ``TF_CONFIG`` names more than one
            task, ``mirrored`` if there is more than one GPU, else
            ``one_device``), ``one_device`` (the first GPU, else the CPU),
            ``mirrored`` (all local GPUs, else all logical CPUs) or
            ``multi_worker`` (``MultiWorkerMirroredStrategy`` over the cluster
            in ``TF_CONFIG``).
        logical_cpus: if > 0, split the host CPU into this many logical
            devices first (to run ``mirrored`` without GPUs, as the tests do).
    """
    if name not in STRATEGIES:
        raise TrainingError(f"`strategy` must be one of {STRATEGIES}. Received: strategy={name!r}")
    tf_config = _tf_config()
    with silenced_stderr():
        if logical_cpus:
            _split_cpu(logical_cpus)
        gpus = tf.config.list_physical_devices("GPU")
        if name == "auto":
            name = "multi_worker" if _cluster_size(tf_config) > 1 else ("mirrored" if len(gpus) > 1
                                                                       else "one_device")
        if name == "multi_worker":
            if _cluster_size(tf_config) < 1:
                raise TrainingError("--strategy=multi_worker reads the cluster from the TF_CONFIG environment "
                                    "variable, which names no chief or worker tasks.")
            try:
                strategy = tf.distribute.MultiWorkerMirroredStrategy()
            except RuntimeError as e:
                if "startup" in str(e):
                    raise TrainingError("MultiWorkerMirroredStrategy must be created before TensorFlow starts: "
                                        "run training in a fresh process (python -m qin_tf.train).") from None
                raise
        elif name == "mirrored":
            devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
            strategy = tf.distribute.MirroredStrategy(devices=[d.name for d in devices])
        else:
            strategy = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    import_tensorflow()
    return strategy


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "multi_worker"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "mirrored"
    return "one_device"


def worker_info(strategy: tf.distribute.Strategy) -> tuple[bool, str]:
    """``(is_chief, label)`` of this process: the chief writes model_dir."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True, ""
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None:
        return True, ""
    jobs = resolver.cluster_spec().as_dict()
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in jobs)
    return chief, f"[{task_type} {task_id}] "


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def _probabilities(outputs):
    """The model's ``ctr`` output as ``[batch]`` float32."""
    if isinstance(outputs, dict):
        outputs = outputs[OUTPUT]
    outputs = tf.cast(outputs, tf.float32)
    if outputs.shape.rank == 2:
        outputs = tf.squeeze(outputs, axis=-1)
    return outputs


class SplitEvaluator:
    """Predicts a whole labelled split in row order and computes exact metrics.

    Runs on the local default device, outside any strategy (every worker
    computes the same numbers). Parsed batches are cached in memory after
    the first pass.
    """

    def __init__(self, spec: FeatureSpec, split: str, batch_size: int):
        self.spec = spec
        self.split = split
        self.group = spec.meta[0] if spec.meta else None
        self.dataset = make_dataset(spec, split, batch_size, training=False, with_meta=True, labelled=True,
                                    cache=True)
        self._fn = None
        self._model = None

    def predict(self, model) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Returns ``(labels, predictions, groups)`` of every row of the split."""
        if self._fn is None or self._model is not model:
            self._model = model
            self._fn = tf.function(lambda x: _probabilities(model(x, training=False)), reduce_retracing=True)
        labels, preds, groups = [], [], []
        for features, label in self.dataset:
            preds.append(self._fn(model_inputs(self.spec, features)).numpy())
            labels.append(label.numpy())
            if self.group is not None:
                groups.append(features[self.group].numpy())
        if not labels:
            raise TrainingError(f"split `{self.split}` has no rows to evaluate.")
        return (np.concatenate(labels), np.concatenate(preds).astype(np.float64),
                np.concatenate(groups) if groups else None)

    def evaluate(self, model) -> tuple[dict, dict]:
        """Returns ``(metrics, calibration bins)``; see :func:`qin_tf.metrics.evaluate`."""
        y, p, g = self.predict(model)
        if not np.all(np.isfinite(p)):
            raise NonFiniteLossError(
                f"the model predicts NaN or infinite values on split `{self.split}` "
                f"({int(np.sum(~np.isfinite(p)))} of {p.size} rows): training diverged. "
                f"Try a lower --learning_rate.")
        return qmetrics.evaluate(y, p, g), qmetrics.calibration_bins(y, p)


# --------------------------------------------------------------------------
# The training step
# --------------------------------------------------------------------------


def _scale(grad, factor):
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values * tf.cast(factor, grad.values.dtype), grad.indices, grad.dense_shape)
    return grad * tf.cast(factor, grad.dtype)


def _squared_norm(grad):
    """||g||^2 of the dense gradient (IndexedSlices: duplicate indices summed first)."""
    if isinstance(grad, tf.IndexedSlices):
        unique, idx = tf.unique(grad.indices)
        values = tf.math.unsorted_segment_sum(grad.values, idx, tf.size(unique))
        return tf.reduce_sum(tf.square(tf.cast(values, tf.float32)))
    return tf.reduce_sum(tf.square(tf.cast(grad, tf.float32)))


def make_optimizer(learning_rate: float, dtype_policy: str | None = None) -> keras.optimizers.Optimizer:
    """Adam; under ``mixed_float16`` wrapped in Keras' ``LossScaleOptimizer``.

    ``dtype_policy`` is the model's (none: Keras' global policy). The loss
    scale is dynamic (Keras' defaults: 2**15 at first; a step whose gradient
    is not finite is skipped and halves it, 2,000 finite steps in a row double
    it): float16 gradients of the scaled loss do not underflow.
    ``mixed_bfloat16`` needs no scaling (bfloat16 has float32's range).
    """
    adam = keras.optimizers.Adam(learning_rate=learning_rate)
    if (dtype_policy or keras.config.dtype_policy().name) == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(adam)
    return adam


class TrainLoop:
    """``steps`` training steps per call, in one ``tf.function``, under ``strategy``.

    Call :meth:`run` with a distributed iterator and a step count; it returns
    ``(sum of step losses, steps done, last step loss)`` and stops early at
    the first non-finite step loss. The metrics ``auc`` and ``logloss`` (the
    loss without L2) accumulate over the steps until reset.

    With a ``LossScaleOptimizer`` (``mixed_float16``, see :func:`make_optimizer`)
    the gradient is taken of the scaled loss, clipped at ``clipnorm`` times
    the scale, and the optimizer unscales it, or skips the step and lowers
    the scale when it is not finite; the reported loss is the unscaled one.
    """

    def __init__(self, model: keras.Model, optimizer, strategy: tf.distribute.Strategy, *,
                 global_batch_size: int, clipnorm: float | None):
        self.model = model
        self.optimizer = optimizer
        self.strategy = strategy
        self.global_batch_size = global_batch_size
        self.clipnorm = clipnorm
        with strategy.scope():
            self.auc = keras.metrics.AUC(num_thresholds=200, name="auc")
            self.logloss = keras.metrics.BinaryCrossentropy(name="logloss")  # the loss without L2
        self.run = tf.function(self._run)

    def _clip(self, grads, loss_scale=None):
        """Scales every replica's gradient so that their SUM has global norm <= clipnorm.

        With ``loss_scale`` (the gradients are of the scaled loss) the bound is
        ``clipnorm * loss_scale``, and a non-finite sum makes every replica's
        gradient NaN, so that all replicas skip the step alike (one replica's
        overflow would otherwise reach the others only through the sum)."""
        present = [g for g in grads if g is not None]
        replicas = self.strategy.num_replicas_in_sync
        total = tf.distribute.get_replica_context().all_reduce("sum", present) if replicas > 1 else present
        norm = tf.sqrt(tf.add_n([_squared_norm(g) for g in total]))
        if self.clipnorm:
            bound = self.clipnorm if loss_scale is None else self.clipnorm * loss_scale
            factor = bound / tf.maximum(norm, bound)  # NaN norm -> NaN factor -> NaN loss next
        else:
            factor = tf.constant(1.0)
        if loss_scale is not None:
            factor = tf.where(tf.math.is_finite(norm), factor, float("nan"))
        return [_scale(g, factor) for g in grads]

    def _replica_step(self, features, labels):
        model = self.model
        scaled = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        with tf.GradientTape() as tape:
            probs = _probabilities(model(features, training=True))
            per_example = keras.ops.binary_crossentropy(labels, probs)
            loss = tf.reduce_sum(per_example) / self.global_batch_size
            if model.losses:
                loss += tf.add_n([tf.cast(x, tf.float32) for x in model.losses]) / \
                    self.strategy.num_replicas_in_sync
            target = self.optimizer.scale_loss(loss) if scaled else loss
        variables = model.trainable_variables
        grads = tape.gradient(target, variables)
        if self.clipnorm or (scaled and self.strategy.num_replicas_in_sync > 1):
            grads = self._clip(grads, tf.identity(self.optimizer.dynamic_scale) if scaled else None)
        self.optimizer.apply(grads, variables)
        self.auc.update_state(labels, probs)
        self.logloss.update_state(labels, probs)
        return loss

    def _run(self, iterator, steps):
        total = tf.constant(0.0)
        last = tf.constant(0.0)
        done = tf.constant(0)
        for _ in tf.range(steps):
            features, labels = next(iterator)
            per_replica = self.strategy.run(self._replica_step, args=(features, labels))
            last = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
            total += last
            done += 1
            if not tf.math.is_finite(last):
                break
        return total, done, last


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    """What :func:`run` returns: the model (best weights) and, on the chief, the metrics."""

    model: keras.Model
    metrics: dict | None
    history: list[dict]
    is_chief: bool
    num_replicas_in_sync: int


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed + 1_000_003 * (epoch + 1)) % (2 ** 31 - 1)


def _config_diff(a: dict, b: dict) -> list[str]:
    out = []
    for section in ("model", "train"):
        sa, sb = a.get(section, {}), b.get(section, {})
        for k in sorted(set(sa) | set(sb)):
            if section == "train" and k in RESUMABLE_CHANGES:
                continue
            if sa.get(k) != sb.get(k):
                out.append(f"{section}.{k}: {sa.get(k)!r} -> {sb.get(k)!r}")
    return out


def _check_spec(spec: FeatureSpec, tc) -> None:
    for split in (tc.train_split, tc.valid_split, *tc.monitor_splits):
        if split not in spec.splits:
            raise TrainingError(f"{tc.data_dir}: the feature spec has no split `{split}` "
                                f"(it has {sorted(spec.splits)}).")
        if not spec.splits[split].labelled:
            raise TrainingError(f"split `{split}` has no labels; --train_split, --valid_split and "
                                f"--monitor_splits need labels.")
        if spec.splits[split].num_rows < 1:
            raise TrainingError(f"split `{split}` of {tc.data_dir} has no rows.")


def data_fingerprint(spec: FeatureSpec) -> dict:
    """What identifies the data of a run, cheaply: the feature spec and its shards' names and sizes.

    Returns ``{"fingerprint": sha256 hex, "data_dir", "spec", "files": {name: bytes}}``.
    The directory is not part of the fingerprint (a moved copy is the same
    data); no shard is read (gigabytes are not hashed).
    """
    files = {}
    for split in sorted(spec.splits):
        for name in spec.splits[split].files:
            try:
                files[name] = int(tf.io.gfile.stat(spec.path(name)).length)
            except tf.errors.NotFoundError:
                files[name] = None
    text = json.dumps({"spec": spec.to_dict(), "files": files}, sort_keys=True)
    body = json.loads(text)  # as it reads back from the file: lists, not tuples
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return {"fingerprint": digest, "data_dir": fileio.absolute(spec.base_dir), **body}


def _check_same_data(model_dir: str, spec: FeatureSpec, data_dir: str) -> None:
    """Refuses to resume the run in ``model_dir`` on data other than the data it started on."""
    path = os.path.join(model_dir, FINGERPRINT_FILENAME)
    if tf.io.gfile.exists(path):
        saved = fileio.read_json(path)
    elif tf.io.gfile.exists(os.path.join(model_dir, SPEC_FILENAME)):  # a run started before fingerprints
        saved = {"spec": fileio.read_json(os.path.join(model_dir, SPEC_FILENAME)), "files": None,
                 "data_dir": "(not recorded)"}
    else:
        return
    now = data_fingerprint(spec)
    if saved.get("fingerprint", now["fingerprint"]) == now["fingerprint"] and saved["spec"] == now["spec"]:
        return
    def differing(a: dict, b: dict) -> list[str]:
        return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))

    if saved["spec"] != now["spec"]:
        what = f"the feature specs differ in {', '.join(differing(saved['spec'], now['spec']))}"
    else:
        names = differing(saved["files"], now["files"])
        what = f"the shards differ: {', '.join(names[:3])}" + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise TrainingError(f"{model_dir} holds an unfinished run that started on other data than --data_dir="
                        f"{data_dir} ({what}; it started on {saved['data_dir']}). Resume it with the data it "
                        f"started on, or use another --model_dir.")


def _data_loss(spec: FeatureSpec, tc, error: tf.errors.DataLossError) -> TrainingError:
    """The error of a shard that does not read back, naming the file and the record."""
    splits = [tc.train_split, tc.valid_split, *tc.monitor_splits]
    found = find_unreadable_record(spec, splits + [s for s in spec.splits if s not in splits])
    if found is None:
        return TrainingError(f"{tc.data_dir}: unreadable TFRecord data ({error_line(error)})")
    path, record, message = found
    return TrainingError(f"{path}: record {record}: corrupt TFRecord data ({message})")


def _save_weights_atomic(model: keras.Model, path: str) -> None:
    tmp = path[: -len(".weights.h5")] + ".tmp.weights.h5"
    model.save_weights(tmp)
    fileio.replace(tmp, path)


def run(config: ExperimentConfig, *, strategy: tf.distribute.Strategy | None = None,
        callbacks: Sequence[keras.callbacks.Callback] = (),
        print_fn: Callable[[str], None] | None = None,
        export_fn: Callable[[str], str] | None = None) -> TrainResult:
    """Trains, evaluates and writes every artefact (see the module docstring).

    Args:
        config: the resolved configuration.
        strategy: from :func:`create_strategy`; default: created from
            ``config.train.strategy`` (only possible while TensorFlow has not
            started, for ``multi_worker``).
        callbacks: more Keras callbacks, called after the built-in ones.
        print_fn: progress output; default: print to stdout, with a progress
            bar within epochs if stdout is a terminal (else periodic lines).
        export_fn: with ``config.train.export_base``, what exports the
            finished run: called on the chief with ``model_dir`` once
            ``metrics.json`` is written (before the backup is removed, so a
            failed export leaves a run that the same command resumes and
            exports again); returns the version directory, recorded in
            ``metrics.json`` as ``export``. The training command
            (:mod:`qin_tf.train`) passes one; this library does not import
            ``export/``.

    Returns:
        A :class:`TrainResult`; the model holds the best epoch's weights.

    Raises:
        TrainingError: on a missing/bad input, a model_dir that holds a
            finished or different run, or a diverged (NaN) loss.
    """
    tc = config.train
    if not tc.data_dir:
        raise TrainingError("--data_dir is required: the output directory of pipelines.preprocess.")
    if not tc.model_dir:
        raise TrainingError("--model_dir is required: where the run writes checkpoints and results.")
    if tc.export_base and export_fn is None:
        raise TrainingError("--export_base needs an export_fn: python -m qin_tf.train passes one "
                            "(qin_tf.task does not import export/).")
    try:
        spec = FeatureSpec.load(tc.data_dir)
    except SpecError as e:
        raise TrainingError(str(e)) from None
    _check_spec(spec, tc)

    strategy = strategy or create_strategy(tc.strategy)
    import_tensorflow()
    chief, label = worker_info(strategy)
    base_print = print_fn or (lambda s: print(s, flush=True))
    say = (lambda s: base_print(label + s)) if label else base_print
    replicas = strategy.num_replicas_in_sync
    if tc.global_batch_size % replicas:
        raise TrainingError(f"--global_batch_size={tc.global_batch_size} is not divisible by the "
                            f"{replicas} replicas in sync.")

    config, why = _resolve_dtype_policy(config)
    if why:
        say(f"dtype policy {config.model.dtype_policy} ({why})")
    state, source = _prepare_model_dir(config, spec, chief)
    write_dir = tc.model_dir if chief else tempfile.mkdtemp(prefix="qin_tf_worker_")
    trainer = Trainer(config, spec, strategy, chief=chief, write_dir=write_dir, say=say, label=label,
                      callbacks=list(callbacks), interactive=print_fn is None and sys.stdout.isatty(),
                      warm_source=source)
    try:
        return trainer.run(state, export_fn=export_fn if tc.export_base else None)
    except warm_start.WarmStartError as e:
        raise TrainingError(str(e)) from None
    except tf.errors.DataLossError as e:
        raise _data_loss(spec, tc, e) from None
    finally:
        if not chief:
            fileio.remove(write_dir)


def _resolve_dtype_policy(config: ExperimentConfig) -> tuple[ExperimentConfig, str | None]:
    """``(config, why)``: ``config`` with ``--dtype_policy=auto`` made concrete, and why (``None``
    when the policy was not ``auto``). An unfinished run in ``model_dir`` keeps the policy it
    started with (written in its config.json); a new one takes this machine's
    (:func:`~qin_tf.runtime.resolve_dtype_policy`)."""
    if config.model.dtype_policy != "auto":
        return config, None
    policy = why = None
    model_dir = config.train.model_dir
    saved_path = os.path.join(model_dir, CONFIG_FILENAME)
    if tf.io.gfile.exists(os.path.join(model_dir, BACKUP_DIR)) and tf.io.gfile.exists(saved_path):
        saved = (fileio.read_json(saved_path).get("model") or {}).get("dtype_policy")
        if saved in ("float32", "mixed_bfloat16"):
            policy, why = saved, "auto: the policy the unfinished run in --model_dir started with"
    if policy is None:
        policy, why = resolve_dtype_policy("auto")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, dtype_policy=policy)), why


def _prepare_model_dir(config: ExperimentConfig, spec: FeatureSpec, chief: bool):
    """``(state, source)``: the backup state of an unfinished run to resume (checked: same
    configuration, same data), else ``None``; and for a fresh run with ``--warm_start_from``, the
    checked :class:`~qin_tf.warm_start` source, else ``None``. With ``--overwrite``, the chief
    removes a finished run's artefacts first."""
    tc = config.train
    model_dir = tc.model_dir
    state = qcb.TrainingBackup.read(os.path.join(model_dir, BACKUP_DIR))
    source = None
    if state is None and tc.warm_start_from:  # a resumed run's backup holds the warm-started weights
        try:  # loaded and checked before anything is written or removed
            source = warm_start.load_source(tc.warm_start_from, spec, config.model, model_dir=model_dir)
        except warm_start.WarmStartError as e:
            raise TrainingError(str(e)) from None
    if state is not None:
        saved_path = os.path.join(model_dir, CONFIG_FILENAME)
        if tf.io.gfile.exists(saved_path):
            diff = _config_diff(fileio.read_json(saved_path), config.to_dict())
            if diff:
                raise TrainingError(f"{model_dir} holds an unfinished run with a different configuration "
                                    f"({'; '.join(diff)}). Resume it with the same configuration, or use "
                                    f"another --model_dir.")
        _check_same_data(model_dir, spec, tc.data_dir)
    elif chief and tf.io.gfile.exists(os.path.join(model_dir, METRICS_FILENAME)):
        if not tc.overwrite:
            raise TrainingError(f"{model_dir} holds a finished run ({METRICS_FILENAME} exists). Pass "
                                f"--overwrite to replace it, or use another --model_dir.")
        for name in ARTEFACTS:
            fileio.remove(os.path.join(model_dir, name))
    return state, source


class _LatestCheckpoint(keras.callbacks.Callback):
    """Saves the model's weights to ``path`` at the end of every epoch."""

    def __init__(self, model: keras.Model, path: str):
        super().__init__()
        self._weights_of = model
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        _save_weights_atomic(self._weights_of, self.path)


class Trainer:
    """One run of the training loop, in named steps; :meth:`run` takes them in order:

        start      write config.json, data_fingerprint.json, feature_spec.json (chief); seed
        build      the model, its optimizer and the training loop (a fresh run's model is made here)
        watch      the evaluators and the callbacks (progress, schedule, history, checkpoints, backup)
        restore    a resumed run: every variable and the callbacks' state from the backup
        fit        fit_epoch + evaluate per epoch, until the last epoch or an early stop
        finish     chief: final evaluation, best.keras, curves.png, metrics.json, export

    ``write_dir`` is ``model_dir`` on the chief and a temporary directory on
    other workers; the backup is read from ``model_dir`` on every worker.
    """

    def __init__(self, config: ExperimentConfig, spec: FeatureSpec, strategy: tf.distribute.Strategy, *,
                 chief: bool, write_dir: str, say: Callable[[str], None], label: str = "",
                 callbacks: Sequence[keras.callbacks.Callback] = (), interactive: bool = False,
                 warm_source=None):
        self.config, self.spec, self.strategy = config, spec, strategy
        self.warm_source = warm_source
        self.tc, self.mc = config.train, config.model
        self.chief, self.write_dir, self.say, self.label = chief, write_dir, say, label
        self.extra_callbacks = list(callbacks)
        self.interactive = interactive
        self.backup_dir = os.path.join(self.tc.model_dir, BACKUP_DIR)
        self.ckpt_dir = os.path.join(write_dir, CHECKPOINT_DIR)
        self.steps = self.tc.steps_per_epoch or math.ceil(spec.splits[self.tc.train_split].num_rows
                                                          / self.tc.global_batch_size)
        # Steps per call of the training function: one, as Keras' fit, so that the progress
        # callbacks see every step. Under multi_worker, as before, as many as between two
        # progress lines: with one, the two-worker test run ended with the chief logging a
        # CoordinationServiceError (worker 1, done, had left while the chief finished) in
        # 3 runs of 3 on a loaded machine; the same error shows, less often, without it.
        self.chunk = (self.tc.log_every_steps or self.steps) if strategy_name(strategy) == "multi_worker" else 1
        # The scores of the splits evaluated at the end of each epoch, and those of the best epoch: the
        # final evaluation reuses them for the best weights instead of predicting the splits again.
        self.scored, self.best_scored = {}, {}

    def run(self, state: dict | None, *, export_fn: Callable[[str], str] | None = None) -> TrainResult:
        """Every step in order; ``state`` is the backup to resume from, or ``None``."""
        self.start()
        self.build()
        self.watch()
        initial_epoch, finished = self.restore(state) if state is not None else (0, False)
        train_seconds = self.fit(initial_epoch, finished)
        metrics = None
        if self.chief:
            metrics = self.finish(train_seconds, export_fn=export_fn)
            fileio.remove(os.path.join(self.write_dir, BACKUP_DIR))
        return TrainResult(model=self.model, metrics=metrics, history=self.history.get_state(),
                           is_chief=self.chief, num_replicas_in_sync=self.strategy.num_replicas_in_sync)

    def start(self) -> None:
        """Writes what identifies the run (chief), seeds every generator and says what runs where."""
        tc, spec, strategy = self.tc, self.spec, self.strategy
        tf.io.gfile.makedirs(self.ckpt_dir)
        if self.chief:
            qcb.write_json(os.path.join(self.write_dir, CONFIG_FILENAME), self.config.to_dict())
            qcb.write_json(os.path.join(self.write_dir, FINGERPRINT_FILENAME), data_fingerprint(spec))
            spec.save(self.write_dir)
        keras.utils.set_random_seed(tc.seed)
        if tc.deterministic:
            tf.config.experimental.enable_op_determinism()
        replicas = strategy.num_replicas_in_sync
        self.say(f"qin-tf: training {self.mc.name} on {tc.data_dir} ({spec.splits[tc.train_split].num_rows:,} "
                 f"train rows, dataset config {spec.dataset}) "
                 f"with {strategy_name(strategy)}, num_replicas_in_sync={replicas}, global batch "
                 f"{tc.global_batch_size} ({tc.global_batch_size // replicas} per replica), "
                 f"{self.steps} steps per epoch")

    def build(self) -> None:
        """The model, its optimizer and the training loop, under the strategy's scope."""
        tc = self.tc
        with self.strategy.scope():
            self.model = model = build_model(self.spec, self.mc)
            # --warm_start_from (a fresh run): the earlier run's weights by name, tables grown.
            warm = warm_start.apply(model, self.spec, self.warm_source) if self.warm_source is not None else None
            self.optimizer = make_optimizer(tc.learning_rate, self.mc.dtype_policy)
            self.optimizer.build(model.trainable_variables)
            self.loop = TrainLoop(model, self.optimizer, self.strategy, global_batch_size=tc.global_batch_size,
                                  clipnorm=tc.clipnorm)
        self.say(f"model {model.name}: {model.count_params():,} parameters "
                 f"({sum(int(np.prod(v.shape)) for v in model.trainable_variables):,} trainable)")
        if warm is not None:
            if self.chief:
                warm_start.write_record(self.write_dir, warm)
            self.say(warm_start.summary(warm))
        self.warm_source = None  # the source weights are not needed any more

    def _variables(self) -> list:
        """Every variable of the training state: the model's, then the optimizer's."""
        return list(self.model.variables) + list(self.optimizer.variables)

    def watch(self) -> None:
        """The evaluators of the validation and monitored splits, and the callbacks, in their order."""
        tc, model = self.tc, self.model
        self.evaluator = SplitEvaluator(self.spec, tc.valid_split, tc.resolved_eval_batch_size)
        self.monitors = {split: SplitEvaluator(self.spec, split, tc.resolved_eval_batch_size)
                         for split in tc.monitor_splits}
        self.plateau = qcb.PlateauSchedule(
            self.optimizer, monitor=MONITOR, min_delta=tc.min_delta, factor=tc.lr_decay_factor,
            min_lr=tc.min_lr, patience=tc.patience, print_fn=self.say, on_improvement=self._on_improvement)
        self.history = qcb.History()
        self.backup = qcb.TrainingBackup(
            os.path.join(self.write_dir, BACKUP_DIR), variables=self._variables,
            state_fn=lambda: {"plateau": self.plateau.get_state(), "history": self.history.get_state()},
            best_epoch_fn=lambda: self.plateau.best_epoch)
        cbs = [qcb.ProgressLogger(epochs=tc.epochs, steps_per_epoch=self.steps,
                                  global_batch_size=tc.global_batch_size, every_steps=tc.log_every_steps,
                                  every_seconds=tc.log_every_seconds, interactive=self.interactive,
                                  print_fn=self.say),
               self.plateau, self.history, _LatestCheckpoint(model, os.path.join(self.ckpt_dir, LATEST_CHECKPOINT)),
               self.backup, qcb.TensorBoardLogger(os.path.join(self.write_dir, LOG_DIR), steps_per_epoch=self.steps),
               *self.extra_callbacks]
        self.callback_list = keras.callbacks.CallbackList(cbs, model=model)

    def _on_improvement(self, epoch) -> None:
        """A better epoch: its weights become best.weights.h5, its scores the best scores."""
        _save_weights_atomic(self.model, os.path.join(self.ckpt_dir, BEST_CHECKPOINT))
        self.best_scored.clear()
        self.best_scored.update(self.scored)

    def restore(self, state: dict) -> tuple[int, bool]:
        """Resumes from the backup: ``(the first epoch to run, whether training had finished)``."""
        best_weights = qcb.TrainingBackup.restore(self.backup_dir, state, self._variables(), self.model.weights)
        self.plateau.set_state(state["callbacks"]["plateau"])
        self.plateau.best_weights = best_weights
        self.history.set_state(state["callbacks"]["history"])
        initial_epoch = int(state["next_epoch"])
        finished = bool(state["stopped"]) or initial_epoch >= self.tc.epochs
        self.say(f"resumed from {self.backup_dir}: {initial_epoch} epochs done"
                 + (" (training had finished)" if finished else ""))
        return initial_epoch, finished

    def fit(self, initial_epoch: int, finished: bool) -> float:
        """Trains and evaluates epoch after epoch; leaves the best weights in the model.

        Returns the seconds it took."""
        model, callback_list = self.model, self.callback_list
        model.stop_training = False
        t_start = time.perf_counter()
        callback_list.on_train_begin()
        epoch = initial_epoch
        while not finished and epoch < self.tc.epochs:
            callback_list.on_epoch_begin(epoch)
            logs = self.fit_epoch(epoch)
            logs.update(self.evaluate())
            callback_list.on_epoch_end(epoch, logs)
            epoch += 1
            if model.stop_training:
                break
        callback_list.on_train_end()
        self.plateau.restore_best()
        return time.perf_counter() - t_start

    def _dataset_fn(self, epoch: int):
        """The input function of one epoch: the endless shuffled stream seeded with (seed, epoch)."""
        spec, tc, seed = self.spec, self.tc, _epoch_seed(self.tc.seed, epoch)

        def dataset_fn(ctx):
            return make_dataset(spec, tc.train_split, tc.global_batch_size, training=True, input_context=ctx,
                                seed=seed, repeat=True, drop_remainder=True)

        return dataset_fn

    def fit_epoch(self, epoch: int) -> dict:
        """Trains one epoch of ``steps`` batches; returns its logs (loss, logloss, auc, lr)."""
        loop, steps = self.loop, self.steps
        loop.auc.reset_state()
        loop.logloss.reset_state()
        lr = self.plateau.learning_rate
        iterator = iter(self.strategy.distribute_datasets_from_function(self._dataset_fn(epoch)))
        done_steps, loss_sum, auc = 0, 0.0, float("nan")
        while done_steps < steps:
            n = min(self.chunk, steps - done_steps)
            total, done, last, auc = self._collective(lambda: self._run_steps(iterator, n), epoch, done_steps)
            if not math.isfinite(last):
                raise self._diverged(last, epoch, done_steps + done, lr)
            done_steps += done
            loss_sum += total
            self.callback_list.on_train_batch_end(done_steps - 1, {"loss": loss_sum / done_steps, "auc": auc})
        logloss = self._collective(lambda: float(loop.logloss.result()), epoch, done_steps)
        return {"loss": loss_sum / steps, "logloss": logloss, "auc": auc, "lr": lr}

    def _run_steps(self, iterator, n: int) -> tuple[float, int, float, float]:
        total, done, last = self.loop.run(iterator, tf.constant(n))
        return float(total), int(done), float(last), float(self.loop.auc.result())

    def _collective(self, fn, epoch: int, step: int):
        """``fn()``; under multi_worker, a failed collective is one line naming the peer and the step.
        Reading the running metrics all-reduces them across the workers, as the step does."""
        try:
            return fn()
        except COLLECTIVE_ERRORS as e:
            if not isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
                raise
            raise ClusterError(_collective_failure(e, label=self.label, epoch=epoch, step=step,
                                                   model_dir=self.tc.model_dir)) from None

    def _diverged(self, loss: float, epoch: int, step: int, lr: float) -> NonFiniteLossError:
        """The error of a non-finite training loss at ``step`` (1-based) of ``epoch``."""
        last_good = (f"the last good state is the backup after epoch {epoch} in {self.backup_dir}" if epoch
                     else "no epoch had finished")
        float16 = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        hint = (" Under mixed_float16 the forward pass may have overflowed float16 (the loss scale only "
                "guards the gradients): try --batch_norm or --dtype_policy=mixed_bfloat16." if float16 else "")
        return NonFiniteLossError(
            f"the training loss is {loss} at epoch {epoch + 1}, step {step} "
            f"(global step {epoch * self.steps + step}): training diverged. Lower "
            f"--learning_rate (now {lr:g}) or check the data; {last_good}.{hint}")

    def evaluate(self) -> dict:
        """Scores the validation and monitored splits with the model's weights now; returns their logs.

        Their scores are kept for the final evaluation, should this epoch be the best."""
        tc = self.tc
        val, cal = self.evaluator.evaluate(self.model)
        self.scored.clear()
        self.scored[tc.valid_split] = (val, cal)
        logs = {f"val_{k}": val[k] for k in ("auc", "logloss", "gauc") if k in val}
        for split, monitor in self.monitors.items():
            m, cal = monitor.evaluate(self.model)
            self.scored[split] = (m, cal)
            logs.update({f"{split}_{k}": m[k] for k in ("auc", "logloss", "gauc") if k in m})
        return logs

    def final_scores(self) -> tuple[dict, dict, dict]:
        """``(metrics, skipped, calibration)`` of the best weights on every labelled evaluation split.

        The splits scored at the end of the best epoch in this process are
        not predicted again."""
        tc, spec, say = self.tc, self.spec, self.say
        splits, skipped, calibration = {}, {}, {}
        order = [tc.valid_split] + sorted(s for s in spec.splits if s not in (tc.train_split, tc.valid_split))
        for split in order:
            if not spec.splits[split].labelled:
                skipped[split] = "unlabelled"
                say(f"split `{split}` has no labels: no metrics")
                continue
            if split in self.best_scored:
                m, cal = self.best_scored[split]
            else:
                m, cal = SplitEvaluator(spec, split, tc.resolved_eval_batch_size).evaluate(self.model)
            splits[split], calibration[split] = m, cal
            say(f"best model on {split}: AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}  "
                f"gAUC {m.get('gauc', float('nan')):.4f}  ({m['num_examples']:,} rows)")
        return splits, skipped, calibration

    def finish(self, train_seconds: float, *, export_fn: Callable[[str], str] | None = None) -> dict:
        """Chief only: final evaluation, best.keras, curves.png, metrics.json, then ``export_fn``."""
        tc, mc, write_dir, plateau = self.tc, self.mc, self.write_dir, self.plateau
        splits, skipped, calibration = self.final_scores()
        tmp = os.path.join(write_dir, "best.tmp.keras")
        self.model.save(tmp)
        fileio.replace(tmp, os.path.join(write_dir, MODEL_FILENAME))
        best_epoch = plateau.best_epoch + 1 if plateau.best_epoch is not None else None
        records = self.history.get_state()
        data_name = os.path.normpath(tc.data_dir) if fileio.is_local(tc.data_dir) else tc.data_dir
        report.plot_curves(records, calibration, os.path.join(write_dir, CURVES_FILENAME), best_epoch=best_epoch,
                           title=f"{mc.name} on {data_name}")
        metrics = {
            "model": mc.name,
            "dataset": self.spec.dataset,
            "best_epoch": best_epoch,
            "epochs_run": len(records),
            "stopped_early": plateau.stopped_epoch is not None,
            "monitor": f"{tc.valid_split} auc",
            "strategy": strategy_name(self.strategy),
            "num_replicas_in_sync": self.strategy.num_replicas_in_sync,
            "train_seconds": train_seconds,
            "splits": splits,
            "skipped_splits": skipped,
            "history": records,
        }
        metrics_path = os.path.join(write_dir, METRICS_FILENAME)
        qcb.write_json(metrics_path, metrics)
        self.say(f"wrote {metrics_path}, {MODEL_FILENAME}, {CURVES_FILENAME}")
        if export_fn is not None:
            path = export_fn(write_dir)
            metrics["export"] = path
            qcb.write_json(metrics_path, metrics)
            self.say(f"exported the best model to {path}")
        return metrics
