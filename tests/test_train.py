"""Training on the bundled sample: the CLI end to end, flags, schedule, resume, NaN.

The end-to-end run is the command a user runs (``python -m qin_tf.train
--flagfile=configs/sample.flags``) in a subprocess, on the sample that
``tests/conftest.py`` preprocesses (max_len 16).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from absl import flags

from qin_tf import train
from qin_tf.config import ExperimentConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_FLAGS = os.path.join(REPO, "configs", "sample.flags")

# Kills the process (no cleanup, like a preempted machine) right after the
# backup of epoch 2 is written; otherwise the same run as the CLI.
KILLED_RUN = textwrap.dedent("""
    import os, sys
    import keras
    from absl import flags
    from qin_tf import train
    fv = flags.FlagValues(); train.define_flags(fv); train.parse_flags(sys.argv, fv)
    config = train.config_from_flags(fv)
    from qin_tf import task

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                os._exit(3)

    task.run(config, strategy=task.create_strategy(config.train.strategy), callbacks=[Kill()])
""")


def _env():
    env = dict(os.environ)
    for k in ("TF_CONFIG", "QIN_TF_VERBOSE"):
        env.pop(k, None)
    return env


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "qin_tf.train", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def sample_args(spec, model_dir, *extra):
    return [f"--flagfile={SAMPLE_FLAGS}", f"--data_dir={spec.base_dir}", f"--model_dir={model_dir}", *extra]


def read_metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


def split_arrays(spec, split, names):
    """Columns ``names`` (and the label) of a split, read back from its TFRecords."""
    from qin_tf.data import make_dataset

    cols = {n: [] for n in names}
    labels = []
    for feats, label in make_dataset(spec, split, 512, training=False, with_meta=True):
        for n in names:
            cols[n].append(feats[n].numpy())
        labels.append(label.numpy())
    return {n: np.concatenate(v) for n, v in cols.items()}, np.concatenate(labels)


@pytest.fixture(scope="module")
def sample_run(sample_spec, tmp_path_factory):
    """``python -m qin_tf.train --flagfile=configs/sample.flags`` on the sample."""
    model_dir = str(tmp_path_factory.mktemp("runs") / "qin")
    proc = run_cli(*sample_args(sample_spec, model_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return model_dir, proc


# --------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------


def test_cli_writes_every_artefact_with_a_clean_console(sample_run, sample_spec):
    model_dir, proc = sample_run
    assert proc.stderr == "", proc.stderr  # no TensorFlow import noise, no warnings
    for name in ("config.json", "feature_spec.json", "checkpoints/best.weights.h5",
                 "checkpoints/latest.weights.h5", "best.keras", "metrics.json", "curves.png"):
        assert os.path.getsize(os.path.join(model_dir, name)) > 0, name
    assert not os.path.exists(os.path.join(model_dir, "backup"))  # removed once the run is complete
    for sub in ("train", "valid"):
        events = os.listdir(os.path.join(model_dir, "logs", sub))
        assert any(e.startswith("events.out.tfevents") for e in events), events
    with open(os.path.join(model_dir, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "num_replicas_in_sync=1" in proc.stdout
    assert "epoch 1/" in proc.stdout and "done: best epoch" in proc.stdout
    # the data it trained on, not only the dataset config's name (the sample's is microlens50k_mmctr)
    assert f"training qin on {sample_spec.base_dir} (2,622 train rows, dataset config " in proc.stdout


def test_tensorboard_is_installed_and_reads_the_logs(sample_run):
    # README: `tensorboard --logdir MODEL_DIR/logs`; tensorboard is a dependency, so the viewer is there
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    assert os.access(os.path.join(os.path.dirname(sys.executable), "tensorboard"), os.X_OK)
    model_dir, _ = sample_run
    history = read_metrics(model_dir)["history"]
    for run, tag, key in (("train", "loss", "loss"), ("train", "auc", "auc"), ("valid", "auc", "val_auc")):
        acc = event_accumulator.EventAccumulator(os.path.join(model_dir, "logs", run),
                                                 size_guidance={event_accumulator.TENSORS: 0})
        acc.Reload()
        assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
        events = acc.Tensors(tag)
        assert [e.step for e in events] == list(range(1, len(history) + 1))
        np.testing.assert_allclose([float(tensor_util.make_ndarray(e.tensor_proto)) for e in events],
                                   [r[key] for r in history], rtol=1e-6)


def test_resolved_config_json_is_flagfile_plus_overrides(sample_run, sample_spec):
    model_dir, _ = sample_run
    with open(os.path.join(model_dir, "config.json")) as f:
        saved = json.load(f)
    fv = flags.FlagValues()
    train.define_flags(fv)
    train.parse_flags(["train", *sample_args(sample_spec, model_dir)], fv)
    assert saved == train.config_from_flags(fv).to_dict()
    assert ExperimentConfig.from_dict(saved) == train.config_from_flags(fv)
    assert saved["model"]["embedding_dim"] == 16          # from the flagfile
    assert saved["train"]["data_dir"] == sample_spec.base_dir  # explicit flag over the flagfile
    assert saved["train"]["clipnorm"] == 10.0             # default


def test_qin_learns_and_beats_views_level_alone(sample_run, sample_spec):
    from qin_tf import metrics as qm

    model_dir, _ = sample_run
    m = read_metrics(model_dir)
    hist = m["history"]
    assert m["model"] == "qin" and m["num_replicas_in_sync"] == 1 and m["strategy"] == "one_device"
    assert len(hist) == m["epochs_run"] >= 3
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    assert hist[m["best_epoch"] - 1]["val_logloss"] < hist[0]["val_logloss"]

    # the context feature alone, scored by its raw value, on the sample's test split
    context = sample_spec.context[0]
    cols, labels = split_arrays(sample_spec, "test", [context])
    baseline = qm.auc(labels, cols[context])
    assert 0.6 < baseline < 0.7  # 0.659 on this sample
    test = m["splits"]["test"]
    assert test["auc"] > baseline, (test["auc"], baseline)
    assert test["num_examples"] == sample_spec.splits["test"].num_rows
    assert test["gauc_groups"] > 0 and 0.5 < test["gauc"] < 1.0
    assert 0.3 < test["logloss"] < 0.7


def test_schedule_and_best_epoch_in_the_real_run(sample_run):
    model_dir, _ = sample_run
    m = read_metrics(model_dir)
    hist = m["history"]
    with open(os.path.join(model_dir, "config.json")) as f:
        tc = json.load(f)["train"]
    # the best epoch is the first epoch with the highest valid AUC
    aucs = [r["val_auc"] for r in hist]
    assert m["best_epoch"] == 1 + int(np.argmax(aucs))
    # the learning rate halves after each epoch without improvement, else stays
    best = -np.inf
    for prev, cur in zip(hist, hist[1:]):
        improved = prev["val_auc"] >= best + tc["min_delta"]
        best = max(best, prev["val_auc"]) if improved else best
        expected = prev["lr"] if improved else max(prev["lr"] * tc["lr_decay_factor"], tc["min_lr"])
        assert cur["lr"] == pytest.approx(expected, rel=1e-6)
    if m["stopped_early"]:
        assert len(hist) - m["best_epoch"] == tc["patience"]
    # reported valid metrics are those of the best epoch (its weights were restored)
    assert m["splits"]["valid"]["auc"] == pytest.approx(hist[m["best_epoch"] - 1]["val_auc"], abs=1e-9)
    assert m["splits"]["valid"]["logloss"] == pytest.approx(hist[m["best_epoch"] - 1]["val_logloss"], abs=1e-9)


def test_best_keras_reloads_with_the_best_weights(sample_run, sample_spec):
    import keras

    import qin_tf.model  # noqa: F401  (registers the layers)
    from qin_tf import metrics as qm

    model_dir, _ = sample_run
    model = keras.saving.load_model(os.path.join(model_dir, "best.keras"), compile=False)
    names = list(sample_spec.model_feature_names)
    cols, labels = split_arrays(sample_spec, "valid", names)
    preds = np.asarray(model.predict(cols, batch_size=256, verbose=0)).reshape(-1)
    assert qm.auc(labels, preds) == pytest.approx(read_metrics(model_dir)["splits"]["valid"]["auc"], abs=1e-6)


def test_din_trains_without_test_labels_and_exports(sample_spec, tmp_path, capsys):
    # the sample with its test split marked unlabelled, as the challenge's is
    data_dir = tmp_path / "data"
    shutil.copytree(sample_spec.base_dir, data_dir)
    spec = json.loads((data_dir / "feature_spec.json").read_text())
    spec["splits"]["test"]["labelled"] = False
    (data_dir / "feature_spec.json").write_text(json.dumps(spec))

    model_dir, export_base = str(tmp_path / "din"), str(tmp_path / "serving")
    rc = train.cli(["train", f"--flagfile={SAMPLE_FLAGS}", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
                    "--model=din", "--din_attention_units=32,16", "--din_dnn_units=64,32",
                    f"--export_base={export_base}"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    m = read_metrics(model_dir)
    assert m["model"] == "din"
    hist = m["history"]
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    assert max(r["val_auc"] for r in hist) > hist[0]["val_auc"] + 0.05
    assert m["splits"]["valid"]["auc"] > 0.65
    # the unlabelled split gets no metrics, and says so
    assert list(m["splits"]) == ["valid"] and m["skipped_splits"] == {"test": "unlabelled"}
    assert "split `test` has no labels: no metrics" in out.out
    # --export_base: the chief exported the best model as SavedModel version 1
    assert m["export"] == os.path.join(export_base, "1")
    assert os.path.exists(os.path.join(export_base, "1", "saved_model.pb"))


def test_training_works_with_an_outlier_context_value(tmp_path, capsys):
    # the sample plus one train row with views_level 10**12, which once sized the context
    # table at 10**12 + 1 rows and ran out of memory: the bound sends it to the OOV row
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.preprocess import preprocess
    from tests.conftest import SAMPLE_DATASET_CONFIG, SAMPLE_DIR, SAMPLE_MAX_LEN

    raw = tmp_path / "raw"
    shutil.copytree(SAMPLE_DIR, raw)
    table = pq.read_table(raw / "train.parquet")
    outlier = table.slice(0, 1).to_pylist()
    outlier[0]["views_level"] = 10**12
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist(outlier, schema=table.schema)]),
                   raw / "train.parquet")
    spec = preprocess(str(raw), str(tmp_path / "data"), SAMPLE_DATASET_CONFIG, max_len=SAMPLE_MAX_LEN)
    assert spec.context_vocab_sizes == (11,)  # views_level 0..10; the outlier uses the OOV row
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["context_vocab"]["views_level"]["oov_values"] == {str(10**12): 1}

    model_dir = str(tmp_path / "model")
    # 2 epochs: after 1, valid AUC sat at 0.55-0.56, too close to chance to tell a broken run
    rc = train.cli(["train", *sample_args(spec, model_dir), "--epochs=2"])
    assert rc == 0, capsys.readouterr().err
    m = read_metrics(model_dir)
    assert len(m["history"]) == 2 and np.isfinite(m["history"][-1]["loss"])
    assert m["splits"]["valid"]["auc"] > 0.6, m["splits"]["valid"]["auc"]


def test_monitor_splits_reports_test_metrics_every_epoch(sample_spec, tmp_path, capsys, monkeypatch):
    from qin_tf import task

    predicted = []
    predict = task.SplitEvaluator.predict
    monkeypatch.setattr(task.SplitEvaluator, "predict",
                        lambda self, model: predicted.append(self.split) or predict(self, model))
    model_dir = str(tmp_path / "monitored")
    rc = train.cli(["train", *sample_args(sample_spec, model_dir), "--epochs=3", "--monitor_splits=test"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    # each split is predicted once an epoch; the final evaluation reuses the best epoch's scores
    assert predicted == ["valid", "test"] * 3
    m = read_metrics(model_dir)
    assert [set(r) >= {"test_auc", "test_logloss", "test_gauc", "val_auc"} for r in m["history"]] == [True] * 3
    assert "test_auc" in out.out.splitlines()[2]
    # the best weights are restored, so the final test evaluation is the best epoch's
    best = m["history"][m["best_epoch"] - 1]
    assert best["test_auc"] == pytest.approx(m["splits"]["test"]["auc"], abs=1e-9)
    assert best["test_logloss"] == pytest.approx(m["splits"]["test"]["logloss"], rel=1e-5)


def test_monitor_split_must_exist_and_be_labelled(sample_spec, tmp_path, capsys):
    rc = train.cli(["train", *sample_args(sample_spec, str(tmp_path / "m")), "--monitor_splits=holdout"])
    assert rc == 1 and "no split `holdout`" in capsys.readouterr().err


def test_history_records_the_data_loss_apart_from_l2(sample_run):
    hist = read_metrics(sample_run[0])["history"]
    assert all(0 < r["logloss"] < r["loss"] for r in hist)  # the sample has L2 0.3
    assert hist[0]["loss"] > 2 * hist[0]["logloss"]
    assert abs(hist[-1]["logloss"] - hist[-1]["val_logloss"]) < 0.15  # the scale of the valid logloss


def test_curves_plot_the_logloss_apart_from_the_loss_with_l2(tmp_path, monkeypatch):
    """The loss with L2 (6 -> 2 here) must not squash train and valid logloss (0.6-0.7) on one axis."""
    import matplotlib.figure

    from qin_tf import report

    figures, savefig = [], matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    history = [{"epoch": e, "loss": 6.0 / e, "logloss": 0.70 - 0.02 * e, "val_logloss": 0.66 - 0.01 * e,
                "auc": 0.7, "val_auc": 0.68, "lr": 2e-3} for e in (1, 2, 3)]
    report.plot_curves(history, {}, str(tmp_path / "curves.png"), best_epoch=2)
    loss_axes = figures[0].axes[0]
    assert [line.get_label() for line in loss_axes.get_lines()] == ["train logloss", "valid logloss", "best epoch 2"]
    low, high = loss_axes.get_ylim()
    assert 0.5 < low and high < 0.8
    with_l2 = [ax for ax in figures[0].axes if ax.get_ylabel() == "train loss with L2"]
    assert [list(line.get_ydata()) for line in with_l2[0].get_lines()] == [[6.0, 3.0, 2.0]]


# --------------------------------------------------------------------------
# Progress within an epoch
# --------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _one_epoch(logger, clock, steps, seconds_per_step):
    logger.on_epoch_begin(0)
    for batch in range(steps):
        clock.now += seconds_per_step
        logger.on_train_batch_end(batch, {"loss": 0.5, "auc": 0.75})
    logger.on_epoch_end(0, {"loss": 0.5, "auc": 0.75, "val_auc": 0.7, "lr": 0.002})


def test_progress_lines_in_a_log_come_by_time_and_by_steps():
    from qin_tf.callbacks import ProgressLogger

    lines, clock = [], _Clock()
    by_time = ProgressLogger(epochs=2, steps_per_epoch=10, global_batch_size=100, every_steps=0,
                             every_seconds=30, print_fn=lines.append, clock=clock)
    _one_epoch(by_time, clock, 10, seconds_per_step=12.0)  # a line once 30 s have passed: steps 3, 6, 9
    assert lines == [f"epoch 1/2  step {s}/10  loss 0.5000  auc 0.7500  8 examples/s" for s in (3, 6, 9)] + [
        "epoch 1/2 done in 120.0s: loss 0.5000  auc 0.7500  val_auc 0.7000  lr 0.0020"]

    lines.clear()
    by_steps = ProgressLogger(epochs=2, steps_per_epoch=10, global_batch_size=100, every_steps=4,
                              every_seconds=0, print_fn=lines.append, clock=clock)
    _one_epoch(by_steps, clock, 10, seconds_per_step=1.0)
    assert lines[:-1] == [f"epoch 1/2  step {s}/10  loss 0.5000  auc 0.7500  100 examples/s" for s in (4, 8)]


def test_progress_bar_on_a_terminal(capsys):
    from qin_tf.callbacks import ProgressLogger

    lines, clock = [], _Clock()
    bar = ProgressLogger(epochs=2, steps_per_epoch=5, global_batch_size=100, every_steps=1, interactive=True,
                         print_fn=lines.append, clock=clock)
    _one_epoch(bar, clock, 5, seconds_per_step=1.0)
    drawn = capsys.readouterr().out
    assert "\r" in drawn and "1/5" in drawn and "5/5" in drawn and "loss: 0.5000" in drawn  # redrawn in place
    assert drawn.endswith("\n")  # the bar's line ends before the epoch's summary
    assert lines == ["epoch 1/2", "epoch 1/2 done in 5.0s: loss 0.5000  auc 0.7500  val_auc 0.7000  lr 0.0020"]


def test_the_loop_shows_the_callbacks_every_step(sample_spec, tmp_path):
    """Progress within an epoch: the loop must not run an epoch's steps in one call (as with log_every_steps=0)."""
    import keras

    from qin_tf import task

    class Steps(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_train_batch_end(self, batch, logs=None):
            self.seen.append(batch)

    fv = flags.FlagValues()
    train.define_flags(fv)
    train.parse_flags(["train", *sample_args(sample_spec, str(tmp_path / "m")), "--epochs=1",
                       "--log_every_steps=0"], fv)
    steps, lines = Steps(), []
    task.run(train.config_from_flags(fv), strategy=task.create_strategy("one_device"), callbacks=[steps],
             print_fn=lines.append)
    assert steps.seen == list(range(11))  # ceil(2,622 rows / 256)
    assert lines[0].endswith("11 steps per epoch")


# --------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------


def test_flag_precedence_defaults_flagfile_explicit(tmp_path):
    flagfile = tmp_path / "exp.flags"
    flagfile.write_text("# a comment\n--learning_rate=0.01\n--embedding_dim=8\n--epochs=3\n"
                        "--din_dnn_units=32,16\n--clipnorm=none\n--monitor_splits=test,valid\n")
    fv = flags.FlagValues()
    train.define_flags(fv)
    # the explicit --epochs stands BEFORE the flagfile and still wins
    train.parse_flags(["train", "--epochs=7", f"--flagfile={flagfile}", "--attention_dim=12",
                       "--nobatch_norm"], fv)
    cfg = train.config_from_flags(fv)
    assert cfg.train.epochs == 7                      # explicit > flagfile
    assert cfg.train.learning_rate == 0.01            # flagfile > default
    assert cfg.model.embedding_dim == 8
    assert cfg.model.din_dnn_units == (32, 16)
    assert cfg.train.monitor_splits == ("test", "valid")
    assert cfg.train.clipnorm is None
    assert cfg.model.attention_dim == 12
    assert cfg.model.batch_norm is False
    assert cfg.model.num_layers == 4                  # default
    assert cfg.train.global_batch_size == 8192
    assert cfg.train.patience == 8


def test_tuned_flagfile_is_the_released_one_plus_its_overrides(monkeypatch):
    monkeypatch.chdir(REPO)                             # the flagfiles name paths from the repository root
    fv = flags.FlagValues()
    train.define_flags(fv)
    train.parse_flags(["train", "--flagfile=configs/microlens50k_tuned.flags", "--epochs=2"], fv)
    cfg = train.config_from_flags(fv)
    released = flags.FlagValues()
    train.define_flags(released)
    train.parse_flags(["train", "--flagfile=configs/microlens50k.flags"], released)
    base = train.config_from_flags(released)
    assert (cfg.model.dropout, cfg.model.id_dropout) == (0.5, 0.3)
    assert cfg.train.epochs == 2                        # explicit flags still win
    assert dataclasses.replace(cfg.model, dropout=base.model.dropout, id_dropout=0.0) == base.model
    assert dataclasses.replace(cfg.train, epochs=base.train.epochs) == base.train


def test_transformer_dcn_flagfile_holds_the_winners_released_values(monkeypatch):
    """configs/transformer_dcn.flags: the challenge winner's model sizes and released training values."""
    monkeypatch.chdir(REPO)
    fv = flags.FlagValues()
    train.define_flags(fv)
    train.parse_flags(["train", "--flagfile=configs/transformer_dcn.flags"], fv)
    cfg = train.config_from_flags(fv)
    m, t = cfg.model, cfg.train
    assert (m.name, m.resolved_extractor, m.resolved_head) == ("transformer_dcn", "transformer", "dcn_v2")
    assert (m.transformer_layers, m.transformer_heads, m.transformer_ff_units, m.transformer_dropout,
            m.transformer_last_k) == (2, 1, 256, 0.2, 16)
    assert (m.cross_layers, m.cross_projection_dim, m.din_dnn_units, m.head_mlp_units) == (
        3, None, (1024, 512, 256), (64, 32))
    assert (m.dropout, m.batch_norm, m.embedding_dim, m.embedding_l2, m.net_l2) == (0.2, False, 64, 0.0, 0.0)
    assert (t.learning_rate, t.global_batch_size, t.patience) == (5e-4, 128, 5)


def test_every_config_field_is_a_flag():
    import dataclasses

    from qin_tf.config import ModelConfig, TrainConfig

    fv = flags.FlagValues()
    train.define_flags(fv)
    for cls in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert fv[f.name].default == f.default, f.name
            assert fv[f.name].help, f.name


def test_bad_flags_exit_with_a_message(capsys):
    assert train.cli(["train", "--dropout=1.5", "--data_dir=x", "--model_dir=y"]) == 1
    assert "`dropout` must be in [0, 1). Received: dropout=1.5" in capsys.readouterr().err
    assert train.cli(["train", "--strategy=tpu"]) == 1
    assert "`strategy` must be one of" in capsys.readouterr().err
    assert train.cli(["train", "--no_such_flag=1"]) == 2


def test_missing_data_dir_is_a_clear_error(tmp_path, capsys):
    rc = train.cli(["train", f"--data_dir={tmp_path / 'nope'}", f"--model_dir={tmp_path / 'm'}"])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope'}: no such file or directory." in err and "preprocess" not in err
    (tmp_path / "empty").mkdir()  # a directory without a spec: then preprocessing is the hint
    rc = train.cli(["train", f"--data_dir={tmp_path / 'empty'}", f"--model_dir={tmp_path / 'm'}"])
    assert rc == 1
    assert "no feature spec here; run `python -m pipelines.preprocess` first" in capsys.readouterr().err


def test_a_finished_run_is_not_overwritten_by_accident(sample_run, sample_spec, capsys):
    model_dir, _ = sample_run
    before = os.path.getmtime(os.path.join(model_dir, "metrics.json"))
    rc = train.cli(["train", *sample_args(sample_spec, model_dir, "--nooverwrite")])
    assert rc == 1
    assert "holds a finished run" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(model_dir, "metrics.json")) == before


# --------------------------------------------------------------------------
# Learning-rate schedule, early stopping, restore best (crafted sequence)
# --------------------------------------------------------------------------


def test_plateau_schedule_on_a_crafted_sequence():
    import keras

    from qin_tf.callbacks import PlateauSchedule

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    opt = keras.optimizers.Adam(learning_rate=1e-2)
    opt.build(model.trainable_variables)
    messages = []
    improved_at = []
    cb = PlateauSchedule(opt, min_delta=1e-6, factor=0.5, min_lr=2e-3, patience=3,
                         on_improvement=improved_at.append, print_fn=messages.append)
    cb.set_model(model)
    model.stop_training = False
    best = 0.65
    sequence = [0.60, 0.65, best + 5e-7,  # below best + min_delta: no improvement
                best + 1e-6,              # exactly best + min_delta: improvement
                0.64, 0.6499, 0.65,       # 3 epochs in a row without improvement: stop
                0.70]                     # never reached
    lrs, stopped = [], None
    for epoch, value in enumerate(sequence):
        for w in model.weights:  # mark the weights with the epoch
            w.assign(np.full(w.shape, float(epoch)))
        lrs.append(cb.learning_rate)
        logs = {"val_auc": value}
        cb.on_epoch_end(epoch, logs)
        assert logs["best_val_auc"] == cb.best
        if model.stop_training:
            stopped = epoch
            break
    # halved after epochs 3, 5, 6, 7 (1-based); 1.25e-3 and 1e-3 floored at min_lr 2e-3
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3, 2e-3])
    assert cb.learning_rate == pytest.approx(2e-3)
    assert stopped == 6 and cb.stopped_epoch == 6
    assert cb.best_epoch == 3 and cb.best == best + 1e-6
    assert improved_at == [0, 1, 3]
    assert cb.wait == 3
    cb.restore_best()
    for w in model.weights:
        assert np.all(keras.ops.convert_to_numpy(w) == 3.0)
    assert any("early stop after epoch 7" in m for m in messages)
    # the state survives a backup round trip
    other = PlateauSchedule(opt, patience=3)
    other.set_state(json.loads(json.dumps(cb.get_state())))
    assert other.get_state() == cb.get_state()


# --------------------------------------------------------------------------
# Resume after a kill; NaN
# --------------------------------------------------------------------------


def test_killed_run_resumes_to_the_same_result(sample_run, sample_spec, tmp_path, capsys):
    """Killed after epoch 2 of a run capped at 40 epochs, resumed with the sample's cap (--epochs may
    change on resume): the result equals the uninterrupted run with that cap."""
    model_dir = str(tmp_path / "killed")
    args = sample_args(sample_spec, model_dir)
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, *args, "--epochs=40"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    with open(os.path.join(model_dir, "backup", "state.json")) as f:
        state = json.load(f)
    assert state["next_epoch"] == 2 and not os.path.exists(os.path.join(model_dir, "metrics.json"))
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["train"]["epochs"] == 40

    # resuming with another configuration is refused
    rc = train.cli(["train", *args, "--embedding_dim=8"])
    assert rc == 1
    assert "different configuration (model.embedding_dim: 16 -> 8)" in capsys.readouterr().err

    # ... and so is resuming on other data: other shards, or another spec
    other = tmp_path / "other_data"
    shutil.copytree(sample_spec.base_dir, other)
    shutil.copy(other / "train-00001-of-00002.tfrecord.gz", other / "train-00000-of-00002.tfrecord.gz")
    rc = train.cli(["train", *args, f"--data_dir={other}"])
    assert rc == 1
    assert capsys.readouterr().err == (
        f"train: error: {model_dir} holds an unfinished run that started on other data than --data_dir={other} "
        f"(the shards differ: train-00000-of-00002.tfrecord.gz; it started on {sample_spec.base_dir}). "
        f"Resume it with the data it started on, or use another --model_dir.\n")
    shutil.rmtree(other)
    shutil.copytree(sample_spec.base_dir, other)
    spec_json = json.loads((other / "feature_spec.json").read_text())
    spec_json["context_vocab_sizes"] = [v + 1 for v in spec_json["context_vocab_sizes"]]
    (other / "feature_spec.json").write_text(json.dumps(spec_json))
    assert train.cli(["train", *args, f"--data_dir={other}"]) == 1
    assert "(the feature specs differ in context_vocab_sizes; it started on" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))

    # The same data elsewhere (moved, copied) resumes.
    moved = tmp_path / "moved_data"
    shutil.copytree(sample_spec.base_dir, moved)
    args = [a if not a.startswith("--data_dir=") else f"--data_dir={moved}" for a in args]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "2 epochs done" in proc.stdout
    assert "epoch 1/" not in proc.stdout and "epoch 3/20 " in proc.stdout
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["train"]["epochs"] == 20
    resumed, uninterrupted = read_metrics(model_dir), read_metrics(sample_run[0])
    assert resumed["best_epoch"] == uninterrupted["best_epoch"]
    assert len(resumed["history"]) == len(uninterrupted["history"])
    for a, b in zip(resumed["history"], uninterrupted["history"]):
        for k in ("loss", "val_auc", "val_logloss", "val_gauc", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["epoch"], k)
    for split in ("valid", "test"):
        for k in ("auc", "logloss", "gauc"):
            assert resumed["splits"][split][k] == pytest.approx(uninterrupted["splits"][split][k], abs=1e-7)


def test_nan_loss_stops_with_a_clear_message(sample_spec, tmp_path, capsys):
    model_dir = str(tmp_path / "nan")
    rc = train.cli(["train", *sample_args(sample_spec, model_dir, "--learning_rate=1e30", "--epochs=2")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "error: the training loss is nan at epoch 1, step" in err
    assert "training diverged. Lower --learning_rate (now 1e+30)" in err
    assert not os.path.exists(os.path.join(model_dir, "metrics.json"))
    assert not os.path.exists(os.path.join(model_dir, "best.keras"))


# --------------------------------------------------------------------------
# mixed_float16: loss scaling
# --------------------------------------------------------------------------


def test_loss_scale_skips_a_step_whose_float16_gradient_overflows():
    """x = 100 and the initial scale 2**15: the scaled float16 gradient of the kernel (~1.6e6) is inf.
    Each such step leaves the weights and Adam's step alone and halves the scale, until the
    scaled gradient fits (scale 1024); that step trains. The reported loss is the unscaled one."""
    import keras
    import tensorflow as tf

    from qin_tf import task

    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        x = keras.Input((1,), name="x")
        logit = keras.layers.Dense(1, dtype="mixed_float16", kernel_initializer=keras.initializers.Constant(1e-3),
                                   name="dense")(x)
        model = keras.Model(x, keras.layers.Activation("sigmoid", dtype="float32")(logit))
        optimizer = task.make_optimizer(0.1, "mixed_float16")
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        optimizer.build(model.trainable_variables)
        loop = task.TrainLoop(model, optimizer, strategy, global_batch_size=1, clipnorm=10.0)
    data = tf.data.Dataset.from_tensors((tf.constant([[100.0]]), tf.constant([0.0]))).repeat()
    iterator = iter(strategy.distribute_datasets_from_function(lambda ctx: data))
    before = [w.numpy().copy() for w in model.trainable_weights]
    expected_loss = -np.log(1 - 1 / (1 + np.exp(-0.1)))      # BCE of label 0 at p = sigmoid(100 * 1e-3)
    for k in range(5):                                         # 2**15 ... 2**11: inf, skipped
        total, done, last = loop.run(iterator, tf.constant(1))
        assert int(done) == 1 and float(last) == pytest.approx(expected_loss, rel=1e-3)
        assert float(optimizer.dynamic_scale) == 2.0 ** (14 - k)
        assert int(optimizer.iterations) == 0
        for w, b in zip(model.trainable_weights, before):
            np.testing.assert_array_equal(w.numpy(), b)
    loop.run(iterator, tf.constant(1))                         # scale 1024: finite, applied
    assert float(optimizer.dynamic_scale) == 1024.0 and int(optimizer.iterations) == 1
    assert model.get_layer("dense").kernel.numpy()[0, 0] < 1e-3  # label 0: the logit goes down
    assert isinstance(task.make_optimizer(0.1, "mixed_bfloat16"), keras.optimizers.Adam)


def test_mixed_float16_trains_resumes_and_exports(sample_spec, tmp_path, capsys):
    """The sample under mixed_float16 (with batch norm: without it the untrained QNN's activations
    overflow float16): stopped after epoch 1, resumed from the backup (the loss scale's variables
    with Adam's), finished; the export serves float32 and scores the test split."""
    import keras

    from qin_tf import task

    model_dir, export_base = str(tmp_path / "fp16"), str(tmp_path / "export")
    args = ["train", *sample_args(sample_spec, model_dir, "--dtype_policy=mixed_float16", "--batch_norm",
                                  "--epochs=2", f"--export_base={export_base}")]

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise KeyboardInterrupt

    fv = flags.FlagValues()
    train.define_flags(fv)
    train.parse_flags(args[:-1], fv)   # no --export_base: qin_tf.task does not export
    with pytest.raises(KeyboardInterrupt):
        task.run(train.config_from_flags(fv), strategy=task.create_strategy("one_device"), callbacks=[Stop()])
    assert train.cli(args) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "1 epochs done" in out and "epoch 2/2 " in out
    metrics = read_metrics(model_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["model"]["dtype_policy"] == "mixed_float16"
    losses = [h["loss"] for h in metrics["history"]]
    assert np.all(np.isfinite(losses)) and losses[1] < losses[0]
    assert 0.0 < metrics["splits"]["test"]["logloss"] < 1.0

    import tensorflow as tf

    from export import exporter

    loaded = tf.saved_model.load(exporter.latest_version_dir(export_base))
    sig = loaded.signatures["serving_default"]
    assert sig.structured_outputs["ctr"].dtype == tf.float32


def test_native_bfloat16_probe(tmp_path):
    """``auto`` is mixed_bfloat16 exactly where the hardware computes bfloat16: GPUs (all of compute
    capability 8.0 or more) decide when there are any, else the CPU's amx_bf16 or avx512_bf16 flag."""
    from qin_tf import runtime

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f amx_tile amx_bf16\n\nprocessor\t: 1\nflags\t\t: x\n")
    assert runtime.cpu_flags(str(cpuinfo)) == {"fpu", "avx512f", "amx_tile", "amx_bf16"}
    assert runtime.cpu_flags(str(tmp_path / "none")) == frozenset()
    cases = [
        (dict(gpus=[], flags=frozenset({"avx512f", "amx_bf16"})), "mixed_bfloat16", "auto: CPU flag amx_bf16"),
        (dict(gpus=[], flags=frozenset({"avx512_bf16"})), "mixed_bfloat16", "auto: CPU flag avx512_bf16"),
        (dict(gpus=[], flags=frozenset({"avx512f", "avx2"})), "float32", "auto: no native bfloat16 on this machine"),
        (dict(gpus=[(9, 0), (8, 0)], flags=frozenset()), "mixed_bfloat16", "auto: GPU compute capability 8.0"),
        (dict(gpus=[(9, 0), (7, 5)], flags=frozenset({"amx_bf16"})), "float32",
         "auto: no native bfloat16 on this machine"),                 # GPUs decide where there are any
        (dict(gpus=[None], flags=frozenset({"amx_bf16"})), "float32", "auto: no native bfloat16 on this machine"),
    ]
    for probe, policy, why in cases:
        assert runtime.resolve_dtype_policy("auto", **probe) == (policy, why)
    for policy in (None, "float32", "mixed_bfloat16", "mixed_float16"):
        assert runtime.resolve_dtype_policy(policy, gpus=[], flags=frozenset({"amx_bf16"})) == (policy, "as asked")


def test_dtype_policy_auto_is_resolved_recorded_and_kept_on_resume(sample_spec, tmp_path, capsys, monkeypatch):
    """--dtype_policy=auto trains in this machine's policy, says so, and writes the resolved policy in
    config.json; an unfinished run resumed with auto keeps the policy it started with, wherever it resumes."""
    import functools

    from qin_tf import runtime, task

    probe = runtime.native_bfloat16
    for native, want in ((frozenset({"avx512_bf16"}), "mixed_bfloat16"), (frozenset(), "float32")):
        monkeypatch.setattr(runtime, "native_bfloat16", functools.partial(probe, gpus=[], flags=native))
        model_dir = tmp_path / want
        assert train.cli(["train", *sample_args(sample_spec, model_dir, "--dtype_policy=auto", "--epochs=1",
                                                "--steps_per_epoch=2")]) == 0
        out = capsys.readouterr().out
        assert f"dtype policy {want} (auto: " in out
        with open(model_dir / "config.json") as f:
            assert json.load(f)["model"]["dtype_policy"] == want
    # an unfinished run (a backup beside its config.json) started in mixed_bfloat16, resumed on a machine
    # without native bfloat16: auto keeps mixed_bfloat16
    monkeypatch.setattr(runtime, "native_bfloat16", functools.partial(probe, gpus=[], flags=frozenset()))
    fv = flags.FlagValues()
    train.define_flags(fv)
    train.parse_flags(["train", *sample_args(sample_spec, tmp_path / "mixed_bfloat16", "--dtype_policy=auto")], fv)
    config = train.config_from_flags(fv)
    assert task._resolve_dtype_policy(config)[0].model.dtype_policy == "float32"   # finished: no backup
    (tmp_path / "mixed_bfloat16" / task.BACKUP_DIR).mkdir()
    resolved, why = task._resolve_dtype_policy(config)
    assert resolved.model.dtype_policy == "mixed_bfloat16" and "unfinished run" in why
    assert task._resolve_dtype_policy(dataclasses.replace(
        config, model=dataclasses.replace(config.model, dtype_policy="float32"))) == (
        dataclasses.replace(config, model=dataclasses.replace(config.model, dtype_policy="float32")), None)


def test_corrupt_shard_is_named_in_one_line(sample_spec, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(sample_spec.base_dir, data)
    shard = data / "train-00001-of-00002.tfrecord.gz"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 16] = bytes(b ^ 0xFF for b in raw[len(raw) // 2: len(raw) // 2 + 16])
    shard.write_bytes(bytes(raw))
    rc = train.cli(["train", f"--flagfile={SAMPLE_FLAGS}", f"--data_dir={data}",
                    f"--model_dir={tmp_path / 'model'}", "--epochs=1", "--steps_per_epoch=2"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith(f"train: error: {shard}: record 0: corrupt TFRecord data (inflate() failed")
    assert err.count("\n") == 1


ABLATIONS = {  # variant: (model name, layers it has, layers it must not have)
    "qin_din_attention": ("din_attention__qnn", {"DINAttention", "QuadraticNeuralNetwork"},
                          {"AdaptiveSparseTargetAttention"}),
    "asta_mlp_head": ("asta__dnn", {"MLPBlock", "AdaptiveSparseTargetAttention"}, {"QuadraticNeuralNetwork"}),
    "qnn_input_bn": ("qin", {"BatchNormalization", "QuadraticNeuralNetwork"}, set()),
    "qnn_dnn_tower": ("asta__qnn_dnn", {"QuadraticNeuralNetwork", "MLPBlock"}, set()),
}


def _layer_classes(model):
    return {type(layer).__name__ for layer in model.layers}


@pytest.mark.parametrize("variant", sorted(ABLATIONS))
def test_ablation_variants_are_flags_that_swap_one_part(sample_spec, tmp_path, variant):
    """scripts/ablate.py's variants (RESULTS.md's ablations) are train flags: each, with the train flags
    given after it, builds QIN with one part replaced."""
    from qin_tf.model import build_model
    from tests.conftest import load_script

    ablate = load_script("ablate")
    assert set(ablate.VARIANTS) == set(ABLATIONS)
    fv = flags.FlagValues()
    train.define_flags(fv)
    train.parse_flags(["train", *ablate.VARIANTS[variant], *sample_args(sample_spec, tmp_path / "m"),
                       "--epochs=1"], fv)
    config = train.config_from_flags(fv)
    name, has, lacks = ABLATIONS[variant]
    assert config.model.name == name and config.train.epochs == 1
    classes = _layer_classes(build_model(sample_spec, config.model, load_item_table=False))
    assert has <= classes and not lacks & classes


def test_ablation_script_trains_through_the_cli(sample_spec, tmp_path):
    """python scripts/ablate.py VARIANT [train flags]: the training CLI with the variant's flags."""
    import keras

    import qin_tf.layers  # noqa: F401  (registers the layers)

    model_dir = tmp_path / "model"
    proc = subprocess.run([sys.executable, os.path.join("scripts", "ablate.py"), "qin_din_attention",
                           *sample_args(sample_spec, model_dir, "--epochs=1", "--steps_per_epoch=2")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    name, has, lacks = ABLATIONS["qin_din_attention"]
    # metrics and the console name the pair of parts that trained
    assert read_metrics(model_dir)["epochs_run"] == 1
    assert read_metrics(model_dir)["model"] == name and f"training {name} on" in proc.stdout
    classes = _layer_classes(keras.saving.load_model(model_dir / "best.keras", compile=False))
    assert has <= classes and not lacks & classes


def test_cli_trains_the_winners_transformer_dcn_with_a_clean_console(sample_spec, tmp_path):
    """--model=transformer_dcn (toy sizes) through the CLI: keras-rs imports quietly, best.keras reloads."""
    import keras

    import qin_tf.layers  # noqa: F401  (registers the layers)

    model_dir = tmp_path / "model"
    proc = run_cli(*sample_args(sample_spec, model_dir, "--model=transformer_dcn", "--embedding_dim=4",
                                "--transformer_ff_units=8", "--transformer_last_k=4", "--cross_layers=2",
                                "--din_dnn_units=16", "--head_mlp_units=8", "--epochs=1", "--steps_per_epoch=2"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert read_metrics(model_dir)["model"] == "transformer_dcn"
    model = keras.saving.load_model(model_dir / "best.keras", compile=False)
    assert {"TargetTransformer", "CrossNetwork", "MLPBlock"} <= {type(layer).__name__ for layer in model.layers}
    with open(model_dir / "config.json") as f:
        assert json.load(f)["model"]["model"] == "transformer_dcn"


def test_ablation_script_rejects_an_unknown_variant():
    proc = subprocess.run([sys.executable, os.path.join("scripts", "ablate.py"), "nope"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "usage: python scripts/ablate.py" in proc.stderr


def test_auc_by_history_length_script_buckets_the_split(sample_run, sample_spec):
    """scripts/auc_by_history_length.py (RESULTS.md): bucket rows add up and the overall AUC is training's."""
    model_dir, _ = sample_run
    proc = subprocess.run([sys.executable, os.path.join("scripts", "auc_by_history_length.py"),
                           f"--data_dir={sample_spec.base_dir}", "--split=valid", f"--model_dirs={model_dir}",
                           "--edges=2,4"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(b["min"], b["max"]) for b in out["buckets"]] == [(0, 2), (3, 4), (5, None)]
    assert sum(b["rows"] for b in out["buckets"]) == out["all"]["rows"]
    assert out["all"]["auc"] == pytest.approx(read_metrics(model_dir)["splits"]["valid"]["auc"], abs=1e-4)


def test_cold_start_script_splits_rows_by_whether_the_target_was_trained(sample_run, sample_spec):
    """scripts/cold_start.py: seen/unseen/oov rows add up, match the train split's items, overall AUC is training's."""
    from tests.test_export import split_rows

    model_dir, _ = sample_run
    proc = subprocess.run([sys.executable, os.path.join("scripts", "cold_start.py"),
                           f"--data_dir={sample_spec.base_dir}", "--splits=valid", f"--model_dirs={model_dir}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    train = split_rows(sample_spec, "train")[0]
    seen = set(train[sample_spec.target_item].tolist()) | set(train[sample_spec.sequence].ravel().tolist())
    targets = split_rows(sample_spec, "valid")[0][sample_spec.target_item].tolist()
    assert not sample_spec.vocabularies  # the MMCTR layout: raw ids, item 1 is an ordinary item, no OOV part
    assert out["oov"]["rows"] == 0
    assert out["seen"]["rows"] == sum(t in seen for t in targets)
    assert out["seen"]["rows"] + out["unseen"]["rows"] + out["oov"]["rows"] == out["all"]["rows"] == len(targets)
    assert out["unseen"]["rows"] > 0 and out["seen"]["rows"] > 0  # the sample has both
    assert out["all"]["auc"] == pytest.approx(read_metrics(model_dir)["splits"]["valid"]["auc"], abs=1e-4)
