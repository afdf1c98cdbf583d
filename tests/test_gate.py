"""The gate before serving: validate a candidate against the serving version, push a blessed one, roll back.

One QIN trained on the sample (the serving version) and one trained on the
sample with its train labels shuffled (a corrupted day), each exported once
per module; every test works on its own copies of the export bases.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from export import exporter, push as push_mod, rollback as rollback_mod, score, validate
from qin_tf.rows import PreprocessError
from qin_tf import train
from qin_tf.cli import error_line
from qin_tf.spec import FeatureSpec, SpecError
from tests.test_export import make_model_dir
from tests.conftest import tree_hash
from tests.test_train import SAMPLE_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "QIN_TF_VERBOSE")}
    env["PYTHONPATH"] = REPO
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)




def file_bytes(root) -> dict:
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def shuffle_train_labels(spec: FeatureSpec, out_dir: str, seed: int = 0) -> str:
    """A copy of the preprocessed data with the train split's labels permuted (a corrupted day)."""
    shutil.copytree(spec.base_dir, out_dir)
    files = [os.path.join(out_dir, f) for f in spec.splits["train"].files]
    records = [tf.train.Example.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    labels = np.array([e.features.feature[spec.label].int64_list.value[0] for e in records])
    perm = np.random.default_rng(seed).permutation(labels)
    assert (perm != labels).any()
    i = 0
    for path, info_rows in zip(files, [sum(1 for _ in tf.data.TFRecordDataset(p, compression_type="GZIP"))
                                       for p in files]):
        with tf.io.TFRecordWriter(path, options="GZIP") as w:
            for e in records[i:i + info_rows]:
                e.features.feature[spec.label].int64_list.value[:] = [int(perm[i])]
                w.write(e.SerializeToString())
                i += 1
    return out_dir


def train_and_export(spec_dir: str, model_dir: str, export_base: str, epochs: int) -> str:
    rc = train.cli(["train", f"--flagfile={SAMPLE_FLAGS}", f"--data_dir={spec_dir}", f"--model_dir={model_dir}",
                    f"--epochs={epochs}"])
    assert rc == 0
    return exporter.export_from_model_dir(model_dir, export_base, data_dir=spec_dir)


@pytest.fixture(scope="module")
def gate(sample_spec, tmp_path_factory):
    """(serving version dir, shuffled-label candidate version dir): one good and one corrupted training run."""
    tmp = tmp_path_factory.mktemp("gate")
    good = train_and_export(sample_spec.base_dir, str(tmp / "good"), str(tmp / "good_export"), epochs=4)
    bad_data = shuffle_train_labels(sample_spec, str(tmp / "shuffled_data"))
    bad = train_and_export(bad_data, str(tmp / "bad"), str(tmp / "bad_export"), epochs=2)
    return good, bad


@pytest.fixture
def serving(gate, tmp_path):
    """A serving base holding the good model as version 1."""
    base = tmp_path / "serving"
    base.mkdir()
    shutil.copytree(gate[0], base / "1")
    return str(base)


def candidate_copy(version_dir: str, tmp_path, name: str, version: int = 1) -> str:
    out = tmp_path / name / str(version)
    shutil.copytree(version_dir, out)
    return str(out)


# --------------------------------------------------------------------------
# Blessed and pushed
# --------------------------------------------------------------------------


def test_equal_candidate_is_blessed_and_pushed_by_the_cli(gate, serving, sample_spec, tmp_path):
    cand = candidate_copy(gate[0], tmp_path, "candidate", version=7)
    proc = run_module("export.validate", f"--candidate={os.path.dirname(cand)}", f"--serving={serving}",
                      f"--data={sample_spec.base_dir}", "--split=test", "--push")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["blessed"] is True and out["pushed"]["serving_version"] == 2
    # the new version: next number, same bytes as the candidate; the records beside both
    assert exporter.list_versions(serving) == [1, 2]  # 2.validation.json is not a version
    assert exporter.latest_version_dir(serving) == os.path.join(serving, "2")
    assert file_bytes(os.path.join(serving, "2")) == file_bytes(cand)
    with open(os.path.join(serving, "2.validation.json")) as f:
        pushed = json.load(f)
    with open(os.path.join(tmp_path, "candidate", "7.validation.json")) as f:
        record = json.load(f)
    assert pushed == record
    assert record["blessed"] is True and record["decision"] == "blessed" and record["reasons"] == []
    assert record["first_version"] is False
    assert record["serving"]["version"] == 1 and record["candidate"]["version"] == 7
    assert record["candidate"]["fingerprint"] == validate.fingerprint(cand) == \
        validate.fingerprint(os.path.join(serving, "2"))
    assert record["pushed"]["path"] == os.path.join(serving, "2")
    assert record["thresholds"]["auc_tolerance"] == validate.DEFAULT_AUC_TOLERANCE
    assert record["data"]["split"] == "test" and record["data"]["num_rows"] == sample_spec.splits["test"].num_rows
    # equal models, equal metrics; the AUC is the scorer's on the same rows
    c, s = record["candidate"]["metrics"], record["serving"]["metrics"]
    assert c == s
    scored = score.score(cand, os.path.join(sample_spec.base_dir, "test-*.tfrecord.gz"), log=lambda line: None)
    assert c["auc"] == scored["auc"] and c["logloss"] == pytest.approx(scored["logloss"], rel=1e-12)
    assert c["calibration"] == pytest.approx(c["mean_prediction"] / c["positive_rate"])
    assert c["auc"] > 0.6  # the trained model beats chance on test
    # no temporary directory left in the base
    assert sorted(os.listdir(serving)) == ["1", "2", "2.validation.json"]


# --------------------------------------------------------------------------
# Refused
# --------------------------------------------------------------------------


def test_shuffled_label_candidate_is_refused_and_serving_untouched(gate, serving, sample_spec, tmp_path):
    cand = candidate_copy(gate[1], tmp_path, "candidate", version=3)
    before = tree_hash(serving)
    proc = run_module("export.validate", f"--candidate={cand}", f"--serving={serving}",
                      f"--data={sample_spec.base_dir}", "--split=test", "--push")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert tree_hash(serving) == before
    with open(os.path.join(tmp_path, "candidate", "3.validation.json")) as f:
        record = json.load(f)
    c, s = record["candidate"]["metrics"]["auc"], record["serving"]["metrics"]["auc"]
    assert c < s - 0.002
    assert lines[0] == f"validate: refused: AUC {c:.4f} < serving {s:.4f} - 0.002 (version 1 in {serving})"
    assert record["blessed"] is False and record["decision"] == "refused" and record["pushed"] is None
    assert record["reasons"] == [lines[0][len("validate: refused: "):]]
    # the candidate is the corrupted day: close to chance on the test rows
    assert abs(c - 0.5) < 0.1
    # and push refuses it, naming the refusal
    with pytest.raises(exporter.ExportError, match=r"not blessed .*AUC"):
        push_mod.push(cand, serving)
    assert tree_hash(serving) == before


def test_thresholds_other_than_auc(gate, serving, sample_spec, tmp_path):
    cand = candidate_copy(gate[0], tmp_path, "candidate")
    data = os.path.join(sample_spec.base_dir, "valid-*.tfrecord.gz")
    with pytest.raises(validate.Refused) as e:
        validate.validate(cand, serving, data, max_calibration_error=0.0, log=lambda line: None)
    m = e.value.record["candidate"]["metrics"]
    assert str(e.value) == (f"calibration {m['calibration']:.4f} (mean prediction {m['mean_prediction']:.4f} / "
                            f"positive rate {m['positive_rate']:.4f}) is off by more than 0")
    assert e.value.record["data"]["split"] is None and e.value.record["data"]["num_rows"] == \
        sample_spec.splits["valid"].num_rows
    # the decision alone, on hand-made metrics
    base = {"auc": 0.70, "logloss": 0.50}
    cand_m = {"auc": 0.699, "logloss": 0.52, "calibration": 1.05, "mean_prediction": 0.21, "positive_rate": 0.2}
    assert validate.decide(cand_m, base) == []
    assert validate.decide(cand_m, base, auc_tolerance=0.0005, max_logloss_increase=0.01, where="v") == [
        "AUC 0.6990 < serving 0.7000 - 0.0005 (v)", "logloss 0.5200 > serving 0.5000 + 0.01 (v)"]
    assert validate.decide(cand_m, None, min_auc=0.7, max_calibration_error=0.1) == ["AUC 0.6990 < --min_auc 0.7"]


def test_first_day_uses_the_absolute_thresholds(gate, sample_spec, tmp_path):
    empty = tmp_path / "serving"
    empty.mkdir()
    cand = candidate_copy(gate[0], tmp_path, "candidate")
    with pytest.raises(validate.Refused, match=r"^AUC 0\.\d{4} < --min_auc 0\.99$"):
        validate.validate(cand, str(empty), sample_spec.base_dir, split="test", min_auc=0.99, log=lambda line: None)
    assert os.listdir(empty) == []
    record = validate.validate(cand, str(empty), sample_spec.base_dir, split="test", min_auc=0.6,
                               log=lambda line: None)
    assert record["blessed"] is True and record["first_version"] is True
    assert record["serving"]["version"] is None and record["serving"]["metrics"] is None
    pushed = push_mod.push(cand, str(empty))
    assert pushed["pushed"]["serving_version"] == 1
    assert exporter.latest_version_dir(str(empty)) == os.path.join(str(empty), "1")
    # the same blessing cannot push twice: the base moved on since it was given
    with pytest.raises(exporter.ExportError, match=r"serves version 1 now, the blessing compared against no version"):
        push_mod.push(cand, str(empty))


def test_spec_mismatch_is_one_line(gate, serving, sample_spec, tmp_path):
    spec8 = dataclasses.replace(sample_spec, max_len=8, splits={})  # no rows at hand: synthetic warmup rows
    model_dir = str(tmp_path / "model8")
    make_model_dir(spec8, model_dir)
    cand = exporter.export_from_model_dir(model_dir, str(tmp_path / "candidate"))
    before = tree_hash(serving)
    proc = run_module("export.validate", f"--candidate={cand}", f"--serving={serving}",
                      f"--data={sample_spec.base_dir}", "--split=test")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"validate: error: the candidate ({cand}) and the serving version ({serving}/1) have different feature "
        "specs: max_len: candidate 8, serving 16"]
    assert tree_hash(serving) == before
    assert not os.path.exists(validate.record_path(cand))
    assert validate.spec_differences(spec8, sample_spec) == ["max_len: candidate 8, serving 16"]
    grown = dataclasses.replace(sample_spec, num_items=sample_spec.num_items + 5)
    assert validate.spec_differences(grown, sample_spec) == []  # appended ids compare fine
    assert validate.spec_differences(sample_spec, grown) == [
        f"item table: candidate {sample_spec.num_items} items < serving {sample_spec.num_items + 5}"]


# --------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------


def test_push_without_blessing_is_refused(gate, serving, sample_spec, tmp_path):
    cand = candidate_copy(gate[0], tmp_path, "candidate", version=4)
    before = tree_hash(serving)
    proc = run_module("export.push", f"--candidate={cand}", f"--serving={serving}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"push: error: {cand}.validation.json: no validation record; run `python -m export.validate` on "
        f"{cand} first."]
    assert tree_hash(serving) == before
    # blessed, then its bytes change: refused
    record = validate.validate(cand, serving, sample_spec.base_dir, split="test", log=lambda line: None)
    assert record["blessed"] is True
    with open(os.path.join(cand, "assets.extra", "tf_serving_warmup_requests"), "ab") as f:
        f.write(b"x")
    with pytest.raises(exporter.ExportError, match="its files changed since the blessing"):
        push_mod.push(cand, serving)
    # a blessing for another version directory: refused
    other = candidate_copy(gate[0], tmp_path, "other", version=4)
    shutil.copy(validate.record_path(cand), validate.record_path(other))
    with pytest.raises(exporter.ExportError, match="the blessing is for"):
        push_mod.push(other, serving)
    assert tree_hash(serving) == before


# --------------------------------------------------------------------------
# Rollback
# --------------------------------------------------------------------------


def test_rollback_moves_the_newest_aside_and_refuses_the_last(gate, serving, tmp_path):
    shutil.copytree(gate[1], os.path.join(serving, "2"))
    with open(os.path.join(serving, "2.validation.json"), "w") as f:
        json.dump({"blessed": True}, f)
    two = file_bytes(os.path.join(serving, "2"))
    proc = run_module("export.rollback", f"--model_base_path={serving}")
    assert proc.returncode == 0, proc.stderr
    action = json.loads(proc.stdout.strip().splitlines()[-1])
    side = serving + ".rolled_back"
    assert action["from_version"] == 2 and action["to_version"] == 1
    assert action["moved"] == {"2": os.path.join(side, "2")}
    # what TF Serving's policy, and the local server, now serve
    assert exporter.latest_version_dir(serving) == os.path.join(serving, "1")
    assert sorted(os.listdir(serving)) == ["1"]
    assert file_bytes(os.path.join(side, "2")) == two  # kept, not deleted
    logs = [n for n in os.listdir(side) if n.startswith("rollback-")]
    assert len(logs) == 1 and os.path.exists(os.path.join(side, "2.validation.json"))
    with open(os.path.join(side, logs[0])) as f:
        assert json.load(f) == action
    # the last version stays
    before = tree_hash(serving)
    proc = run_module("export.rollback", f"--model_base_path={serving}")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"rollback: error: {serving}: version 1 is the only one left; rolling it back would leave nothing to serve."]
    assert tree_hash(serving) == before
    # a rolled-back number is not reused by a push
    assert push_mod.used_numbers(serving) == [1, 2]


def test_rollback_to_a_version_moves_every_newer_one(gate, serving):
    for v in (2, 3):
        shutil.copytree(gate[0], os.path.join(serving, str(v)))
    with pytest.raises(exporter.ExportError, match=r"--to_version=3 is not a servable version older than"):
        rollback_mod.rollback(serving, 3)
    action = rollback_mod.rollback(serving, 1)
    assert action["from_version"] == 3 and sorted(action["moved"]) == ["2", "3"]
    assert exporter.list_versions(serving) == [1]
    assert sorted(os.listdir(serving + ".rolled_back"))[:2] == ["2", "3"]


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def test_bad_input_is_one_line_and_writes_nothing(gate, serving, sample_spec, tmp_path):
    cand = candidate_copy(gate[0], tmp_path, "candidate")
    before = tree_hash(serving)
    empty = tmp_path / "empty.tfrecord.gz"
    with tf.io.TFRecordWriter(str(empty), options="GZIP"):
        pass
    broken = candidate_copy(gate[0], tmp_path, "broken")
    with open(os.path.join(broken, "saved_model.pb"), "wb") as f:
        f.write(b"not a SavedModel")
    negative = tmp_path / "negative.tfrecord.gz"
    records = [r.numpy() for r in tf.data.TFRecordDataset(sample_spec.split_files("test")[0],
                                                          compression_type="GZIP").take(3)]
    bad = tf.train.Example.FromString(records[2])
    bad.features.feature[sample_spec.target_item].int64_list.value[:] = [-5]
    with tf.io.TFRecordWriter(str(negative), options="GZIP") as w:
        for r in records[:2] + [bad.SerializeToString()]:
            w.write(r)
    cases = {
        "negative id": ([f"--candidate={cand}", f"--serving={serving}", f"--data={negative}"],
                        f"validate: error: {negative}: row 2, column `{sample_spec.target_item}`: negative id -5; "
                        "ids must be >= 0 (0 is padding)"),
        "missing rows": ([f"--candidate={cand}", f"--serving={serving}", f"--data={tmp_path}/none-*.tfrecord.gz"],
                         f"validate: error: {tmp_path}/none-*.tfrecord.gz: no such file"),
        "empty rows": ([f"--candidate={cand}", f"--serving={serving}", f"--data={empty}"],
                       f"validate: error: {empty}: no rows"),
        "wrong serving path": ([f"--candidate={cand}", f"--serving={tmp_path}/nowhere",
                                f"--data={sample_spec.base_dir}"],
                               f"validate: error: {tmp_path}/nowhere: no such directory; --serving is the TF Serving "
                               "model base path (create it empty for the first version)."),
        "candidate inside the serving base": (
            [f"--candidate={serving}", f"--serving={serving}", f"--data={sample_spec.base_dir}"],
            f"validate: error: {serving}/1: the candidate is a version of the serving base itself; validate the "
            "export it came from (to serve an older version again, use export.rollback)."),
        "unknown split": ([f"--candidate={cand}", f"--serving={serving}", f"--data={sample_spec.base_dir}",
                           "--split=tomorrow"],
                          "validate: error: split `tomorrow` is not in the feature spec; it has "
                          "['test', 'train', 'valid']."),
    }
    for name, (args, want) in cases.items():
        proc = run_module("export.validate", *args) if name == "missing rows" else None
        if proc is not None:
            assert proc.returncode == 1, name
            assert proc.stderr.strip().splitlines() == [want], name
            continue
        flags_ = dict(a[2:].split("=", 1) for a in args)
        with pytest.raises((exporter.ExportError, SpecError, PreprocessError)) as e:
            validate.validate(flags_["candidate"], flags_["serving"], flags_["data"],
                              split=flags_.get("split", "valid"), log=lambda line: None)
        assert f"validate: error: {e.value}" == want, name
    # an unreadable export: one line naming it, through the CLI
    proc = run_module("export.validate", f"--candidate={broken}", f"--serving={serving}",
                      f"--data={sample_spec.base_dir}", "--split=test")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"validate: error: {broken}: not a loadable SavedModel (")
    assert "Traceback" not in proc.stderr and "{{" not in line
    assert tree_hash(serving) == before
    assert not os.path.exists(validate.record_path(cand)) and not os.path.exists(validate.record_path(broken))


# --------------------------------------------------------------------------
# The command lines' help (tests/test_cli.py's rules)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cli", ["export.validate", "export.push", "export.rollback"])
def test_help_is_plain_with_one_sentence_per_flag(cli):
    import re
    import xml.etree.ElementTree as ET

    from tests.test_cli import MARKUP, SENTENCE

    proc = run_module(cli, "--helpxml")  # absl exits 1 after --helpxml
    assert proc.stderr == ""
    root = ET.fromstring(proc.stdout)
    flags_ = {f.findtext("name"): f.findtext("meaning") or "" for f in root.iter("flag") if f.findtext("key") == "yes"}
    assert len(flags_) >= 2
    assert {n: t for n, t in flags_.items() if not SENTENCE.fullmatch(t) or MARKUP.search(t) or "  " in t} == {}
    usage = root.findtext("usage")
    assert f"python -m {cli}" in usage and not MARKUP.search(usage)
    for line in usage.splitlines():
        if "python -m" in line or line.startswith("        --"):
            assert not re.search(r"\S {2,}\S", line), line


def test_tensorflow_error_text_becomes_one_plain_line():
    message = ("Graph execution error:\n\nDetected at node assert_non_negative/Assert defined at (most recent "
               "call last):\n  File \"x.py\", line 1\n\nassertion failed: [`item_id`: ids must be >= 0] "
               "[x = ] [-5]\n\t [[{{node assert_non_negative/Assert}}]] [Op:__inference_serve_123]")
    assert error_line(message) == "refused by the graph: `item_id`: ids must be >= 0"
    assert error_line("{{function_node __inference_f_1}} Key: item_seq. Can't parse serialized Example.") \
        == "Key: item_seq. Can't parse serialized Example."


def test_push_and_rollback_on_a_url(gate, sample_spec, tmp_path):
    """A serving base on another filesystem (TensorFlow's ram://, as gs://): copy with saved_model.pb last."""
    from qin_tf import fileio

    base = f"ram://gate-{tmp_path.name}/serving"
    fileio.copy_tree(gate[0], base + "/1", last=("saved_model.pb",))
    cand = candidate_copy(gate[0], tmp_path, "candidate")
    record = validate.validate(cand, base, sample_spec.base_dir, split="test", log=lambda line: None)
    assert record["blessed"] and record["serving"]["version"] == 1
    assert record["serving"]["fingerprint"] == record["candidate"]["fingerprint"]  # the same bytes
    pushed = push_mod.push(cand, base)
    assert pushed["pushed"]["serving_version"] == 2
    assert exporter.list_versions(base) == [1, 2]
    assert validate.fingerprint(base + "/2") == record["candidate"]["fingerprint"]
    assert fileio.read_json(base + "/2.validation.json") == pushed
    action = rollback_mod.rollback(base)
    assert action["moved"] == {"2": base + ".rolled_back/2"}
    assert exporter.latest_version_dir(base) == base + "/1"
    assert validate.fingerprint(base + ".rolled_back/2") == record["candidate"]["fingerprint"]
    assert fileio.read_json(base + ".rolled_back/2.validation.json") == pushed
