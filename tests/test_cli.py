"""What every command line program shows and does around its work: ``--help``, exit.

``--help`` is read from ``--helpxml`` (the same usage text and flag help as
``--help``, in XML) of the real ``python -m`` command.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

from qin_tf.runtime import plain_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIS = ("qin_tf.train", "export.score", "pipelines.preprocess", "export.exporter", "export.client",
        "export.local_server", "pipelines.make_sample", "pipelines.build_examples")
#: reStructuredText markup: back-quotes (literals, roles), strong emphasis, a literal block's "::".
MARKUP = re.compile(r"`|\*\*|::$", re.M)
#: One or more sentences, first word capitalised (after train's "[model] " tag or an enum's "<a|b>: "), ending with a period.
SENTENCE = re.compile(r"(\[\w+\] |<[\w|]+>: )?[A-Z0-9].*\.", re.S)


def _env():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("QIN_TF_VERBOSE", None)
    return env


@pytest.fixture(scope="module")
def helps():
    """CLI -> (usage text, {flag: help}) of its own flags, from ``python -m CLI --helpxml``."""
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--helpxml"], cwd=REPO, env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in CLIS}
    out = {}
    for m, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert stderr == "", (m, stderr)
        root = ET.fromstring(stdout)
        flags = {f.findtext("name"): f.findtext("meaning") or "" for f in root.iter("flag")
                 if f.findtext("key") == "yes"}
        out[m] = (root.findtext("usage"), flags)
    return out


@pytest.mark.parametrize("cli", CLIS)
def test_every_flag_has_one_complete_plain_sentence(helps, cli):
    _, flags = helps[cli]
    assert len(flags) >= 3, flags  # the CLI's own flags were found
    bad = {name: text for name, text in flags.items()
           if not SENTENCE.fullmatch(text) or MARKUP.search(text) or "  " in text}
    assert not bad, bad


@pytest.mark.parametrize("cli", CLIS)
def test_usage_text_is_plain_and_its_commands_copy_paste(helps, cli):
    usage, _ = helps[cli]
    assert f"python -m {cli}" in usage
    assert not MARKUP.search(usage), MARKUP.search(usage)
    commands = [line for line in usage.splitlines() if "python -m" in line or line.startswith("        --")]
    assert commands
    for line in commands:  # a "\" line continuation of a non-raw docstring leaves a run of spaces
        assert not re.search(r"\S {2,}\S", line), line


def test_model_flags_get_their_own_docstring_entry_not_a_group_or_a_fragment(helps):
    _, flags = helps["qin_tf.train"]
    assert flags["num_row"] != flags["num_layers"] != flags["dropout"] != flags["batch_norm"]
    assert flags["din_attention_units"] != flags["din_dnn_units"]
    assert "challenge baseline's is 0.1" in flags["din_attention_dropout"]
    assert flags["net_l2"].endswith("0 in the released QIN config.")
    assert "baseline" not in flags and "network" not in flags and "logit" not in flags


def test_plain_text_drops_rst_markup():
    assert plain_text(":class:`~qin_tf.config.TrainConfig` and :func:`qin_tf.task.run`") == \
        "TrainConfig and qin_tf.task.run"
    assert plain_text("Examples::\n\n    ``a`` **b** `c`") == "Examples:\n\n    a b c"


def test_run_app_leaves_the_collector_nothing_to_walk_at_exit():
    """Python's shutdown GC over TensorFlow's objects kept a finished run alive for up to a minute."""
    script = textwrap.dedent("""
        import atexit, gc
        from qin_tf.runtime import run_app
        garbage = [[i] for i in range(100_000)]
        atexit.register(lambda: print("at exit:", gc.get_freeze_count(), len(gc.get_objects())))

        def main(argv):
            print("main done")

        run_app(main)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "main done"
    frozen, tracked = map(int, lines[1].split(":")[1].split())
    assert frozen >= 100_000 and tracked < 1_000, lines


def test_make_sample_names_a_missing_input_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "cut"
    proc = subprocess.run([sys.executable, "-m", "pipelines.make_sample", f"--input_dir={tmp_path / 'none'}",
                           f"--output_dir={out}", "--num_users=5"], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"make_sample: error: [Errno 2] No such file or directory: '{tmp_path / 'none' / 'train.parquet'}'"]
    assert not out.exists()
