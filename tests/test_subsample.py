"""scripts/subsample_users.py: a train split of a fraction of the users, the other splits unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from qin_tf.data import make_dataset
from qin_tf.spec import FeatureSpec
from tests.conftest import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "subsample_users.py")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def rows(spec, split):
    features, labels = next(iter(make_dataset(spec, split, 1_000_000, training=False, with_meta=True)))
    return {k: v.numpy() for k, v in features.items()}, labels.numpy()


def test_keeps_every_row_of_the_kept_users_only_and_nests(sample_spec, tmp_path):
    full, _ = rows(sample_spec, "train")
    outs = {}
    for fraction in ("0.25", "0.5"):
        out = tmp_path / fraction
        if fraction == "0.25":   # the CLI, as RESULTS.md runs it
            proc = run(f"--data_dir={sample_spec.base_dir}", f"--output_dir={out}", f"--fraction={fraction}",
                       "--seed=3")
            assert proc.returncode == 0 and proc.stderr == "", proc.stderr
            report = json.loads(proc.stdout)
        else:
            report = load_script("subsample_users").subsample(sample_spec.base_dir, str(out), float(fraction), seed=3)
        spec = FeatureSpec.load(str(out))
        sub, _ = rows(spec, "train")
        users = set(sub["user_id"].tolist())
        assert len(users) == report["users"] == round(float(fraction) * len(set(full["user_id"].tolist())))
        kept = np.isin(full["user_id"], list(users))
        assert spec.splits["train"].num_rows == report["train_rows"] == kept.sum() == len(sub["user_id"])
        for name in ("item_id", "item_seq", "user_id"):      # the same rows, in file order
            np.testing.assert_array_equal(sub[name], full[name][kept])
        # valid and test are the full data's files; so is the item table
        for split in ("valid", "test"):
            assert spec.split_files(split) == [os.path.abspath(f) for f in sample_spec.split_files(split)]
        np.testing.assert_array_equal(spec.load_item_table()[1], sample_spec.load_item_table()[1])
        outs[fraction] = users
    assert outs["0.25"] < outs["0.5"]


def test_bad_input_is_a_one_line_error_and_overwrites_nothing(sample_spec, tmp_path):
    proc = run(f"--data_dir={sample_spec.base_dir}", f"--output_dir={tmp_path / 'a'}", "--fraction=0")
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --fraction must be in (0, 1]. Received: 0.0"
    assert not (tmp_path / "a").exists()
    load_script("subsample_users").subsample(sample_spec.base_dir, str(tmp_path / "b"), 0.5)
    before = (tmp_path / "b" / "feature_spec.json").read_text()
    again = run(f"--data_dir={sample_spec.base_dir}", f"--output_dir={tmp_path / 'b'}", "--fraction=0.25")
    assert again.returncode == 1 and "already holds a feature_spec.json" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert (tmp_path / "b" / "feature_spec.json").read_text() == before


def _fake_run(directory, rows, val_aucs, test_aucs, finished=True):
    os.makedirs(directory)
    with open(os.path.join(directory, "feature_spec.json"), "w") as f:
        json.dump({"splits": {"train": {"num_rows": rows}}}, f)
    history = [{"epoch": i + 1, "val_auc": v, "test_auc": t} for i, (v, t) in enumerate(zip(val_aucs, test_aucs))]
    metrics = {"history": history}
    if finished:
        best = max(history, key=lambda h: h["val_auc"])
        metrics.update(best_epoch=best["epoch"], splits={"valid": {"auc": best["val_auc"]},
                                                         "test": {"auc": best["test_auc"]}})
    with open(os.path.join(directory, "metrics.json"), "w") as f:
        json.dump(metrics, f)


def test_scaling_table_selects_on_valid_and_measures_the_gap(tmp_path):
    _fake_run(tmp_path / "din_a", 100, [0.70, 0.75, 0.74], [0.60, 0.66, 0.67])
    _fake_run(tmp_path / "qin_a", 100, [0.72, 0.71], [0.65, 0.70])
    _fake_run(tmp_path / "din_b", 200, [0.80], [0.71], finished=False)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "scaling_table.py"),
                           f"--runs=din:{tmp_path / 'din_a'},qin:{tmp_path / 'qin_a'},din:{tmp_path / 'din_b'}",
                           f"--plot={tmp_path / 'plot.png'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[2] == "| din | 100 | 2 / 3 | 0.7500 | 0.6600 | – |"          # valid picks epoch 2, not test
    assert lines[3] == "| din | 200 | 1 / 1 (running) | 0.8000 | 0.7100 | – |"
    assert lines[4] == "| qin | 100 | 1 / 2 | 0.7200 | 0.6500 | -0.0100 |"
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "scaling_table.py"),
                          f"--runs=qin:{tmp_path / 'missing'}"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "missing/feature_spec.json" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_scaling_plot_draws_runs_cut_short_dashed(tmp_path):
    script = load_script("scaling_table")
    _fake_run(tmp_path / "din", 100, [0.70], [0.60])
    _fake_run(tmp_path / "tdcn", 100, [0.72], [0.65])
    points = {"din": [script.read_run(str(tmp_path / "din"))],
              "tdcn (1 epoch)": [script.read_run(str(tmp_path / "tdcn"))]}
    drawn = script.plot(points, str(tmp_path / "plot.png"), dashed={"tdcn (1 epoch)"})
    assert drawn == [("din", "-"), ("tdcn (1 epoch)", "--")]
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
