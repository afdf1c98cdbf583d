"""How QIN's memory and step time grow with the item vocabulary, on synthetic item ids.

    python bench/bench_vocab.py --data_dir=runs/microlens50k/data --num_items=1000000
    python bench/bench_vocab.py --data_dir=runs/microlens50k/data --num_items=100000 --strategy=mirrored

Builds the production model (the released configuration by default: E 128,
4 quadratic layers x 4 rows) on the spec of ``--data_dir`` with its item
vocabulary replaced by ``--num_items`` synthetic items: random tags and a
random frozen multimodal vector per item, as the real item table has. The
training batches are the data's own (context features, labels, history
lengths) with every item id (target and history, padding kept) replaced by a
uniform random id in ``[1, num_items)``, so every step touches rows spread
over the whole table, as a large catalog's traffic does. The batches are
streamed from the files (``cache=False``), so the peak RSS holds the model,
not the train split.

It runs the production training step (``qin_tf.task.TrainLoop``: forward,
backward, clipping, Adam) under ``--strategy`` and reports:

* ``model_bytes``: the model's variables (the id table, the frozen item
  table, every layer), per replica; ``optimizer_bytes``: Adam's variables
  (two slots per trainable variable), per replica; ``item_table_bytes``: the
  part of both that grows with the vocabulary;
* ``peak_rss_mb``: the process's peak resident memory over building and the
  timed steps (TensorFlow's runtime, the input pipeline, every replica's
  copy under ``mirrored``);
* ``seconds_per_step`` over ``--steps`` steps after ``--warmup_steps``.

Run one vocabulary per process (peak RSS is per process). Prints one JSON
line (see ``bench/common.py``).
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

_DATA = flags.DEFINE_string("data_dir", None, "Output of pipelines.preprocess (feature_spec.json): the "
                            "features, history length and batches the synthetic ids go into.", required=True)
_ITEMS = flags.DEFINE_integer("num_items", 100_000, "Item vocabulary size (ids 1..num_items-1; 0 pads).",
                              lower_bound=2)
_STRATEGY = flags.DEFINE_enum("strategy", "one_device", ["one_device", "mirrored"], "Distribution strategy.")
_LOGICAL_CPUS = flags.DEFINE_integer("logical_cpus", 2, "Logical CPU devices (replicas) for --strategy=mirrored.",
                                     lower_bound=1)
_BATCH = flags.DEFINE_integer("global_batch_size", 2048, "Global batch size.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup_steps", 2, "Untimed steps first (the first one traces).", lower_bound=1)
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.", lower_bound=1)
_EMBEDDING_DIM = flags.DEFINE_integer("embedding_dim", 128, "E.", lower_bound=1)
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "Quadratic layers.", lower_bound=1)
_NUM_ROW = flags.DEFINE_integer("num_row", 4, "Rows per quadratic layer.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 20242025, "Weights, item table and ids seed.")


def _nbytes(variables) -> int:
    return int(sum(math.prod(v.shape) * v.dtype.itemsize if hasattr(v.dtype, "itemsize")
                   else math.prod(v.shape) * 4 for v in variables))


def main(argv):
    del argv
    from qin_tf.runtime import import_tensorflow  # noqa: F401  (quiet import)
    from qin_tf import task  # imports TF without starting it

    strategy = task.create_strategy(_STRATEGY.value,
                                    logical_cpus=_LOGICAL_CPUS.value if _STRATEGY.value == "mirrored" else 0)
    import keras
    import numpy as np
    import tensorflow as tf

    from qin_tf.config import ModelConfig
    from qin_tf.data import make_dataset
    from qin_tf.model import build_model
    from qin_tf.spec import FeatureSpec

    n = _ITEMS.value
    real = FeatureSpec.load(_DATA.value)
    rng = np.random.default_rng(_SEED.value)
    tags = rng.integers(0, real.tag_vocab_size, size=(n, real.num_tags), dtype=np.int32)
    mm = rng.standard_normal((n, real.mm_dim), dtype=np.float32)
    tags[0], mm[0] = 0, 0.0  # the padding item

    class SyntheticSpec(FeatureSpec):
        def load_item_table(self):
            return tags, mm

    spec = SyntheticSpec(**{f.name: getattr(real, f.name) for f in dataclasses.fields(real)})
    object.__setattr__(spec, "num_items", n)
    rss_table_mb = common.current_rss_mb()

    gbs = _BATCH.value
    replicas = strategy.num_replicas_in_sync
    mc = ModelConfig(embedding_dim=_EMBEDDING_DIM.value, num_layers=_NUM_LAYERS.value, num_row=_NUM_ROW.value)
    keras.utils.set_random_seed(_SEED.value)
    common.log(f"building QIN with {n:,} items under {_STRATEGY.value} ({replicas} replicas)")
    with strategy.scope():
        model = build_model(spec, mc)
        optimizer = keras.optimizers.Adam(learning_rate=2e-3)
        optimizer.build(model.trainable_variables)
        loop = task.TrainLoop(model, optimizer, strategy, global_batch_size=gbs, clipnorm=10.0)
    del tags, mm  # the model holds its own copy now
    item_vars = [v for v in model.weights if v.shape and v.shape[0] == n]
    record = {"bench": "vocab", "num_items": n, "strategy": _STRATEGY.value, "num_replicas": replicas,
              "global_batch_size": gbs, "max_len": spec.max_len,
              "config": {"embedding_dim": mc.embedding_dim, "num_layers": mc.num_layers, "num_row": mc.num_row},
              "params": int(model.count_params()),
              "model_bytes": _nbytes(model.weights),
              "item_table_bytes": _nbytes(item_vars),
              "optimizer_bytes": _nbytes(optimizer.variables),
              "rss_after_build_mb": common.current_rss_mb(), "rss_synthetic_table_mb": rss_table_mb}
    common.log(f"model {record['model_bytes'] / 2**20:,.0f} MiB, Adam {record['optimizer_bytes'] / 2**20:,.0f} MiB "
               f"per replica; RSS {record['rss_after_build_mb']:,.0f} MiB")

    target, seq = spec.target_item, spec.sequence

    def synthetic_ids(i, features, labels):
        out = dict(features)
        seed = tf.stack([tf.constant(_SEED.value, tf.int64), i])
        out[target] = tf.random.stateless_uniform(tf.shape(features[target]), seed, 1, n, dtype=tf.int64)
        ids = tf.random.stateless_uniform(tf.shape(features[seq]), seed + 1, 1, n, dtype=tf.int64)
        out[seq] = tf.where(features[seq] != 0, ids, tf.zeros_like(ids))  # the padding stays padding
        return out, labels

    def dataset_fn(ctx):
        # Streamed (not the in-memory cache training uses by default): the
        # few steps read a few batches, and the RSS is the model's, not the split's.
        ds = make_dataset(spec, "train", gbs, training=True, input_context=ctx, seed=_SEED.value, repeat=True,
                          drop_remainder=True, cache=False, shuffle_buffer=gbs)
        return ds.enumerate().map(lambda i, b: synthetic_ids(i, *b))

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    t0 = time.perf_counter()
    float(loop.run(iterator, tf.constant(_WARMUP.value))[0])
    record["warmup_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    total, done, last = loop.run(iterator, tf.constant(_STEPS.value))
    loss = float(last)
    dt = time.perf_counter() - t0
    if int(done) != _STEPS.value or not math.isfinite(loss):
        raise SystemExit(f"the timed steps did not all run ({int(done)} of {_STEPS.value}, loss {loss}).")
    record.update(steps=_STEPS.value, seconds_per_step=round(dt / _STEPS.value, 3),
                  examples_per_s=round(_STEPS.value * gbs / dt, 1), last_loss=round(loss, 5),
                  rss_after_steps_mb=common.current_rss_mb())
    common.log(f"{record['seconds_per_step']} s/step; peak RSS {common.peak_rss_mb():,.0f} MiB")
    common.emit(record)


if __name__ == "__main__":
    app.run(main)
