"""Bad input and bad output paths for batch scoring and the serving client, through their real CLIs.

Every refusal is exit code 1 and one line on stderr (no traceback), and
loses nothing: the inputs, the export and any file in the way stay byte for
byte as they were. The output rule is :func:`qin_tf.fileio.check_output_path`,
shared by ``python -m export.score`` and ``python -m export.client``.

Each test launches each command it covers at least once (``python -m``);
its further cases run the same ``main`` with the same flags in process
(:func:`tests.cli_in_process.run_main`), which saves a TensorFlow import and
a model load per case.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from export import score
from qin_tf import fileio
from qin_tf.cli import error_line
from qin_tf.spec import RAW_ID_RULE
from tests.cli_in_process import run_main
from tests.test_export import REPO, assert_scores_equal
from tests.test_score import TEST_PARQUET, _raw_records, raw_scored, scored  # noqa: F401 (fixtures)


def run(module: str, *args, stdin: str | None = None, launch: bool = True) -> subprocess.CompletedProcess:
    """``python -m module *args``: launched, or (``launch=False``) its ``main`` in this process."""
    if not launch:
        return run_main(module, *args, stdin=stdin)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], input=stdin, cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO})


def assert_one_line_error(proc, *words):
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "{{" not in proc.stderr and "[[" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def snapshot(*roots) -> dict:
    """Every file under ``roots`` (or the file itself) -> its bytes."""
    out = {}
    for root in map(str, roots):
        paths = [root] if os.path.isfile(root) else [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        for p in paths:
            with open(p, "rb") as f:
                out[p] = f.read()
    return out


def score_cli(base, inp, out, *flags, launch=True):
    return run("export.score", f"--saved_model={base}", f"--input={inp}", f"--output={out}", *flags, launch=launch)


def client_cli(base, inp, out, *flags, stdin=None, launch=True):
    return run("export.client", f"--saved_model={base}", f"--input={inp}", f"--output={out}", *flags, stdin=stdin,
               launch=launch)


CLIS = {"score": score_cli, "client": client_cli}


@pytest.fixture(scope="module")
def copied_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "in.parquet"
    shutil.copyfile(TEST_PARQUET, path)
    return path


# --------------------------------------------------------------------------
# 1, 2: the output path
# --------------------------------------------------------------------------


def test_client_refuses_its_input_and_an_existing_output_as_score_does(scored, copied_input, tmp_path):
    base = scored[0]
    before = snapshot(copied_input)
    for flags in ((), ("--overwrite",)):
        for name, cli in CLIS.items():
            proc = cli(base, copied_input, copied_input, *flags, launch=not flags)  # each command launched once
            assert_one_line_error(proc, f"{copied_input}: the output is one of the inputs")
    link = tmp_path / "link.parquet"  # a symbolic link to the input is the input
    os.symlink(copied_input, link)
    proc = client_cli(base, copied_input, link, "--overwrite", launch=False)
    assert_one_line_error(proc, "the output is one of the inputs")
    assert snapshot(copied_input) == before and os.path.islink(link)

    out = tmp_path / "scores.csv"
    out.write_text("keep me\n")
    proc = client_cli(base, copied_input, out, launch=False)
    assert_one_line_error(proc, f"error: {out}: the output exists; pass --overwrite")
    assert out.read_text() == "keep me\n"
    proc = client_cli(base, copied_input, out, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert lines[0] == "row,ctr" and len(lines) == 601
    assert_scores_equal([float(x.split(",")[1]) for x in lines[1:]], scored[1])


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_no_output_inside_the_export_read(cli, scored, tmp_path):
    """Not saved_model.pb, not an asset, not a new file in the base or a version: with the base or the version."""
    base = tmp_path / "export"
    shutil.copytree(scored[0], base)
    before = snapshot(base)
    for i, (saved_model, out) in enumerate(((base, base / "1" / "saved_model.pb"),
                                            (base, base / "1" / "assets" / "feature_spec.json"),
                                            (base, base / "1" / "new" / "scores.csv"),
                                            (base / "1", base / "scores.csv"))):  # a version dir: its base too
        proc = CLIS[cli](saved_model, TEST_PARQUET, out, "--overwrite", launch=i == 0)
        assert_one_line_error(proc, f"{out}: the output lies inside {base}")
    assert snapshot(base) == before


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_overwrite_replaces_only_a_regular_file(cli, scored, tmp_path):
    """A FIFO stands for a device node (/dev/full): --overwrite would have replaced it with a plain file."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    proc = CLIS[cli](scored[0], TEST_PARQUET, fifo, "--overwrite")
    assert_one_line_error(proc, f"{fifo}: the output is not a regular file")
    assert sorted(os.listdir(tmp_path)) == ["pipe"] and not os.path.isfile(fifo)


def test_output_rule_in_process():
    with pytest.raises(fileio.OutputPathError, match="not a regular file"):
        fileio.check_output_path("/dev/null", [], overwrite=True)
    with pytest.raises(fileio.OutputPathError, match="not a regular file"):
        fileio.check_output_path("/dev/full", [], overwrite=True)
    # URLs: compared as normalised strings.
    with pytest.raises(fileio.OutputPathError, match="lies inside ram://exp/base/"):
        fileio.check_output_path("ram://exp//base/./1/assets/x.txt", [], read_trees=["ram://exp/base/"])
    with pytest.raises(fileio.OutputPathError, match="is one of the inputs"):
        fileio.check_output_path("ram://exp/in.parquet", ["ram://exp//in.parquet"])
    fileio.check_output_path("ram://exp/base2/x.csv", [], read_trees=["ram://exp/base"])  # a sibling, not inside
    assert fileio.export_trees("/a/export/3") == ["/a/export/3", "/a/export"]
    assert fileio.export_trees("/a/export") == ["/a/export"]


# --------------------------------------------------------------------------
# 3: a broken newest version, TensorFlow's raw text, ids beyond int64, meta types
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cli", sorted(CLIS))
@pytest.mark.parametrize("damage", ["truncated", "garbage", "no_variables"])
def test_a_broken_newest_version_is_one_line_naming_it(cli, damage, scored, tmp_path):
    base = tmp_path / "export"
    shutil.copytree(scored[0], base)
    shutil.copytree(base / "1", base / "2")
    pb = base / "2" / "saved_model.pb"
    if damage == "truncated":
        pb.write_bytes(pb.read_bytes()[:100])
    elif damage == "garbage":
        pb.write_bytes(b"\xff" * 64)
    else:
        shutil.rmtree(base / "2" / "variables")
    before = snapshot(base)
    # Launched for the missing variables (test_cli_sweep.py launches both on a truncated one); in process otherwise.
    proc = CLIS[cli](base, TEST_PARQUET, tmp_path / "s.csv", launch=damage == "no_variables")
    assert_one_line_error(proc, f"{base / '2'}: cannot load this SavedModel")
    assert snapshot(base) == before and not (tmp_path / "s.csv").exists()


def test_error_line_is_plain():
    import tensorflow as tf

    @tf.function
    def gather(x):
        return tf.gather(x, [5])

    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        gather(tf.constant([1]))
    assert "[[{{node" in err.value.message
    assert error_line(err.value) == "indices[0] = 5 is not in [0, 1)"
    assert error_line(ValueError("{{function_node __inference_f_1}}{{function_node g}} bad id\n\t "
                                 "[[{{node Lookup}}]]")) == "bad id"


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_dense_ids_beyond_int64_are_one_line_in_the_client(scored, tmp_path):
    row = {"item_id": 5, "item_seq": [1, 2], "views_level": 1}
    cases = (("item_id", 2 ** 63, "column `item_id`: id 9223372036854775808 is beyond int64"),
             ("item_seq", [3, 2 ** 64], "column `item_seq`: item id 18446744073709551616 is "
                                        "beyond int64 at position 1 of the list"))
    for n, (key, value, words) in enumerate(cases):  # launched on the first case, in process on the second
        proc = run("export.client", f"--saved_model={scored[0]}", "--input=-", stdin=_jsonl([row, {**row, key: value}]),
                   launch=n == 0)
        assert_one_line_error(proc, f"error: <stdin>: row 1, {words}")
        assert proc.stdout == ""


def test_raw_ids_beyond_int64_and_mixed_user_id_types_in_score(raw_scored, tmp_path):
    base, spec, raw, _, labels = raw_scored
    records = _raw_records(spec, raw, labels)[:6]
    inp = tmp_path / "in.jsonl"
    out = tmp_path / "s.parquet"
    cases = ((4, {"views_level": 2 ** 63}, "row 4, column `views_level`: 9223372036854775808 is beyond int64"),
             (3, {"user_id": "u3"}, "row 3, column `user_id`: a string, while "),
             (5, {"user_id": 2 ** 64}, "row 5, column `user_id`: 18446744073709551616 is beyond int64"))
    for n, (i, change, words) in enumerate(cases):  # launched on the first case, in process on the others
        bad = [dict(r) for r in records]
        bad[i].update(change)
        inp.write_text(_jsonl(bad))
        before = snapshot(inp)
        proc = score_cli(base, inp, out, "--raw_ids", "--batch_size=2", launch=n == 0)
        assert_one_line_error(proc, f"score: error: {inp}: {words}")
        assert snapshot(inp) == before and sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_string_user_ids_in_every_row_are_one_string_column(raw_scored, tmp_path):
    base, spec, raw, _, labels = raw_scored
    records = [{**r, "user_id": f"u{r['user_id']}"} for r in _raw_records(spec, raw, labels)[:7]]
    (tmp_path / "in.jsonl").write_text(_jsonl(records))
    got = score.score(base, str(tmp_path / "in.jsonl"), str(tmp_path / "s.parquet"), raw_ids=True, batch_size=3,
                      log=lambda line: None)
    table = pq.read_table(tmp_path / "s.parquet")
    assert table["user_id"].to_pylist() == [f"u{i}" for i in range(7)]
    np.testing.assert_array_equal(table["ctr"].to_numpy(), got["scores"])


# --------------------------------------------------------------------------
# 4: the raw-id rule; client --raw_ids on parquet
# --------------------------------------------------------------------------


RAW_CASES = [  # (key, value, the words after "row 2, column `key`: ")
    ("views_level", -5, f"-5 is negative; {RAW_ID_RULE}"),
    ("views_level", 0, f"0 is padding, not an id; {RAW_ID_RULE}"),
    ("item_id", "", f"the empty string is padding, not an id; {RAW_ID_RULE}"),
    ("item_id", "item-7\r", repr("item-7\r") + f" holds a control character or line break; {RAW_ID_RULE}"),
    ("item_seq", ["item-3", "x\ny"], repr("x\ny") + " holds a control character or line break at position 1 of "
                                                    f"the list; {RAW_ID_RULE}"),
]


@pytest.mark.parametrize("key,value,words", RAW_CASES)
def test_raw_id_rule_in_score_and_client(key, value, words, raw_scored, tmp_path):
    base, spec, raw, _, labels = raw_scored
    records = _raw_records(spec, raw, labels)[:4]
    records[2][key] = value
    inp = tmp_path / "in.jsonl"
    inp.write_text(_jsonl(records))
    before = snapshot(inp)
    launch = (key, value) == RAW_CASES[0][:2]  # each command launched on the first case; in process otherwise
    proc = score_cli(base, inp, tmp_path / "s.csv", "--raw_ids", launch=launch)
    assert_one_line_error(proc, f"score: error: {inp}: row 2, column `{key}`: {words}")
    proc = client_cli(base, inp, tmp_path / "s.csv", "--raw_ids", launch=False)
    assert_one_line_error(proc, f"error: {inp}: row 2, column `{key}`: {words}")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "in.parquet")
    proc = client_cli(base, tmp_path / "in.parquet", tmp_path / "s.csv", "--raw_ids", launch=launch)
    assert_one_line_error(proc, f"error: {tmp_path / 'in.parquet'}: row 2, column `{key}`: {words}")
    assert snapshot(inp) == before and sorted(os.listdir(tmp_path)) == ["in.jsonl", "in.parquet"]


def test_raw_history_padding_is_dropped_and_client_reads_raw_parquet(raw_scored, tmp_path):
    """Raw "" in a history is padding: the same scores as without it; the client scores raw parquet as score does."""
    base, spec, raw, _, labels = raw_scored
    records = _raw_records(spec, raw, labels)[:50]
    padded = [{**r, "item_seq": ["", *r["item_seq"][:1], "", *r["item_seq"][1:]]} for r in records]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "raw.parquet")
    (tmp_path / "padded.jsonl").write_text(_jsonl(padded))
    want = score.score(base, str(tmp_path / "raw.parquet"), raw_ids=True, log=lambda line: None)["scores"]
    got = score.score(base, str(tmp_path / "padded.jsonl"), raw_ids=True, log=lambda line: None)["scores"]
    np.testing.assert_array_equal(got, want)
    proc = run("export.client", f"--saved_model={base}", f"--input={tmp_path / 'raw.parquet'}", "--raw_ids",
               "--batch_size=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_scores_equal(np.array(proc.stdout.split(), dtype=np.float32), want)


def test_grpc_details_with_tf_markup_become_one_plain_line():
    """TF Serving answers an op error with TensorFlow's own text; the client shows it plain."""
    import grpc

    from export.client import ServingClient, ServingError

    class Refusal(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self):
            return ("{{function_node __inference_serve_123}} indices[3] = 9 is not in [0, 5)\n\t "
                    "[[{{node embedding_lookup}}]] [Op:__inference_serve_123]")

    def method(request, timeout):
        raise Refusal()

    with ServingClient("127.0.0.1:1", "qin") as client:
        with pytest.raises(ServingError) as err:
            client._call(method, None)
    assert str(err.value) == "INVALID_ARGUMENT: indices[3] = 9 is not in [0, 5)"


def test_parquet_uint64_ids_beyond_int64_are_one_line(scored, raw_scored, tmp_path):
    """Dense ids: uint64 is not an id type; raw ids: a uint64 beyond int64 breaks the raw-id rule."""
    from qin_tf.rows import PreprocessError

    table = pq.read_table(TEST_PARQUET)
    i = table.column_names.index("views_level")
    values = table["views_level"].to_numpy().astype(np.uint64)
    pq.write_table(table.set_column(i, "views_level", pa.array(values, pa.uint64())), tmp_path / "dense.parquet")
    with pytest.raises(PreprocessError, match=r"dense\.parquet: column `views_level`: has type uint64"):
        score.score(scored[0], str(tmp_path / "dense.parquet"), None, log=lambda line: None)

    base, spec, raw, _, labels = raw_scored
    raw_table = pa.Table.from_pylist(_raw_records(spec, raw, labels)[:5])
    levels = raw_table["views_level"].to_numpy().astype(np.uint64)
    levels[3] = 2 ** 63
    j = raw_table.column_names.index("views_level")
    pq.write_table(raw_table.set_column(j, "views_level", pa.array(levels, pa.uint64())), tmp_path / "raw.parquet")
    with pytest.raises(PreprocessError, match=r"raw\.parquet: row 3, column `views_level`: 9223372036854775808 is "
                                              r"beyond int64; raw ids are"):
        score.score(base, str(tmp_path / "raw.parquet"), None, raw_ids=True, log=lambda line: None)
