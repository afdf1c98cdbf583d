"""Warm start (``--warm_start_from``): weights loaded by name, tables grown by raw id, refusals, records.

The row maps are checked in-process on tiny synthetic specs and models (every
preset); the command end to end on the bundled sample: a warm-started run
writes ``warm_start.json``, an incompatible spec or model config is one line
with exit status 1 and leaves the source untouched, a resumed run ignores the
flag, and MirroredStrategy assigns the same weights on every replica.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from qin_tf import warm_start
from qin_tf.config import ExperimentConfig, ModelConfig
from qin_tf.model import build_model
from qin_tf.spec import FeatureSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_FLAGS = os.path.join(REPO, "configs", "sample.flags")

NUM_TAGS, MM_DIM, MAX_LEN = 3, 6, 5
CONFIGS = {
    "qin": ModelConfig(embedding_dim=4, num_layers=2, num_row=3),
    "din": ModelConfig(model="din", embedding_dim=4, din_attention_units=(8, 4), din_dnn_units=(16, 8)),
    "transformer_dcn": ModelConfig(model="transformer_dcn", embedding_dim=4, transformer_heads=2,
                                   transformer_ff_units=8, transformer_last_k=3, cross_layers=2,
                                   din_dnn_units=(16, 8), head_mlp_units=(6, 4)),
}


def make_spec(d, *, num_items, tag_vocab_size=9, context_vocab_sizes=(11, 4), items=None, views=None, seed=0):
    """A tiny spec in ``d``: a random item table (row 0 = padding); ``items`` / ``views``: raw ids of the
    item / views_level vocabulary files (none: ids used as given)."""
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    tags = rng.integers(0, tag_vocab_size, (num_items, NUM_TAGS)).astype("int32")
    emb = rng.normal(size=(num_items, MM_DIM)).astype("float32")
    tags[0], emb[0] = 0, 0
    np.savez(os.path.join(d, "item_table.npz"), tags=tags, embedding=emb)
    vocabularies = {}
    for key, words in (("item_id", items), ("views_level", views)):
        if words is not None:
            os.makedirs(os.path.join(d, "vocab"), exist_ok=True)
            with open(os.path.join(d, "vocab", f"{key}.txt"), "w") as f:
                f.write("".join(f"{w}\n" for w in words))
            vocabularies[key] = {"path": f"vocab/{key}.txt", "dtype": "string", "oov_id": 1, "size": len(words) + 2}
    return FeatureSpec(dataset="tiny", label="label", meta=("user_id",), target_item="item_id",
                       sequence="item_seq", context=("views_level", "likes_level"),
                       context_vocab_sizes=tuple(context_vocab_sizes), max_len=MAX_LEN, num_items=num_items,
                       num_tags=NUM_TAGS, tag_vocab_size=tag_vocab_size, mm_dim=MM_DIM,
                       vocabularies=vocabularies, base_dir=str(d))


def values(model):
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}


def save_run(model_dir, spec, config, *, seed=1):
    """A finished run's model_dir as qin_tf.task leaves it, its weights made unlike any fresh init."""
    keras.utils.set_random_seed(seed)
    model = build_model(spec, config)
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if v.trainable or "moving" in v.path:
            v.assign((rng.normal(size=v.shape) + (1.0 if "moving_variance" in v.path else 0.0)).astype("float32"))
    os.makedirs(model_dir, exist_ok=True)
    spec.save(model_dir)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(ExperimentConfig(model=config).to_dict(), f)
    model.save(os.path.join(model_dir, "best.keras"))
    return values(model)


def fresh(spec, config, seed=7):
    keras.utils.set_random_seed(seed)
    return build_model(spec, config)


def file_hashes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


# --------------------------------------------------------------------------
# The function: same spec, grown tables, renumbered ids (every preset)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(CONFIGS))
def test_same_spec_every_weight_equals_the_source_bitwise(preset, tmp_path):
    spec, config = make_spec(tmp_path / "data", num_items=30), CONFIGS[preset]
    src = str(tmp_path / "src")
    old = save_run(src, spec, config)
    source = warm_start.load_source(src, spec, config, model_dir=str(tmp_path / "new"))
    model = fresh(spec, config)
    assert any(not np.array_equal(values(model)[p], old[p]) for p in old if "embeddings" in p)
    record = warm_start.apply(model, spec, source)
    new = values(model)
    assert sorted(new) == sorted(old)
    for path in old:
        assert new[path].dtype == old[path].dtype and np.array_equal(new[path], old[path]), path
    with open(os.path.join(src, "best.keras"), "rb") as f:
        assert record["source_model_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert record["source"] == src and record["optimizer"] == "fresh"
    assert record["tables"]["item_embedding/id_embeddings"] == {"rows": 30, "source_rows": 30, "copied": 30,
                                                                  "new": 0, "dropped": 0}
    assert record["tables"]["context_embedding/embeddings[views_level]"]["copied"] == 12
    assert record["frozen"] == ["item_embedding/item_tags", "item_embedding/item_multimodal"]
    assert record["weights_copied"] == len(old) - 2


@pytest.mark.parametrize("preset", sorted(CONFIGS))
def test_grown_tables_keep_old_rows_bitwise_and_new_rows_fresh(preset, tmp_path):
    """No vocabulary files: row i -> row i; 5 more items, 3 more tags, 3 more views_level values."""
    config = CONFIGS[preset]
    old_spec = make_spec(tmp_path / "old", num_items=30, tag_vocab_size=9, context_vocab_sizes=(11, 4), seed=0)
    new_spec = make_spec(tmp_path / "new", num_items=35, tag_vocab_size=12, context_vocab_sizes=(14, 4), seed=5)
    src = str(tmp_path / "src")
    old = save_run(src, old_spec, config)
    source = warm_start.load_source(src, new_spec, config)
    model = fresh(new_spec, config, seed=7)
    record = warm_start.apply(model, new_spec, source)
    new, init = values(model), values(fresh(new_spec, config, seed=7))

    ids = new["item_embedding/id_embeddings"]
    assert np.array_equal(ids[:30], old["item_embedding/id_embeddings"])
    assert np.array_equal(ids[30:], init["item_embedding/id_embeddings"][30:])
    assert not np.array_equal(ids[30:], np.zeros_like(ids[30:]))
    tags = new["item_embedding/tag_embeddings"]
    assert np.array_equal(tags[:9], old["item_embedding/tag_embeddings"])
    assert np.array_equal(tags[9:], init["item_embedding/tag_embeddings"][9:])
    # context: views_level rows 0..10 and its OOV row (11 -> 14) are old, 11..13 fresh; likes_level moved by 3
    ctx, old_ctx, init_ctx = (x["context_embedding/embeddings"] for x in (new, old, init))
    assert np.array_equal(ctx[:11], old_ctx[:11])
    assert np.array_equal(ctx[11:14], init_ctx[11:14])
    assert np.array_equal(ctx[14], old_ctx[11])
    assert np.array_equal(ctx[15:20], old_ctx[12:17])
    # the frozen item table is the new catalog's
    tags_table, emb_table = new_spec.load_item_table()
    assert np.array_equal(new["item_embedding/item_tags"], tags_table)
    assert np.array_equal(new["item_embedding/item_multimodal"], emb_table)
    # every other weight is the source's
    for path in old:
        if "embedding" not in path or path == "item_embedding/multimodal_kernel":
            assert np.array_equal(new[path], old[path]), path
    assert record["tables"]["item_embedding/id_embeddings"] == {"rows": 35, "source_rows": 30, "copied": 30,
                                                                  "new": 5, "dropped": 0}
    assert record["tables"]["item_embedding/tag_embeddings"] == {"rows": 12, "source_rows": 9, "copied": 9,
                                                                   "new": 3, "dropped": 0}
    assert record["tables"]["context_embedding/embeddings[views_level]"] == {
        "rows": 15, "source_rows": 12, "copied": 12, "new": 3, "dropped": 0}
    assert record["tables"]["context_embedding/embeddings[likes_level]"] == {
        "rows": 5, "source_rows": 5, "copied": 5, "new": 0, "dropped": 0}


def test_rows_follow_the_raw_id_when_the_vocabulary_is_renumbered(tmp_path):
    """Item c vanished, x and e are new, the others moved; views_level's vocabulary renumbered too."""
    config = CONFIGS["qin"]
    old_spec = make_spec(tmp_path / "old", num_items=6, items=["a", "b", "c", "d"], views=["10", "20"],
                         context_vocab_sizes=(4, 4))
    new_spec = make_spec(tmp_path / "new", num_items=7, items=["d", "x", "b", "a", "e"], views=["20", "30", "10"],
                         context_vocab_sizes=(5, 4), seed=3)
    src = str(tmp_path / "src")
    old = save_run(src, old_spec, config)
    model = fresh(new_spec, config)
    record = warm_start.apply(model, new_spec, warm_start.load_source(src, new_spec, config))
    new, init = values(model), values(fresh(new_spec, config))

    ids, old_ids, init_ids = (x["item_embedding/id_embeddings"] for x in (new, old, init))
    # new dense id -> raw id -> old dense id: 0->0, 1->1 (padding, OOV), d 2->5, x new, b 4->3, a 5->2, e new
    for r, o in ((0, 0), (1, 1), (2, 5), (4, 3), (5, 2)):
        assert np.array_equal(ids[r], old_ids[o]), r
    for r in (3, 6):
        assert np.array_equal(ids[r], init_ids[r]), r
    assert record["tables"]["item_embedding/id_embeddings"] == {"rows": 7, "source_rows": 6, "copied": 5,
                                                                  "new": 2, "dropped": 1}
    ctx, old_ctx, init_ctx = (x["context_embedding/embeddings"] for x in (new, old, init))
    # views_level: 20 (2 <- 3), 30 new, 10 (4 <- 2), the layer's OOV row (5 <- 4); likes_level at 6 <- 5
    for r, o in ((0, 0), (1, 1), (2, 3), (4, 2), (5, 4)):
        assert np.array_equal(ctx[r], old_ctx[o]), r
    assert np.array_equal(ctx[3], init_ctx[3])
    assert np.array_equal(ctx[6:], old_ctx[5:])
    assert record["tables"]["context_embedding/embeddings[views_level]"] == {
        "rows": 6, "source_rows": 5, "copied": 5, "new": 1, "dropped": 0}


def test_a_shrunk_table_copies_what_maps_and_counts_the_rest(tmp_path):
    config = CONFIGS["qin"]
    old_spec = make_spec(tmp_path / "old", num_items=30)
    new_spec = make_spec(tmp_path / "new", num_items=20, tag_vocab_size=9)
    src = str(tmp_path / "src")
    old = save_run(src, old_spec, config)
    model = fresh(new_spec, config)
    record = warm_start.apply(model, new_spec, warm_start.load_source(src, new_spec, config))
    assert np.array_equal(values(model)["item_embedding/id_embeddings"], old["item_embedding/id_embeddings"][:20])
    assert record["tables"]["item_embedding/id_embeddings"] == {"rows": 20, "source_rows": 30, "copied": 20,
                                                                  "new": 0, "dropped": 10}


# --------------------------------------------------------------------------
# Refusals, in the function
# --------------------------------------------------------------------------


def test_refusals_name_what_differs(tmp_path):
    config = CONFIGS["qin"]
    spec = make_spec(tmp_path / "data", num_items=30)
    src = str(tmp_path / "src")
    save_run(src, spec, config)

    def refused(new_spec=spec, new_config=config, path=src, model_dir=""):
        with pytest.raises(warm_start.WarmStartError) as e:
            warm_start.load_source(path, new_spec, new_config, model_dir=model_dir)
        assert "\n" not in str(e.value)
        return str(e.value)

    other = dataclasses.replace(spec, context=("views_level", "clicks_level"))
    assert refused(other) == f"warm start: feature `clicks_level` is in the new spec but not in {src}'s."
    assert refused(dataclasses.replace(spec, context=("likes_level", "views_level"))).startswith(
        "warm start: the context features are in another order")
    assert refused(dataclasses.replace(spec, mm_dim=8)) == (
        f"warm start: the multimodal vectors are 8 wide in the new spec, {MM_DIM} in {src}'s.")
    assert refused(new_config=CONFIGS["din"]) == (
        f"warm start: model config differs from {src}'s: --extractor din_attention vs asta (new vs source).")
    assert refused(new_config=dataclasses.replace(config, num_row=2)) == (
        f"warm start: model config differs from {src}'s: --num_row 2 vs 3 (new vs source): weight "
        f"qnn/quadratic_0/kernel shape (32, 64) vs (32, 96).")
    assert refused(new_config=dataclasses.replace(config, batch_norm=False)) == (
        f"warm start: model config differs from {src}'s: --batch_norm False vs True (new vs source): weight "
        f"qnn/batch_norm_0/beta of the source is not in the new model.")
    # a field this model has no weights for (the DNN tower of din) does not stop QIN
    warm_start.load_source(src, spec, dataclasses.replace(config, din_dnn_units=(7,)))
    vocab = make_spec(tmp_path / "vocab", num_items=30, items=[f"i{k}" for k in range(28)])
    assert refused(vocab) == (f"warm start: the item ids has a vocabulary file in the new spec but not in "
                              f"{src}'s: its ids cannot be matched.")
    assert refused(path=str(tmp_path / "nope")).endswith("no such directory; --warm_start_from is the "
                                                         "--model_dir of an earlier training run, or an export of one.")
    assert refused(model_dir=src).startswith(f"warm start: --model_dir={src} is inside --warm_start_from")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(src, unfinished, ignore=shutil.ignore_patterns("best.keras"))
    assert refused(path=str(unfinished)) == (
        f"warm start: {unfinished}: no best.keras here, so not a finished training run; --warm_start_from is "
        f"the --model_dir of a run that finished, or an export of one.")
    assert refused(model_dir=os.path.join(src, "day2")).startswith("warm start: --model_dir=")


@pytest.mark.parametrize("words, line, why", [
    (["a", "", "b"], 2, "the empty string is padding, not an id"),
    (["a", "b\r", "c"], 2, "'b\\r' holds a control character or line break"),
    (["a", "b", "a"], 3, "raw id 'a' is also on line 1; a raw id has one row"),
])
def test_a_vocabulary_line_breaking_the_raw_id_rule_is_named_before_anything_is_written(
        tmp_path, words, line, why):
    config = CONFIGS["qin"]
    old_spec = make_spec(tmp_path / "old", num_items=5, items=["a", "b", "c"])
    new_spec = make_spec(tmp_path / "new", num_items=5, items=words)
    src = str(tmp_path / "src")
    save_run(src, old_spec, config)
    with pytest.raises(warm_start.WarmStartError) as e:
        warm_start.load_source(src, new_spec, config)
    path = os.path.join(str(tmp_path / "new"), "vocab", "item_id.txt")
    rule = "" if "also on line" in why else f"; {warm_start.RAW_ID_RULE}"
    assert str(e.value) == f"warm start: {path}: line {line} (vocabulary `item_id`): {why}{rule}."


def test_int64_vocabularies_match_by_value(tmp_path):
    """An int64 vocabulary's lines are ids: 0 breaks the rule; "07" and "7" are the same raw id."""
    config = CONFIGS["qin"]
    old_spec = make_spec(tmp_path / "old", num_items=4, items=["5", "7"])
    new_spec = make_spec(tmp_path / "new", num_items=4, items=["07", "5"])
    for spec in (old_spec, new_spec):
        spec.vocabularies["item_id"]["dtype"] = "int64"
    src = str(tmp_path / "src")
    old = save_run(src, old_spec, config)
    model = fresh(new_spec, config)
    warm_start.apply(model, new_spec, warm_start.load_source(src, new_spec, config))
    ids = values(model)["item_embedding/id_embeddings"]
    assert np.array_equal(ids[2], old["item_embedding/id_embeddings"][3])
    assert np.array_equal(ids[3], old["item_embedding/id_embeddings"][2])
    bad = make_spec(tmp_path / "bad", num_items=4, items=["5", "0"])
    bad.vocabularies["item_id"]["dtype"] = "int64"
    with pytest.raises(warm_start.WarmStartError, match=r"line 2 \(vocabulary `item_id`\): 0 is padding, not an id"):
        warm_start.load_source(src, bad, config)


def test_an_export_without_a_fingerprint_is_refused_with_a_pointer_to_its_model_dir(tmp_path):
    """(Exports that name their run: tests/test_warm_start_export.py.)"""
    spec, config = make_spec(tmp_path / "data", num_items=30), CONFIGS["qin"]
    base = tmp_path / "serving"
    for v in ("2", "3"):
        (base / v / "variables").mkdir(parents=True)
        (base / v / "saved_model.pb").write_bytes(b"")
    for path in (base, base / "3"):
        with pytest.raises(warm_start.WarmStartError) as e:
            warm_start.load_source(str(path), spec, config)
        assert str(e.value) == (f"warm start: {base / '3'} is an export without assets.extra/model_fingerprint.json, "
                                f"so it does not record the training run it came from: pass that run's --model_dir.")


# --------------------------------------------------------------------------
# The command, on the bundled sample
# --------------------------------------------------------------------------


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "QIN_TF_VERBOSE")}
    env["PYTHONPATH"] = REPO
    return env


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "qin_tf.train", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def sample_args(spec, model_dir, *extra):
    return [f"--flagfile={SAMPLE_FLAGS}", f"--data_dir={spec.base_dir}", f"--model_dir={model_dir}",
            "--epochs=2", "--global_batch_size=512", "--deterministic", *extra]


@pytest.fixture(scope="module")
def source_run(sample_spec, tmp_path_factory):
    """One epoch of QIN on the sample: the run every warm start below starts from."""
    model_dir = str(tmp_path_factory.mktemp("warm") / "day1")
    proc = run_cli(*sample_args(sample_spec, model_dir, "--epochs=1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return model_dir


@pytest.fixture(scope="module")
def warm_run(sample_spec, source_run, tmp_path_factory):
    """``python -m qin_tf.train ... --warm_start_from=day1``, two epochs."""
    model_dir = str(tmp_path_factory.mktemp("warm") / "day2")
    before = file_hashes(source_run)
    proc = run_cli(*sample_args(sample_spec, model_dir, f"--warm_start_from={source_run}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert file_hashes(source_run) == before
    return model_dir, proc


def test_cli_warm_start_writes_warm_start_json_and_logs_one_line(warm_run, source_run, sample_spec):
    model_dir, proc = warm_run
    assert proc.stderr == ""
    with open(os.path.join(model_dir, "warm_start.json")) as f:
        record = json.load(f)
    with open(os.path.join(source_run, "best.keras"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert record["source"] == source_run and record["source_model_sha256"] == digest
    n = sample_spec.num_items
    assert record["tables"]["item_embedding/id_embeddings"] == {"rows": n, "source_rows": n, "copied": n,
                                                                  "new": 0, "dropped": 0}
    assert record["optimizer"] == "fresh"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("warm start from")]
    assert len(lines) == 1 and digest[:12] in lines[0] and f"{n:,} copied, 0 new, 0 dropped" in lines[0]
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["train"]["warm_start_from"] == source_run
    # it started from day 1: its first epoch beats day 1's first epoch on valid (a fresh run's equals it)
    with open(os.path.join(model_dir, "metrics.json")) as f, open(os.path.join(source_run, "metrics.json")) as g:
        warm, day1 = json.load(f)["history"], json.load(g)["history"]
    assert warm[0]["val_auc"] != day1[0]["val_auc"]
    assert warm[0]["loss"] < day1[0]["loss"]


def test_cli_refuses_an_incompatible_model_config_in_one_line(sample_spec, source_run, tmp_path):
    before = file_hashes(source_run)
    model_dir = str(tmp_path / "day2")
    proc = run_cli(*sample_args(sample_spec, model_dir, f"--warm_start_from={source_run}", "--model=din"))
    assert proc.returncode == 1
    assert proc.stderr == (f"train: error: warm start: model config differs from {source_run}'s: --extractor "
                           f"din_attention vs asta (new vs source).\n")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not os.path.exists(model_dir)
    assert file_hashes(source_run) == before


def test_cli_refuses_an_incompatible_spec_in_one_line(sample_spec, source_run, tmp_path, capsys):
    from qin_tf import train

    data = tmp_path / "data"
    shutil.copytree(sample_spec.base_dir, data)
    spec_json = json.loads((data / "feature_spec.json").read_text())
    spec_json["context"] = ["clicks_level"]
    (data / "feature_spec.json").write_text(json.dumps(spec_json))
    before = file_hashes(source_run)
    model_dir = str(tmp_path / "day2")
    args = sample_args(sample_spec, model_dir, f"--warm_start_from={source_run}")
    rc = train.cli(["train", *[a if not a.startswith("--data_dir") else f"--data_dir={data}" for a in args]])
    err = capsys.readouterr().err
    assert rc == 1
    assert err == f"train: error: warm start: feature `clicks_level` is in the new spec but not in {source_run}'s.\n"
    assert not os.path.exists(model_dir)
    assert file_hashes(source_run) == before


# Kills the process right after the backup of epoch 1 is written (as tests/test_train.py does).
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
            if epoch == 0:
                os._exit(3)

    task.run(config, strategy=task.create_strategy(config.train.strategy), callbacks=[Kill()])
""")


def test_a_resumed_run_ignores_the_flag_and_ends_bitwise_as_the_uninterrupted_one(
        warm_run, source_run, sample_spec, tmp_path):
    model_dir = str(tmp_path / "killed")
    args = sample_args(sample_spec, model_dir, f"--warm_start_from={source_run}")
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert os.path.exists(os.path.join(model_dir, "backup")) and os.path.exists(
        os.path.join(model_dir, "warm_start.json"))
    # resumed with a source that no longer exists: the backup is what it continues from
    proc = run_cli(*sample_args(sample_spec, model_dir, f"--warm_start_from={tmp_path / 'gone'}"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "warm start from" not in proc.stdout
    resumed, uninterrupted = (keras.saving.load_model(os.path.join(d, "best.keras"), compile=False)
                              for d in (model_dir, warm_run[0]))
    a, b = values(resumed), values(uninterrupted)
    assert sorted(a) == sorted(b)
    for path in a:
        assert np.array_equal(a[path], b[path]), path
    with open(os.path.join(model_dir, "metrics.json")) as f, open(os.path.join(warm_run[0], "metrics.json")) as g:
        ha, hb = json.load(f)["history"], json.load(g)["history"]
    assert [(r["loss"], r["val_auc"]) for r in ha] == [(r["loss"], r["val_auc"]) for r in hb]


MIRRORED = textwrap.dedent("""
    import sys
    import numpy as np, keras
    from qin_tf import task, warm_start
    from qin_tf.config import ExperimentConfig
    from qin_tf.model import build_model
    from qin_tf.spec import FeatureSpec
    import json, os
    strategy = task.create_strategy("mirrored", logical_cpus=2)
    src, data = sys.argv[1], sys.argv[2]
    spec = FeatureSpec.load(data)
    with open(os.path.join(src, "config.json")) as f:
        config = ExperimentConfig.from_dict(json.load(f)).model
    source = warm_start.load_source(src, spec, config)
    keras.utils.set_random_seed(3)
    with strategy.scope():
        model = build_model(spec, config)
        record = warm_start.apply(model, spec, source)
    assert strategy.num_replicas_in_sync == 2
    bad = []
    for v in model.weights:
        replicas = [np.asarray(x) for x in v.value.values] if hasattr(v.value, "values") else None
        if replicas is None or len(replicas) != 2:
            bad.append(v.path + " not mirrored")
            continue
        want = source.weights[v.path] if "item_tags" not in v.path and "item_multimodal" not in v.path else None
        for r in replicas:
            if want is not None and not np.array_equal(r, want):
                bad.append(v.path)
    print("BAD", bad)
    print("COPIED", record["weights_copied"], len(model.weights))
""")


def test_mirrored_assigns_the_source_weights_on_every_replica(source_run, sample_spec):
    proc = subprocess.run([sys.executable, "-c", MIRRORED, source_run, sample_spec.base_dir], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BAD []" in proc.stdout, proc.stdout
    copied, total = proc.stdout.split("COPIED ")[1].split()[:2]
    assert int(copied) == int(total) - 2
