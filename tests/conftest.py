"""Shared fixtures: the bundled sample, preprocessed once per test session."""

from __future__ import annotations

import os

import pytest

from qin_tf.runtime import import_tensorflow

import_tensorflow()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(REPO, "data", "microlens_sample")
SAMPLE_DATASET_CONFIG = os.path.join(REPO, "configs", "datasets", "microlens50k.json")
#: Short histories keep the models in tests small; the sample's own median is 3-5.
SAMPLE_MAX_LEN = 16


@pytest.fixture(scope="session")
def sample_spec(tmp_path_factory):
    """The bundled sample preprocessed with max_len 16 into a session temp dir."""
    from pipelines.preprocess import preprocess
    from qin_tf.spec import DatasetConfig

    out = tmp_path_factory.mktemp("sample_data") / "data"
    return preprocess(SAMPLE_DIR, str(out), DatasetConfig.load(SAMPLE_DATASET_CONFIG),
                      max_len=SAMPLE_MAX_LEN, num_shards=2)
