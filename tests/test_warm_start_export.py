"""Warm start from an export (``--warm_start_from=SERVING``): the run its fingerprint names, or one line.

One run of the sample, exported by the training command itself
(``--export_base``), is shared by every test: starting from its version
directory or from the base gives bitwise the weights that starting from its
model_dir gives; an export that names no run, or a run gone or retrained
since, is refused in one line with exit status 1 and nothing written.
"""

from __future__ import annotations

import json
import os
import shutil

import keras
import numpy as np
import pytest

from qin_tf import train, warm_start
from qin_tf.config import ExperimentConfig
from qin_tf.fingerprint import read_fingerprint
from qin_tf.signatures import FINGERPRINT_PATH
from tests.test_warm_start import file_hashes, fresh, run_cli, sample_args, values


@pytest.fixture(scope="module")
def exported(sample_spec, tmp_path_factory):
    """``(model_dir, serving base)``: one epoch of QIN on the sample, exported as ``serving/1`` by the same command."""
    tmp = tmp_path_factory.mktemp("warm_export")
    model_dir, serving = str(tmp / "day1"), str(tmp / "serving")
    proc = run_cli(*sample_args(sample_spec, model_dir, "--epochs=1", f"--export_base={serving}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(serving)) == ["1"]
    return model_dir, serving


def model_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return ExperimentConfig.from_dict(json.load(f)).model


def test_an_export_records_the_model_dir_it_was_made_from(exported):
    model_dir, serving = exported
    assert read_fingerprint(os.path.join(serving, "1"))["model_dir"] == os.path.abspath(model_dir)


def test_an_export_and_its_base_start_bitwise_as_its_model_dir(exported, sample_spec, tmp_path):
    model_dir, serving = exported
    config = model_config(model_dir)
    before = file_hashes(model_dir)
    got = {}
    for path in (model_dir, os.path.join(serving, "1"), serving):
        source = warm_start.load_source(path, sample_spec, config, model_dir=str(tmp_path / "day2"))
        assert source.model_dir == model_dir
        model = fresh(sample_spec, config)
        record = warm_start.apply(model, sample_spec, source)
        got[path] = values(model), record
    want, want_record = got[model_dir]
    assert "export" not in want_record and "export_version" not in want_record
    for path in (os.path.join(serving, "1"), serving):
        weights, record = got[path]
        assert sorted(weights) == sorted(want)
        for name, value in want.items():
            assert weights[name].dtype == value.dtype and np.array_equal(weights[name], value), (path, name)
        assert record == {**want_record, "export": path, "export_version": 1}
        line = warm_start.summary(record)
        assert line.startswith(f"warm start from {model_dir}/best.keras (sha256 {record['source_model_sha256'][:12]}"
                               f", the run export {path} (version 1) came from): ")
    assert file_hashes(model_dir) == before


def _version(serving, dst, fingerprint=None, *, drop=False, number=1) -> str:
    """A copy of ``serving/1`` as version ``number`` of base ``dst``: its fingerprint file replaced by
    ``fingerprint`` or, with ``drop``, removed."""
    version = os.path.join(dst, str(number))
    shutil.copytree(os.path.join(serving, "1"), version)
    path = os.path.join(version, FINGERPRINT_PATH)
    if drop:
        os.remove(path)
    elif fingerprint is not None:
        with open(path, "w") as f:
            json.dump(fingerprint, f)
    return version


def _retrained(model_dir, dst) -> str:
    """A copy of ``model_dir`` whose best.keras was trained on since: one weight changed."""
    shutil.copytree(model_dir, dst)
    model = keras.saving.load_model(os.path.join(dst, "best.keras"), compile=False)
    v = model.trainable_weights[0]
    v.assign(keras.ops.convert_to_numpy(v) + 1e-3)
    model.save(os.path.join(dst, "best.keras"))
    return str(dst)


def _refusal_case(case, model_dir, serving, tmp_path) -> tuple[str, str]:
    """``(--warm_start_from, expected message after "warm start: ")`` of one refused case."""
    base = str(tmp_path / "base")
    record = read_fingerprint(os.path.join(serving, "1"))
    if case == "no fingerprint file":
        v = _version(serving, base, drop=True)
        return v, (f"{v} is an export without {FINGERPRINT_PATH}, so it does not record the training run it "
                   f"came from: pass that run's --model_dir.")
    if case == "no model_dir in it":
        v = _version(serving, base, {"source": record["source"], "weights": record["weights"]})
        return base, (f"{v} is an export whose {FINGERPRINT_PATH} records no model_dir (exported before it was "
                      f"recorded, or an ensemble): pass the --model_dir of the training run it came from.")
    if case == "model_dir retrained":
        run = _retrained(model_dir, tmp_path / "run")
        v = _version(serving, base, {**record, "model_dir": run})
        return v, (f"{v} was exported from {run}, whose model (fingerprint ")
    # model_dir deleted; version 1 is fine, but the base serves its newest version, 2
    _version(serving, base)
    v = _version(serving, base, {**record, "model_dir": str(tmp_path / "gone")}, number=2)
    return base, f"{v} was exported from {tmp_path / 'gone'}, which is gone; pass the --model_dir of a finished run."


@pytest.mark.parametrize("case", ["no fingerprint file", "no model_dir in it", "model_dir retrained",
                                  "model_dir deleted"])
def test_the_cli_refuses_an_export_it_cannot_trace_in_one_line(case, exported, sample_spec, tmp_path, capsys):
    model_dir, serving = exported
    path, message = _refusal_case(case, model_dir, serving, tmp_path)
    before = file_hashes(model_dir), file_hashes(path)
    new_dir = str(tmp_path / "day2")
    capsys.readouterr()
    rc = train.cli(["train", *sample_args(sample_spec, new_dir, f"--warm_start_from={path}")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(f"train: error: warm start: {message}") and err.count("\n") == 1, err
    if case == "model_dir retrained":
        assert err.endswith("retrained since that export? Pass the --model_dir itself to start from its current "
                            "model.\n")
    assert not os.path.exists(new_dir)
    assert (file_hashes(model_dir), file_hashes(path)) == before
