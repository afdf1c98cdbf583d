"""Training throughput of QIN: examples/s over fixed steps, seconds per epoch, peak memory.

    python bench/bench_train.py --data_dir=runs/microlens50k/data
    python bench/bench_train.py --data_dir=runs/microlens50k/data --strategy=mirrored --epoch
    python bench/bench_train.py --data_dir=runs/microlens50k/data --steps=3 --profile

Runs the production training step (``qin_tf.task.TrainLoop``: forward,
backward, gradient clipping, Adam, the running AUC) under ``--strategy``
on the reader ``qin_tf.train`` uses (shuffled, repeated, batches of
``--global_batch_size``), with the released configuration by default
(E 128, 4 quadratic layers x 4 rows, dropout 0.1, batch norm, history as
preprocessed, batch 8192). It times:

* ``--steps`` steps after ``--warmup_steps`` warm-up steps (the first traces
  the graph): ``examples_per_s``, ``seconds_per_step``;
* with ``--epoch``, one whole epoch as ``qin_tf.train`` runs it (a fresh
  iterator, ceil(train rows / batch) steps): ``seconds_per_epoch``;
* with ``--eval``, two passes of the per-epoch evaluation
  (``qin_tf.task.SplitEvaluator``) over ``--eval_split`` at each of
  ``--eval_batch_sizes`` (the first pass also reads and caches the split);
* with ``--profile``, the op-time shares of ``--profile_steps`` more steps,
  by op type and by model part (see ``bench/profiling.py``).

``mirrored`` runs one replica on each local GPU (``"devices"`` in the JSON
line); on a CPU-only machine it splits the CPU into ``--logical_cpus``
logical devices (2), one replica each, as ``python -m qin_tf.train
--strategy=mirrored --logical_cpus=2`` does; the replicas share the same
cores.

Levers (to measure one at a time): ``--nosparse_history`` (every history slot
embedded and attended densely), ``--asta=projected`` (ASTA in the original's
order: key/value projections of every item), ``--deduplicate`` (dense history,
each distinct id embedded once), ``--jit_compile`` (XLA for the step; needs
``--nosparse_history``: ``tf.unique`` has no XLA kernel),
``--dtype_policy=mixed_bfloat16`` or ``mixed_float16`` (with loss scaling),
``--intra_op_threads`` /
``--inter_op_threads``, ``--dropout_impl`` (``qin``, the production
``qin_tf.layers.Dropout``; ``native_scale``; ``keras``: see
``bench/variants.py``), ``--jit_qnn`` (XLA for the QNN tower only; the
sparse history stays outside).

For QIN-headed models the JSON line carries ``qnn_train_gflop_per_step`` (the
QNN's matrix products in one step) and ``qnn_gflops``, that figure over the
step time: against ``bench/bench_gemm.py``'s rate of the same shape and dtype
it is the step's fraction of the GEMM peak.

Prints one JSON line (see ``bench/common.py``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402

FLAGS = flags.FLAGS

_DATA = flags.DEFINE_string("data_dir", None, "Output of pipelines.preprocess (feature_spec.json).", required=True)
_STRATEGY = flags.DEFINE_enum("strategy", "one_device", ["one_device", "mirrored"], "Distribution strategy.")
_LOGICAL_CPUS = flags.DEFINE_integer("logical_cpus", 2, "Logical CPU devices for --strategy=mirrored "
                                     "on a machine without GPUs.", lower_bound=1)
_BATCH = flags.DEFINE_integer("global_batch_size", 8192, "Global batch size.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup_steps", 2, "Untimed steps first (the first one traces).", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.", lower_bound=1)
_EPOCH = flags.DEFINE_bool("epoch", False, "Also time one whole epoch (ceil(train rows / batch) steps).")
_EVAL = flags.DEFINE_bool("eval", False, "Also time the per-epoch evaluation over --eval_split.")
_EVAL_SPLIT = flags.DEFINE_string("eval_split", "valid", "Split for --eval.")
_EVAL_BATCHES = flags.DEFINE_list("eval_batch_sizes", [], "Evaluation batch sizes to time with --eval; "
                                  "default: --global_batch_size (what qin_tf.train uses by default).")
_PROFILE = flags.DEFINE_bool("profile", False, "Profile --profile_steps more steps: op-time shares.")
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 2, "Steps under the profiler.", lower_bound=1)
_INTRA = flags.DEFINE_integer("intra_op_threads", 0, "TF intra-op threads (0: TF's default).", lower_bound=0)
_INTER = flags.DEFINE_integer("inter_op_threads", 0, "TF inter-op threads (0: TF's default).", lower_bound=0)
# Model and levers.
_EMBEDDING_DIM = flags.DEFINE_integer("embedding_dim", 128, "E.", lower_bound=1)
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "Quadratic layers.", lower_bound=1)
_NUM_ROW = flags.DEFINE_integer("num_row", 4, "Rows per quadratic layer.", lower_bound=1)
_SPARSE = flags.DEFINE_bool("sparse_history", True, "ModelConfig.sparse_history (production default).")
_ASTA = flags.DEFINE_enum("asta", "reassociated", ["reassociated", "projected"], "ASTA's order of operations.")
_DEDUP = flags.DEFINE_bool("deduplicate", None, "Dense history only: embed each distinct id once.")
_JIT = flags.DEFINE_bool("jit_compile", False, "XLA-compile the training step (needs --nosparse_history).")
_POLICY = flags.DEFINE_enum("dtype_policy", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
                            "Keras dtype policy (mixed_float16 trains with a dynamic loss scale).")
_DROPOUT = flags.DEFINE_enum("dropout_impl", "qin", ["qin", "native_scale", "keras"],
                             "The dropout's implementation (bench/variants.py).")
_JIT_QNN = flags.DEFINE_bool("jit_qnn", False, "XLA-compile the QNN tower only (the sparse path stays).")
_SEED = flags.DEFINE_integer("seed", 20242025, "Weights and data seed.")
_TRAIN_FLAGS = flags.DEFINE_multi_string(
    "train_flag", [], "A flag of `python -m qin_tf.train` (repeatable), e.g. "
    "--train_flag=--flagfile=configs/transformer_dcn.flags: the model (any preset or extractor x head) "
    "and its batch size, learning rate and clipping come from these, as training would build them, "
    "and the QIN-only flags above (embedding_dim, num_layers, num_row, asta, deduplicate) are not used. "
    "--global_batch_size and --dtype_policy, when given, still override.")


def _jit_loop_class(base):
    """A TrainLoop whose per-replica step is one XLA cluster."""
    import tensorflow as tf

    class XlaTrainLoop(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._compiled = tf.function(super()._replica_step, jit_compile=True)

        def _replica_step(self, features, labels):
            return self._compiled(features, labels)

    return XlaTrainLoop


def main(argv):
    del argv
    from qin_tf.runtime import import_tensorflow  # noqa: F401  (quiet import)
    from bench import variants

    with variants.process_levers(dropout=_DROPOUT.value, jit_qnn=_JIT_QNN.value):
        _run()


def _run():
    if _JIT.value and _SPARSE.value:
        raise app.UsageError("--jit_compile needs --nosparse_history (tf.unique and tf.where have no XLA kernels).")
    from qin_tf.runtime import import_tensorflow  # noqa: F401  (quiet import)
    from qin_tf import task  # imports TF without starting it

    common.configure_threads(_INTRA.value, _INTER.value)
    strategy = task.create_strategy(_STRATEGY.value,
                                    logical_cpus=_LOGICAL_CPUS.value if _STRATEGY.value == "mirrored" else 0)
    import keras
    import numpy as np
    import tensorflow as tf

    from bench import profiling, variants
    from qin_tf.config import ModelConfig
    from qin_tf.data import make_dataset, model_inputs
    from qin_tf.model import build_model
    from qin_tf.spec import FeatureSpec

    spec = FeatureSpec.load(_DATA.value)
    rows = spec.splits["train"].num_rows
    gbs = _BATCH.value
    replicas = strategy.num_replicas_in_sync
    learning_rate, clipnorm = 2e-3, 10.0
    if _TRAIN_FLAGS.value:
        config = common.train_config(_TRAIN_FLAGS.value)
        mc = config.model
        if FLAGS["dtype_policy"].present:
            mc = dataclasses.replace(mc, dtype_policy=_POLICY.value)
        if not FLAGS["global_batch_size"].present:
            gbs = config.train.global_batch_size
        learning_rate, clipnorm = config.train.learning_rate, config.train.clipnorm
    else:
        mc = ModelConfig(embedding_dim=_EMBEDDING_DIM.value, num_layers=_NUM_LAYERS.value, num_row=_NUM_ROW.value,
                         sparse_history=_SPARSE.value, dtype_policy=_POLICY.value)
    # the ASTA form and item deduplication that run: the flagfile's, or this script's variant flags
    asta, dedup = (mc.asta_form, mc.deduplicate_items) if _TRAIN_FLAGS.value else (_ASTA.value, _DEDUP.value)
    policy = mc.dtype_policy or keras.config.dtype_policy().name   # none: Keras' global policy
    if gbs % replicas:
        raise app.UsageError(f"--global_batch_size={gbs} is not divisible by {replicas} replicas.")
    keras.utils.set_random_seed(_SEED.value)
    common.log(f"building {mc.name} ({asta} ASTA, sparse_history={mc.sparse_history}, "
               f"deduplicate={dedup}, jit={_JIT.value}, {policy}) under {_STRATEGY.value} "
               f"({replicas} replicas), batch {gbs}")
    with strategy.scope():
        if _TRAIN_FLAGS.value:
            model = build_model(spec, mc)
        else:
            model = variants.build_variant(spec, mc, asta=_ASTA.value, deduplicate=_DEDUP.value)
        optimizer = task.make_optimizer(learning_rate, mc.dtype_policy)
        optimizer.build(model.trainable_variables)
        loop_cls = _jit_loop_class(task.TrainLoop) if _JIT.value else task.TrainLoop
        loop = loop_cls(model, optimizer, strategy, global_batch_size=gbs, clipnorm=clipnorm)

    def dataset_fn(ctx, seed=_SEED.value):
        return make_dataset(spec, "train", gbs, training=True, input_context=ctx, seed=seed, repeat=True,
                            drop_remainder=True)

    record = {"bench": "train", "strategy": _STRATEGY.value, "num_replicas": replicas,
              "devices": list(strategy.extended.worker_devices),
              "global_batch_size": gbs, "max_len": spec.max_len, "train_rows": rows,
              "model": mc.name, "train_flags": _TRAIN_FLAGS.value,
              "parameters": int(model.count_params()),
              "config": dataclasses.asdict(mc) if _TRAIN_FLAGS.value else {
                  "embedding_dim": mc.embedding_dim, "num_layers": mc.num_layers, "num_row": mc.num_row,
                  "dropout": mc.dropout, "batch_norm": mc.batch_norm},
              "levers": {"sparse_history": mc.sparse_history, "asta": asta, "deduplicate": dedup,
                         "jit_compile": _JIT.value, "jit_qnn": _JIT_QNN.value, "dropout_impl": _DROPOUT.value,
                         "dtype_policy": policy,
                         "intra_op_threads": _INTRA.value, "inter_op_threads": _INTER.value}}

    if (_ASTA.value != "reassociated" or _DEDUP.value is not None) and not _TRAIN_FLAGS.value:
        # A variant must compute the production model's function.
        probe = next(iter(make_dataset(spec, "valid", 256, training=False)))[0]
        record["variant_max_abs_diff"] = variants.check_same_outputs(model, spec, mc, model_inputs(spec, probe))

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    t0 = time.perf_counter()
    total, done, last = loop.run(iterator, tf.constant(_WARMUP.value))
    float(total)
    record["warmup_s"] = round(time.perf_counter() - t0, 2)
    common.log(f"warm-up: {_WARMUP.value} steps in {record['warmup_s']} s; timing {_STEPS.value} steps")
    t0 = time.perf_counter()
    total, done, last = loop.run(iterator, tf.constant(_STEPS.value))
    loss = float(last)
    dt = time.perf_counter() - t0
    if int(done) != _STEPS.value or not math.isfinite(loss):
        raise SystemExit(f"the timed steps did not all run ({int(done)} of {_STEPS.value}, loss {loss}).")
    record.update(steps=_STEPS.value, seconds_per_step=round(dt / _STEPS.value, 3),
                  examples_per_s=round(_STEPS.value * gbs / dt, 1), last_loss=round(loss, 5),
                  rss_after_steps_mb=common.current_rss_mb())
    qnn_gflop = variants.qnn_train_gflop(model, gbs)
    if qnn_gflop:
        record.update(qnn_train_gflop_per_step=round(qnn_gflop, 1),
                      qnn_gflops=round(qnn_gflop * _STEPS.value / dt, 1))
    common.log(f"{record['examples_per_s']:,} examples/s ({record['seconds_per_step']} s/step)")

    if _PROFILE.value:
        n = tf.constant(_PROFILE_STEPS.value)
        record["profile"] = profiling.profile_ops(lambda: float(loop.run(iterator, n)[0]))
        record["profile"]["steps"] = _PROFILE_STEPS.value
        common.log(f"profile: {record['profile']['by_part']}")

    if _EPOCH.value:
        steps = math.ceil(rows / gbs)
        common.log(f"timing one epoch: {steps} steps")
        t0 = time.perf_counter()
        epoch_iterator = iter(strategy.distribute_datasets_from_function(
            lambda ctx: dataset_fn(ctx, seed=_SEED.value + 1)))
        total, done, last = loop.run(epoch_iterator, tf.constant(steps))
        float(total)
        dt = time.perf_counter() - t0
        record.update(epoch_steps=steps, seconds_per_epoch=round(dt, 1),
                      epoch_examples_per_s=round(steps * gbs / dt, 1))
        common.log(f"epoch: {dt:.1f} s ({steps * gbs / dt:,.0f} examples/s)")

    if _EVAL.value:
        record["eval"] = []
        for ebs in [int(b) for b in _EVAL_BATCHES.value] or [gbs]:
            evaluator = task.SplitEvaluator(spec, _EVAL_SPLIT.value, ebs)
            passes = []
            for _ in range(2):
                t0 = time.perf_counter()
                y, p, g = evaluator.predict(model)
                passes.append(time.perf_counter() - t0)
            n = int(y.size)
            run = {"split": _EVAL_SPLIT.value, "rows": n, "batch_size": ebs,
                   "seconds": [round(s, 2) for s in passes], "examples_per_s": [round(n / s, 1) for s in passes],
                   "all_finite": bool(np.all(np.isfinite(p))), "rss_after_mb": common.current_rss_mb()}
            record["eval"].append(run)
            common.log(f"eval batch {ebs}: {run['examples_per_s']} examples/s (first pass reads and caches)")
            del evaluator
    common.emit(record)


if __name__ == "__main__":
    app.run(main)
