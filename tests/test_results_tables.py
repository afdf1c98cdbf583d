"""scripts/results_tables.py: RESULTS.md's tables from runs' metrics.json and config.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "results_tables.py")


def _write_run(path, *, config, best_epoch, stopped_early, history, splits, train_seconds):
    os.makedirs(path)
    metrics = {"model": config["model"].get("model", "qin"), "best_epoch": best_epoch, "epochs_run": len(history),
               "stopped_early": stopped_early, "train_seconds": train_seconds, "splits": splits,
               "history": history}
    with open(os.path.join(path, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def _split(auc, logloss, gauc):
    return {"auc": auc, "logloss": logloss, "gauc": gauc, "num_examples": 10}


@pytest.fixture
def runs(tmp_path):
    """A QIN run that used its 3 epochs (test monitored), and a DIN run that stopped early, no test split."""
    qin, din = str(tmp_path / "qin"), str(tmp_path / "din")
    _write_run(qin, config={"model": {"model": "qin", "dropout": 0.1},  # an old config: no id_dropout key
                            "train": {"epochs": 3, "monitor_splits": ["test"], "model_dir": "/a", "seed": 1}},
               best_epoch=2, stopped_early=False, train_seconds=90.0,
               history=[{"epoch": 1, "auc": 0.61, "val_auc": 0.7, "val_logloss": 0.6, "test_auc": 0.65},
                        {"epoch": 2, "auc": 0.714, "val_auc": 0.75, "val_logloss": 0.55, "test_auc": 0.68},
                        {"epoch": 3, "auc": 0.8, "val_auc": 0.74, "val_logloss": 0.58, "test_auc": 0.69}],
               splits={"valid": _split(0.75, 0.55, 0.73), "test": _split(0.68, 0.6, 0.66)})
    _write_run(din, config={"model": {"model": "din", "dropout": 0.1, "id_dropout": 0.3, "batch_norm": False,
                                      "din_dnn_units": [64, 32]},
                            "train": {"epochs": 5, "monitor_splits": [], "model_dir": "/b", "seed": 1}},
               best_epoch=1, stopped_early=True, train_seconds=30.0,
               history=[{"epoch": 1, "auc": 0.6, "val_auc": 0.71234, "val_logloss": 0.61},
                        {"epoch": 2, "auc": 0.7, "val_auc": 0.705, "val_logloss": 0.62}],
               splits={"valid": _split(0.71234, 0.61, 0.7)})
    return [f"QIN={qin}", din]


EXPECTED = """\
## Results at the best epoch (selected on valid AUC)

| run | flags | best epoch / run | valid AUC | valid logloss | valid gAUC | test AUC | test logloss | test gAUC | train wall time |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| QIN | – | 2 / 3 | 0.7500 | 0.5500 | 0.7300 | 0.6800 | 0.6000 | 0.6600 | 1.5 min (3 epochs) |
| din | `--nobatch_norm --din_dnn_units=64,32 --id_dropout=0.3 --model=din --epochs=5` | 1 / 2 | 0.7123 | 0.6100 | 0.7000 | – | – | – | 0.5 min (2 epochs) |

## Epoch by epoch

| epoch | QIN valid AUC | QIN valid logloss | QIN test AUC | QIN test logloss | din valid AUC | din valid logloss |
| --- | --- | --- | --- | --- | --- | --- |
| 1 | 0.7000 | 0.6000 | 0.6500 | – | **0.7123** | **0.6100** |
| 2 | **0.7500** | **0.5500** | **0.6800** | – | 0.7050 | 0.6200 |
| 3 | 0.7400 | 0.5800 | 0.6900 | – | – | – |

## Each run epoch by epoch

| run | flags | valid AUC, epoch by epoch | test AUC, epoch by epoch | best epoch: valid / test AUC | train AUC at best |
| --- | --- | --- | --- | --- | --- |
| QIN | – | 0.7000 / **0.7500** / 0.7400 (cap) | 0.6500 / **0.6800** / 0.6900 (cap) | 2: 0.7500 / 0.6800 | 0.714 |
| din | `--nobatch_norm --din_dnn_units=64,32 --id_dropout=0.3 --model=din --epochs=5` | **0.7123** / 0.7050 | – | 1: 0.7123 / – | 0.600 |
"""


def test_tables_from_fake_runs(runs):
    rt = load_script("results_tables")
    assert rt.tables([rt.load_run(a) for a in runs], ("auc", "logloss")) == EXPECTED


def test_cli_prints_the_tables_and_names_a_missing_file(runs, tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, *runs, "--epoch_metrics=auc,logloss"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == EXPECTED
    proc = subprocess.run([sys.executable, SCRIPT, runs[1], str(tmp_path / "nothing")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"results_tables: error: {tmp_path / 'nothing' / 'metrics.json'}: ")
    assert proc.stdout == ""


def test_spread_groups_runs_that_differ_in_the_seed_only(tmp_path, capsys):
    """--spread: one row per group of runs differing in --seed only: mean ± sample sd [min, max]."""
    rt = load_script("results_tables")
    args = []
    for name, policy, seed, valid, test in (("qin_float32_s1", "float32", 1, 0.78, 0.72),
                                            ("qin_float32_s2", "float32", 2, 0.76, 0.70),
                                            ("qin_float32_s3", "float32", 3, 0.77, 0.74),
                                            ("qin_mixed_bfloat16_s1", "mixed_bfloat16", 1, 0.775, 0.71)):
        path = str(tmp_path / name)
        _write_run(path, config={"model": {"model": "qin", "dtype_policy": policy},
                                 "train": {"epochs": 3, "monitor_splits": ["test"], "model_dir": path, "seed": seed}},
                   best_epoch=seed, stopped_early=False, train_seconds=60.0 * seed,
                   history=[{"epoch": 1, "auc": 0.6, "val_auc": valid}],
                   splits={"valid": _split(valid, 0.6, 0.7), "test": _split(test, 0.7, 0.6)})
        args.append(path)
    assert rt.main([*args, "--spread"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("| runs | flags | n | seeds | best epochs | valid AUC | test AUC | test logloss | "
                      "train time (mean) |")
    assert out[2] == ("| qin_float32 | – | 3 | 1, 2, 3 | 1, 2, 3 | 0.7700 ± 0.0100 [0.7600, 0.7800] | "
                      "0.7200 ± 0.0200 [0.7000, 0.7400] | 0.7000 ± 0.0000 [0.7000, 0.7000] | 2.0 min |")
    assert out[3] == ("| qin_mixed_bfloat16 | `--dtype_policy=mixed_bfloat16` | 1 | 1 | 1 | 0.7750 | 0.7100 | "
                      "0.7000 | 1.0 min |")
    assert len(out) == 4
