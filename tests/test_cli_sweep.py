"""One sweep over every command that reads user input: malformed input of each kind issue 20 lists.

For each case the real CLI (``python -m ...``) must exit with status 1, print
exactly one line on stderr that starts with the tool's ``error:`` prefix and
names what is wrong, show no Python traceback and no TensorFlow markup
(``{{function_node``, ``[[``), and leave every input byte for byte as it was.
The commands: ``pipelines.build_examples``, ``pipelines.preprocess``,
``qin_tf.train``, ``export.exporter``, ``export.refresh_catalog``, batch
scoring, ``export.client`` and ``export.local_server``. The per-command test
files hold the finer cases (``test_build_examples_bad_input.py``,
``test_output_paths.py``, ``test_serving_versions.py``,
``test_refresh_catalog.py``); this file is the one place that runs them all
the same way. Cases start together (each waits mostly on its imports).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from qin_tf.spec import INT64_MAX, FeatureSpec
from tests.conftest import REPO, SAMPLE_LOGS_CONFIG, files_under

#: The batch-scoring command.
SCORE = "export.score"
TRAIN_FLAGS = ("--flagfile=configs/sample.flags", "--epochs=1", "--embedding_dim=8", "--num_layers=1")


def _env():
    return {**os.environ, "PYTHONPATH": REPO}


def _snapshot(*roots) -> dict:
    out = {}
    for root in map(str, roots):
        for rel in files_under(root):
            with open(os.path.join(root, rel), "rb") as f:
                out[os.path.join(root, rel)] = f.read()
    return out


@pytest.fixture(scope="module")
def world(sample_logs_built, tmp_path_factory):
    """A build from the sample's raw logs, its TFRecords, a 1-epoch model and its raw-id export."""
    from export.exporter import export_from_model_dir
    from pipelines.preprocess import preprocess
    from qin_tf.spec import DatasetConfig
    from qin_tf.train import cli

    tmp = tmp_path_factory.mktemp("sweep")
    data = str(tmp / "data")
    preprocess(sample_logs_built, data, DatasetConfig.load(os.path.join(sample_logs_built, "dataset_config.json")),
               max_len=16, num_shards=1)
    model = str(tmp / "model")
    assert cli(["train", *TRAIN_FLAGS, f"--data_dir={data}", f"--model_dir={model}"]) == 0
    export = str(tmp / "export")
    export_from_model_dir(model, export, version=1)
    return {"tmp": tmp, "built": sample_logs_built, "data": data, "model": model, "export": export,
            "spec": FeatureSpec.load(data)}


def _raw_row(spec: FeatureSpec, **over) -> dict:
    """One valid raw-id request row: the first raw id of each vocabulary, 1 elsewhere."""
    def first(name):
        key = spec.vocabulary_key(name)
        return int(spec.read_vocabulary(key)[0]) if key else 1

    row = {spec.target_item: first(spec.target_item), spec.sequence: [first(spec.target_item)],
           **{c: first(c) for c in spec.context}, "user_id": 7}
    row.update(over)
    return row


def _write(path, text: str | bytes) -> str:
    with open(path, "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _broken_base(world, name: str) -> str:
    """An export base whose newest version (2) has a truncated saved_model.pb."""
    base = str(world["tmp"] / name)
    shutil.copytree(world["export"], base)
    shutil.copytree(os.path.join(base, "1"), os.path.join(base, "2"))
    pb = os.path.join(base, "2", "saved_model.pb")
    with open(pb, "r+b") as f:
        f.truncate(100)
    return base


def _cases(world):
    tmp, spec = world["tmp"], world["spec"]
    d = tmp / "cases"
    d.mkdir()
    cases = []

    def case(name, module, args, expect, inputs=()):
        cases.append((name, module, [str(a) for a in args], expect, [str(i) for i in inputs]))

    # build_examples: a config value of the wrong type, and an event log with bytes that are not UTF-8.
    cfg = json.load(open(SAMPLE_LOGS_CONFIG))
    cfg["history"]["max_len"] = "abc"
    for k in ("events", "catalog"):
        cfg[k]["files"] = os.path.join(os.path.dirname(SAMPLE_LOGS_CONFIG), cfg[k]["files"])
    cfg["catalog"]["vector"]["files"] = os.path.join(os.path.dirname(SAMPLE_LOGS_CONFIG),
                                                     cfg["catalog"]["vector"]["files"])
    bad_cfg = _write(d / "bad_type.json", json.dumps(cfg))
    case("config type", "pipelines.build_examples", [f"--config={bad_cfg}", f"--output_dir={d / 'out1'}"],
         "max_len", [bad_cfg])
    log = _write(d / "events.csv", b"user,item,ts\n1,2,1\n1,3,2\n1,\xff4,3\n")
    utf_cfg = _write(d / "utf.json", json.dumps({"name": "u", "shards": 1, "events": {
        "files": log, "format": "csv", "user": "user", "item": "item", "time": "ts"}}))
    case("non-UTF-8 log", "pipelines.build_examples", [f"--config={utf_cfg}", f"--output_dir={d / 'out2'}"],
         "UTF-8", [log, utf_cfg])
    nan_log = _write(d / "nan.csv", "user,item,ts\n1,2,1\n1,3,nan\n1,4,3\n")
    nan_cfg = _write(d / "nan.json", json.dumps({"name": "n", "shards": 1, "events": {
        "files": nan_log, "format": "csv", "user": "user", "item": "item", "time": "ts"}}))
    case("nan time", "pipelines.build_examples", [f"--config={nan_cfg}", f"--output_dir={d / 'out3'}"],
         "row 1", [nan_log, nan_cfg])

    # preprocess: a vocabulary line that breaks the raw-id rule (a user id holding \r).
    ex = str(d / "ex")
    shutil.copytree(world["built"], ex)
    vocab = os.path.join(ex, "vocab", "item_id.txt")
    lines = open(vocab).read().split("\n")
    _write(vocab, "\n".join([lines[0] + "\r", *lines[1:]]))
    case("vocabulary line", "pipelines.preprocess", [f"--input_dir={ex}", f"--output_dir={d / 'data'}",
                                                     f"--dataset_config={ex}/dataset_config.json"],
         "item_id.txt", [ex])

    # train: a shard that does not read back.
    data = str(d / "data_corrupt")
    shutil.copytree(world["data"], data)
    shard = next(os.path.join(data, f) for f in sorted(os.listdir(data)) if f.startswith("train-"))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    case("corrupt shard", "qin_tf.train", [*TRAIN_FLAGS, f"--data_dir={data}", f"--model_dir={d / 'm'}"],
         os.path.basename(shard), [data])

    # export: a model_dir without best.keras.
    empty_model = str(d / "empty_model")
    shutil.copytree(world["model"], empty_model)
    os.remove(os.path.join(empty_model, "best.keras"))
    case("no best.keras", "export.exporter", [f"--model_dir={empty_model}", f"--export_base={d / 'e'}"],
         "best.keras", [empty_model])

    # refresh_catalog: a catalog whose bytes are not UTF-8.
    cat = _write(d / "titles.csv", b"item,title\n5,\xff\xfe#tag\n")
    base = str(d / "refresh_base")
    shutil.copytree(world["export"], base)
    case("non-UTF-8 catalog", "export.refresh_catalog",
         [f"--model_dir={world['model']}", f"--export_base={base}", f"--config={SAMPLE_LOGS_CONFIG}",
          f"--catalog={cat}"], "UTF-8", [cat, base, world["model"]])

    # scoring and the client: an id beyond int64, mixed user_id types, an output inside the export,
    # the output equal to the input, and a broken newest version.
    big = _write(d / "big.jsonl", json.dumps(_raw_row(spec, **{spec.target_item: INT64_MAX + 1})) + "\n")
    case("score id beyond int64", SCORE, [f"--saved_model={world['export']}", f"--input={big}", "--raw_ids",
                                          f"--output={d / 's1.parquet'}"], "int64", [big, world["export"]])
    case("client id beyond int64", "export.client", [f"--saved_model={world['export']}", f"--input={big}",
                                                     "--raw_ids", f"--output={d / 'c1.csv'}"],
         "int64", [big, world["export"]])
    mixed = _write(d / "mixed.jsonl", json.dumps(_raw_row(spec)) + "\n"
                   + json.dumps(_raw_row(spec, user_id="u8")) + "\n")
    case("score mixed user_id", SCORE, [f"--saved_model={world['export']}", f"--input={mixed}", "--raw_ids",
                                        f"--output={d / 's2.parquet'}"], "user_id", [mixed])
    good = _write(d / "good.jsonl", json.dumps(_raw_row(spec)) + "\n")
    inside = os.path.join(world["export"], "1", "assets", "scores.parquet")
    case("score output in export", SCORE, [f"--saved_model={world['export']}", f"--input={good}", "--raw_ids",
                                           f"--output={inside}", "--overwrite"], "export", [world["export"], good])
    case("client output is input", "export.client", [f"--saved_model={world['export']}", f"--input={good}",
                                                     "--raw_ids", f"--output={good}", "--overwrite"],
         "input", [good])
    broken = _broken_base(world, "broken_score")
    case("score broken version", SCORE, [f"--saved_model={broken}", f"--input={good}", "--raw_ids"],
         os.path.join(broken, "2"), [broken])
    broken_c = _broken_base(world, "broken_client")
    case("client broken version", "export.client", [f"--saved_model={broken_c}", f"--input={good}", "--raw_ids",
                                                    f"--output={d / 'c2.csv'}"], os.path.join(broken_c, "2"),
         [broken_c])

    # local_server: a base whose only version does not load.
    only_broken = str(d / "only_broken")
    shutil.copytree(_broken_base(world, "broken_server"), only_broken)
    shutil.rmtree(os.path.join(only_broken, "1"))
    case("server broken version", "export.local_server", [f"--model_base_path={only_broken}", "--port=0"],
         os.path.join(only_broken, "2"), [only_broken])
    return cases


def test_every_cli_answers_bad_input_with_one_line_and_exit_1(world):
    cases = _cases(world)
    before = {name: _snapshot(*inputs) for name, _, _, _, inputs in cases}
    procs = [(name, module, expect, inputs,
              subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE))
             for name, module, args, expect, inputs in cases]
    problems = []
    for name, module, expect, inputs, proc in procs:
        try:
            _, stderr = proc.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            proc.kill()
            problems.append(f"{name}: timed out")
            continue
        tool = module.rsplit(".", 1)[-1]
        lines = stderr.strip().split("\n")
        if proc.returncode != 1:
            problems.append(f"{name}: exit {proc.returncode}: {stderr[-2000:]}")
        elif len(lines) != 1 or not lines[0]:
            problems.append(f"{name}: {len(lines)} lines on stderr: {stderr[-2000:]}")
        elif "Traceback" in stderr or "{{" in stderr or "[[" in stderr:
            problems.append(f"{name}: traceback or TensorFlow markup: {stderr[-2000:]}")
        elif not lines[0].startswith(f"{tool}: error: ") or expect not in lines[0]:
            problems.append(f"{name}: expected '{tool}: error: ...{expect}...', got: {lines[0]}")
        if _snapshot(*inputs) != before[name]:
            problems.append(f"{name}: an input changed")
    assert not problems, "\n".join(problems)
