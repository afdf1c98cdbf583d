"""Shared fixtures: the bundled sample, preprocessed once per test session."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import pytest

from qin_tf.fingerprint import tree_digest
from qin_tf.runtime import import_tensorflow

import_tensorflow()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(REPO, "data", "microlens_sample")
SAMPLE_DATASET_CONFIG = os.path.join(REPO, "configs", "datasets", "microlens50k.json")
#: Short histories keep the models in tests small; the sample's own median is 3-5.
SAMPLE_MAX_LEN = 16
SAMPLE_LOGS_CONFIG = os.path.join(REPO, "configs", "logs", "microlens_sample.json")


@functools.cache
def load_script(name: str):
    """``scripts/NAME.py`` as a module, loaded once (registered in ``sys.modules``: a dataclass looks its
    module up there)."""
    module_spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def files_under(root):
    """The paths of the files under ``root``, relative to it, sorted."""
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


#: The serving directory's digest before and after a step (one home: qin_tf.fingerprint).
tree_hash = tree_digest


@pytest.fixture(scope="session")
def sample_spec(tmp_path_factory):
    """The bundled sample preprocessed with max_len 16 into a session temp dir."""
    from pipelines.preprocess import preprocess
    from qin_tf.spec import DatasetConfig

    out = tmp_path_factory.mktemp("sample_data") / "data"
    return preprocess(SAMPLE_DIR, str(out), DatasetConfig.load(SAMPLE_DATASET_CONFIG),
                      max_len=SAMPLE_MAX_LEN, num_shards=2)


@pytest.fixture(scope="session")
def sample_logs_built(tmp_path_factory):
    """The bundled sample's raw logs through ``python -m pipelines.build_examples`` (default runner), as
    scripts/run_sample_from_logs.sh runs it: its output dir."""
    out = str(tmp_path_factory.mktemp("sample_logs") / "built")
    proc = subprocess.run([sys.executable, "-m", "pipelines.build_examples", f"--config={SAMPLE_LOGS_CONFIG}",
                           f"--output_dir={out}"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return out

