"""The ``tf.data`` reader: TFRecords written by ``pipelines.preprocess`` -> batches.

Everything about the records comes from the :class:`~qin_tf.spec.FeatureSpec`:
the files of each split, every feature's name, dtype and shape. The pipeline:

    files -> (shard by input context) -> [shuffle files] -> interleave TFRecord readers
          -> [shuffle records] -> [repeat] -> batch -> parse_example (vectorised) -> prefetch

Training reads in memory when the pipeline's share of the split fits
(``cache``, by default when its parsed size is at most
``IN_MEMORY_LIMIT_BYTES``): the records are read and parsed once, as
evaluation reads them, and each pass over them is a full random permutation
(stateless, from the seed and the pass), gathered a batch at a time:

    files -> (shard) -> read + parse once -> columns in memory
    pass p = 0, 1, ... -> permutation(seed, p) -> batch of indices -> gather -> prefetch

That is a better shuffle than a 65,536-record buffer (every pass is a
uniformly random order of the whole split, as PyTorch's ``DataLoader(shuffle=True)``
of the original draws it) at a fraction of the cost: no per-record shuffle
buffer, no decompression or parsing after the first pass.

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

import numpy as np
import tensorflow as tf

from qin_tf.cli import error_line
from qin_tf.spec import FeatureSpec, SpecError

#: Records held in the shuffle buffer when training from the files.
DEFAULT_SHUFFLE_BUFFER = 65_536
#: Training reads in memory by default when the parsed records of a pipeline
#: take at most this many bytes (estimated from the spec's row count).
IN_MEMORY_LIMIT_BYTES = 2 * 2**30


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
                 drop_remainder: bool = False, cache: bool | None = None) -> tf.data.Dataset:
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
        shuffle_buffer: records in the shuffle buffer (training from the files).
        drop_remainder: drop the last partial batch.
        cache: keep the parsed records in memory. Training: read and parse
            the pipeline's records once, then draw each pass as a full
            random permutation (see the module docstring); ``None`` (the
            default) does so when their parsed size is known (a split of
            the spec) and at most ``IN_MEMORY_LIMIT_BYTES``, and when
            called eagerly. Evaluation: cache the parsed batches after the
            first pass; ``None`` means no.

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
    files_ds, per_pipeline_batch, shard_records = _pipeline_share(files, batch_size, input_context)
    compression = spec.compression or ""
    features = example_parse_spec(spec, labelled=labelled, with_meta=with_meta)
    parse = _parser(features, spec.label, labelled)
    options = _options(training=training, seed=seed, input_context=input_context)

    def records_in_order():
        """The pipeline's records, file after file in the split's order (its shard of them)."""
        ds = files_ds.flat_map(lambda f: tf.data.TFRecordDataset(f, compression_type=compression))
        if shard_records:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return ds

    if training and cache is None:
        cache = (split in spec.splits and tf.executing_eagerly()
                 and _parsed_bytes(spec, split, features, input_context) <= IN_MEMORY_LIMIT_BYTES)
    if training and cache:
        key = _memory_key(files, input_context, shard_records, compression, features, labelled)
        columns = _loaded_columns(key, lambda: records_in_order().batch(65_536).map(
            parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))
        ds = _in_memory_passes(columns, per_pipeline_batch, seed=seed, repeat=repeat, drop_remainder=drop_remainder)
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    if training:
        ds = _shuffled_records(files_ds, len(files), compression, seed=seed, shuffle_buffer=shuffle_buffer,
                               shard=(input_context.num_input_pipelines, input_context.input_pipeline_id)
                               if shard_records else None)
    else:
        ds = records_in_order()
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(per_pipeline_batch, drop_remainder=drop_remainder)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache:
        ds = ds.cache()
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _pipeline_share(files: list[str], batch_size: int,
                    input_context: tf.distribute.InputContext | None) -> tuple[tf.data.Dataset, int, bool]:
    """``(files of this input pipeline, its batch size, whether to shard by record)``.

    With several input pipelines each reads its share: by file when there
    are at least as many files as pipelines, by record otherwise.
    """
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
    return files_ds, per_pipeline_batch, shard_records


def _parser(features: Mapping, label_name: str, labelled: bool):
    """Batch of serialized records -> ``(features, float32 label)``, or ``features`` without labels."""

    def parse(serialized):
        parsed = tf.io.parse_example(serialized, features)
        if not labelled:
            return parsed
        label = tf.cast(parsed.pop(label_name), tf.float32)
        return parsed, label

    return parse


def _options(*, training: bool, seed: int | None, input_context) -> tf.data.Options:
    """Deterministic unless training without a seed; no automatic sharding under tf.distribute."""
    options = tf.data.Options()
    options.deterministic = (not training) or seed is not None
    if input_context is not None:
        # Sharding is done by hand (_pipeline_share); do not let tf.distribute shard again.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options


def _loaded_columns(key: tuple, read):
    """The parsed records under ``key``, read with ``read()`` (a dataset of parsed batches) unless held."""
    columns = _LOADED.get(key)
    if columns is None:
        columns = _load(read())
        _LOADED.clear()  # keep one split's records at most
        _LOADED[key] = columns
    return columns


def _shuffled_records(files_ds: tf.data.Dataset, num_files: int, compression: str, *, seed: int | None,
                      shuffle_buffer: int, shard: tuple[int, int] | None) -> tf.data.Dataset:
    """Training from the files: shuffled files, interleaved readers, [record shard], shuffle buffer."""
    files_ds = files_ds.shuffle(num_files, seed=seed, reshuffle_each_iteration=True)
    ds = files_ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type=compression),
        cycle_length=min(num_files, 4), block_length=16,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=seed is not None)
    if shard is not None:
        ds = ds.shard(*shard)
    return ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)


def _parsed_bytes(spec: FeatureSpec, split: str, features: Mapping, input_context) -> int:
    """Bytes of the parsed records of one input pipeline's share of ``split`` (int64 values)."""
    values_per_row = sum(max(1, int(np.prod(f.shape))) for f in features.values())
    rows = spec.splits[split].num_rows
    if input_context is not None and input_context.num_input_pipelines > 1:
        rows = -(-rows // input_context.num_input_pipelines)
    return rows * values_per_row * 8


#: The parsed records of the last split read in memory, by _memory_key: training
#: makes a new dataset each epoch (a new seed) and reads the same records.
_LOADED: dict = {}


def _memory_key(files, input_context, shard_records, compression, features, labelled) -> tuple:
    stats = []
    for f in files:
        try:
            st = tf.io.gfile.stat(f)
            stats.append((f, st.length, st.mtime_nsec))
        except tf.errors.OpError:
            stats.append((f, None, None))
    shard = ((input_context.num_input_pipelines, input_context.input_pipeline_id)
             if input_context is not None and input_context.num_input_pipelines > 1 else None)
    layout = tuple(sorted((k, tuple(v.shape), v.dtype.name) for k, v in features.items()))
    return tuple(stats), shard, shard_records, compression, layout, labelled


def _load(parsed: tf.data.Dataset):
    """``(structure, columns)`` of every record of ``parsed`` (batches), concatenated; ``None`` if empty."""
    columns, structure = None, None
    for element in parsed:
        flat = tf.nest.flatten(element)
        if columns is None:
            structure, columns = element, [[] for _ in flat]
        for column, value in zip(columns, flat):
            column.append(value)
    if columns is None:
        return None
    return structure, [tf.concat(c, axis=0) if len(c) > 1 else c[0] for c in columns]


def _in_memory_passes(loaded, batch_size: int, *, seed: int | None, repeat: bool,
                      drop_remainder: bool) -> tf.data.Dataset:
    """Batches of a fresh random permutation of the ``loaded`` records per pass.

    Pass ``p`` visits every record once, in the order
    ``stateless_shuffle(range(n), seed=(seed, p))``; with ``repeat`` the
    passes follow one another without a gap (a batch may span two passes),
    as with a repeated record stream.
    """
    if loaded is None:  # an empty split
        return tf.data.Dataset.range(0).batch(batch_size)
    structure, columns = loaded
    n = int(columns[0].shape[0])
    if seed is None:
        seed = int(np.random.default_rng().integers(0, 2**31 - 1))

    def permutation(pass_index):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), pass_index]))
        return tf.data.Dataset.from_tensor_slices(order)

    passes = tf.data.Dataset.range(2**62 if repeat else 1)
    indices = passes.flat_map(permutation).batch(batch_size, drop_remainder=drop_remainder)

    def gather(index):
        return tf.nest.pack_sequence_as(structure, [tf.gather(c, index) for c in columns])

    return indices.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def find_unreadable_record(spec: FeatureSpec, splits=None) -> tuple[str, int, str] | None:
    """The first record of the splits' shards that does not read back, or None if all do.

    For naming the file after ``tf.data`` raised ``DataLossError`` (which
    names no file): reads ``splits`` (default: all of the spec's), file after
    file, and returns ``(path, index of the first unreadable record in that
    file, TensorFlow's message on one line)``; for a GZIP shard the index is
    where decompression failed, which may lie after the damaged bytes.
    """
    for split in splits if splits is not None else spec.splits:
        for path in spec.split_files(split):
            records = 0
            try:
                for _ in tf.data.TFRecordDataset(path, compression_type=spec.compression or ""):
                    records += 1
            except tf.errors.OpError as e:
                return path, records, error_line(e)
    return None


def model_inputs(spec: FeatureSpec, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The subset of ``features`` that the model takes (drops meta)."""
    return {name: features[name] for name in spec.model_feature_names}
