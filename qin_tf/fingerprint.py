"""Fingerprints of a training run and of an export version: which weights a version serves.

Every export version holds :data:`qin_tf.signatures.FINGERPRINT_PATH`
(``assets.extra/model_fingerprint.json``), a JSON object:

* ``source``: the :func:`model_fingerprint` of the training run the version
  was exported from (for a version ``export.refresh_catalog`` wrote, the run
  it refreshed from);
* ``weights``: the :func:`weights_digest` of the model the version serves,
  before folding (a refresh's grown item table);
* ``model_dir``: the absolute path of that training run's directory. Versions
  written before it was recorded lack it; they stay readable.

``export.exporter`` writes it (:func:`write_fingerprint`);
``export.refresh_catalog`` and :mod:`qin_tf.warm_start` read it
(:func:`read_fingerprint`) and recompute ``source`` from the run's
``best.keras`` and feature spec to check that the run is still the one the
version serves.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from qin_tf import fileio
from qin_tf.signatures import FINGERPRINT_PATH
from qin_tf.spec import FeatureSpec


class FingerprintError(ValueError):
    """A fingerprint file that cannot be read; one line names it."""


def tree_digest(root: str) -> str:
    """sha256 (hex) of a local directory tree: every directory's and file's path under ``root`` and
    every file's bytes, in sorted order. Equal digests before and after a step prove the step
    changed nothing there (a refused push leaves the serving directory as it was)."""
    h = hashlib.sha256()
    for directory, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        h.update(os.path.relpath(directory, root).encode() + b"/\0")
        for name in sorted(files):
            h.update(name.encode() + b"\0")
            with open(os.path.join(directory, name), "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def weights_digest(model) -> str:
    """sha256 (hex) of a Keras model's weights: each one's path, dtype, shape and bytes, in path order.

    Two models digest alike exactly when they hold the same variables with the
    same values, bit for bit, however their ``.keras`` files were zipped.
    """
    h = hashlib.sha256()
    for v in sorted(model.weights, key=lambda w: w.path):
        value = np.ascontiguousarray(np.asarray(v))
        h.update(f"{v.path}\0{value.dtype.str}\0{value.shape}\0".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def model_fingerprint(model, spec: FeatureSpec) -> str:
    """sha256 (hex) of a training run: its model's weights (:func:`weights_digest`) and its feature spec.

    The spec counts as its JSON (without its directory) and the bytes of
    every vocabulary file it names, so a model retrained on the same data with
    another seed, or the same weights over other vocabularies, differ.
    """
    h = hashlib.sha256()
    h.update(weights_digest(model).encode())
    h.update(spec.to_json().encode())
    for key, v in sorted(spec.vocabularies.items()):
        h.update(f"\0{key}\0".encode())
        h.update(fileio.read_bytes(spec.path(v["path"])))
    return h.hexdigest()


def write_fingerprint(version_dir: str, source: str, weights: str, model_dir: str | None = None) -> str:
    """Writes ``version_dir``'s fingerprint file (``model_dir`` made absolute); returns its path."""
    d = {"source": source, "weights": weights}
    if model_dir:
        d["model_dir"] = fileio.absolute(model_dir)
    path = os.path.join(version_dir, FINGERPRINT_PATH)
    fileio.write_text(path, json.dumps(d, indent=2) + "\n")
    return path


def read_fingerprint(version_dir: str) -> dict | None:
    """The fingerprint file of an export version (``source``, ``weights``, maybe ``model_dir``), or None
    when the version predates fingerprints.

    Raises:
        FingerprintError: the file is not JSON, or lacks the strings
            ``source`` and ``weights`` (or ``model_dir`` is not a string).
    """
    path = os.path.join(version_dir, FINGERPRINT_PATH)
    if not fileio.gfile().exists(path):
        return None
    try:
        d = json.loads(fileio.read_text(path))
    except ValueError as e:
        raise FingerprintError(f"{path}: not a fingerprint file ({e}).") from None
    if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("source", "weights")):
        raise FingerprintError(f"{path}: not a fingerprint file (needs the strings `source` and `weights`).")
    if not isinstance(d.get("model_dir", ""), str):
        raise FingerprintError(f"{path}: not a fingerprint file (`model_dir` is not a string).")
    return d
