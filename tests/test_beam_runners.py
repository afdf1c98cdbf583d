"""Both pipelines on more than one process write what the in-process run writes, byte for byte.

The session fixture ``sample_spec`` preprocesses the bundled sample with the
default options (Beam's FnApiRunner, ``multi_threading``, one thread per
core). Here the same input goes through Beam's other local running modes:
``in_memory`` (one thread) and ``multi_processing`` (SDK worker processes
that receive the work items over the Fn API and import ``pipelines`` on
their own, as a distributed runner's workers do). The logs pipeline
(``pipelines.build_examples``, fixture ``sample_logs_built``) is run the
same way on ``multi_processing``.
"""

from __future__ import annotations

import os

import pytest

from pipelines.build_examples import build_examples
from pipelines.preprocess import preprocess
from qin_tf.spec import DatasetConfig

from tests.conftest import (SAMPLE_DATASET_CONFIG, SAMPLE_DIR, SAMPLE_LOGS_CONFIG, SAMPLE_MAX_LEN,
                            files_under as _files)


def _assert_same_bytes(ref, out, names):
    assert _files(out) == names
    for name in names:
        with open(os.path.join(ref, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name


@pytest.mark.parametrize("mode, workers", [("in_memory", 1), ("multi_processing", 2)])
def test_other_running_modes_write_byte_identical_output(sample_spec, tmp_path, mode, workers):
    out = str(tmp_path / mode)
    spec = preprocess(SAMPLE_DIR, out, DatasetConfig.load(SAMPLE_DATASET_CONFIG), max_len=SAMPLE_MAX_LEN,
                      num_shards=2, beam_options=["--runner=FnApiRunner", f"--direct_running_mode={mode}",
                                                  f"--direct_num_workers={workers}"])
    ref = sample_spec.base_dir
    names = _files(ref)
    # shards of every split, the item table, the spec and the statistics
    assert {"feature_spec.json", "item_table.npz", "stats.json", "train-00000-of-00002.tfrecord.gz",
            "train-00001-of-00002.tfrecord.gz", "test-00001-of-00002.tfrecord.gz"} <= set(names)
    _assert_same_bytes(ref, out, names)
    assert spec.splits["train"].num_rows == sample_spec.splits["train"].num_rows == 2622


def test_logs_pipeline_on_processes_writes_byte_identical_output(sample_logs_built, tmp_path):
    out = str(tmp_path / "built")
    stats = build_examples(SAMPLE_LOGS_CONFIG, out, beam_options=[
        "--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    names = _files(sample_logs_built)
    # examples of every split, the item table, the vocabularies, the dataset config and the statistics
    assert {"train.parquet", "valid.parquet", "test.parquet", "item_info.parquet", "vocab/item_id.txt",
            "vocab/tags.txt", "dataset_config.json", "stats.json"} <= set(names)
    _assert_same_bytes(sample_logs_built, out, names)
    assert stats["splits"]["train"]["rows"] == 2622 and stats["events_in"] == 2211
