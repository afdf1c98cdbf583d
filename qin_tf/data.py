"""The ``tf.data`` reader: TFRecords written by ``pipelines.preprocess`` -> batches.

Everything about the records comes from the :class:`~qin_tf.spec.FeatureSpec`:
the files of each split, every feature's name, dtype and shape. The pipeline:

    files -> (shard by input context) -> [shuffle files] -> interleave TFRecord readers
          -> [shuffle records] -> [repeat] -> batch -> parse_example (vectorised) -> prefetch

* Batching comes before parsing, so ``tf.io.parse_example`` parses a whole
  batch in one op instead of one record at a time.
* Under ``tf.distribute`` pass the ``tf.distribute.InputContext`` that
  ``strategy.distribute_datasets_from_function`` hands over: each input
  pipeline reads its own share (by file when there are enough files, by
  record otherwise) and batches ``input_context.get_per_replica_batch_size``.
* Evaluation (``training=False``) reads files in order, one after another,
  with no shuffling: the order of the predictions is the order of the rows
  in the split, run after run.

Example::

    spec = FeatureSpec.load("runs/sample/data")
    ds = make_dataset(spec, "train", batch_size=256, training=True, seed=1)
    features, label = next(iter(ds))
    features["item_seq"].shape  # (256, max_len)
"""

from __future__ import annotations

from typing import Mapping

import tensorflow as tf

from qin_tf.spec import FeatureSpec, SpecError

#: Records held in the shuffle buffer when training.
DEFAULT_SHUFFLE_BUFFER = 65_536


def example_parse_spec(spec: FeatureSpec, *, labelled: bool = True,
                       with_meta: bool = True) -> dict[str, tf.io.FixedLenFeature]:
    """``tf.io.parse_example`` features for the spec's records.

    Args:
        spec: the feature spec.
        labelled: include the label.
        with_meta: include the meta features (e.g. ``user_id``).
    """
    out = {}
    for f in spec.example_features(labelled=labelled):
        if f.role == "meta" and not with_meta:
            continue
        out[f.name] = tf.io.FixedLenFeature(shape=list(f.shape), dtype=tf.dtypes.as_dtype(f.dtype))
    return out


def _resolve_files(spec: FeatureSpec, split: str) -> tuple[list[str], bool]:
    if split in spec.splits:
        return spec.split_files(split), spec.splits[split].labelled
    files = sorted(tf.io.gfile.glob(split))
    if not files:
        raise SpecError(f"`{split}` is neither a split of the feature spec "
                        f"({sorted(spec.splits)}) nor a file pattern that matches any file.")
    return files, True


def make_dataset(spec: FeatureSpec, split: str, batch_size: int, *, training: bool,
                 input_context: tf.distribute.InputContext | None = None,
                 seed: int | None = None, repeat: bool = False, with_meta: bool = False,
                 labelled: bool | None = None, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 drop_remainder: bool = False, cache: bool = False) -> tf.data.Dataset:
    """Builds the dataset of one split.

    Args:
        spec: the feature spec.
        split: a split name of the spec (``"train"``) or a file pattern.
        batch_size: the GLOBAL batch size; with ``input_context`` each
            pipeline batches its per-replica share.
        training: shuffle files and records (with ``seed``); otherwise keep
            the split's row order.
        input_context: from ``strategy.distribute_datasets_from_function``.
        seed: shuffling seed; the same seed gives the same order.
        repeat: repeat forever (after shuffling, so each pass reshuffles).
        with_meta: add the meta features (``user_id``) to the features dict;
            they are not model inputs, remove them before calling the model.
        labelled: whether records have a label; default: from the spec's
            split, ``True`` for a pattern.
        shuffle_buffer: records in the shuffle buffer.
        drop_remainder: drop the last partial batch.
        cache: cache the parsed batches in memory after the first pass
            (only sensible without shuffling of records, i.e. evaluation).

    Returns:
        A dataset of ``(features, label)``; ``features`` maps each name of
        ``spec.model_features`` (and meta, with ``with_meta``) to an int64
        tensor of shape ``[batch]`` or ``[batch, max_len]``; ``label`` is
        float32 ``[batch]``. Without labels it yields ``features`` alone.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={batch_size}")
    files, split_labelled = _resolve_files(spec, split)
    labelled = split_labelled if labelled is None else labelled
    per_pipeline_batch = batch_size
    files_ds = tf.data.Dataset.from_tensor_slices(files)
    shard_records = False
    if input_context is not None and input_context.num_input_pipelines > 1:
        per_pipeline_batch = input_context.get_per_replica_batch_size(batch_size)
        if len(files) >= input_context.num_input_pipelines:
            files_ds = files_ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        else:
            shard_records = True
    elif input_context is not None:
        per_pipeline_batch = input_context.get_per_replica_batch_size(batch_size)

    compression = spec.compression or ""
    if training:
        files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        ds = files_ds.interleave(
            lambda f: tf.data.TFRecordDataset(f, compression_type=compression),
            cycle_length=min(len(files), 4), block_length=16,
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=seed is not None)
    else:
        ds = files_ds.flat_map(lambda f: tf.data.TFRecordDataset(f, compression_type=compression))
    if shard_records:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(per_pipeline_batch, drop_remainder=drop_remainder)

    features = example_parse_spec(spec, labelled=labelled, with_meta=with_meta)
    label_name = spec.label

    def parse(serialized):
        parsed = tf.io.parse_example(serialized, features)
        if not labelled:
            return parsed
        label = tf.cast(parsed.pop(label_name), tf.float32)
        return parsed, label

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache:
        ds = ds.cache()
    options = tf.data.Options()
    options.deterministic = (not training) or seed is not None
    if input_context is not None:
        # Sharding is done above, by hand; do not let tf.distribute shard again.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def model_inputs(spec: FeatureSpec, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The subset of ``features`` that the model takes (drops meta)."""
    return {name: features[name] for name in spec.model_feature_names}
