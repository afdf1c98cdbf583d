"""pipelines.build_examples' output side: its manifest, a symlinked output, and the commit killed at every rename.

The commit (``pipelines.commit.journalled_commit``) moves files one by one
under a journal; ``QIN_TF_CRASH_AFTER_RENAME=N`` makes a run exit at once,
as SIGKILL would stop it, right after the commit's Nth rename. The kill tests
run the real CLI on a tiny log (a few seconds a build) at every N in turn,
then rerun and compare with a clean build, byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from pipelines import beamio, commit
from pipelines import preprocess as pp
from pipelines.build_examples import DATASET_CONFIG_FILENAME, LEDGER, MANIFEST_FILENAME, build_examples
from qin_tf.rows import PreprocessError

from tests.conftest import REPO, files_under

# user, item, ts: three users with int64 ids, every event a positive (negatives sampled).
EVENTS = "user,item,ts\n" + "".join(f"{u},{i},{t}\n" for u, items in ((1, (10, 11, 12, 13)), (2, (11, 12, 14)),
                                                                       (3, (10, 13, 14, 15)))
                                     for t, i in enumerate(items))
DEVICES = "abab"


def tiny_config(d, name="logs.json", device=False):
    """A log config without catalog and users; ``device``: with a context column (one more vocabulary)."""
    os.makedirs(d, exist_ok=True)
    lines = EVENTS.strip().split("\n")
    with open(os.path.join(d, "events.csv"), "w") as f:
        f.write("\n".join([lines[0] + ",device"] + [f"{ln},{DEVICES[k % 4]}" for k, ln in enumerate(lines[1:])]))
        f.write("\n")
    events = {"files": "events.csv", "user": "user", "item": "item", "time": "ts"}
    if device:
        events["context"] = ["device"]
    path = os.path.join(d, name)
    with open(path, "w") as f:
        json.dump({"name": "tiny", "shards": 1, "events": events}, f)
    return path


def contents(root):
    """``{relative path: bytes}`` of every file under ``root``."""
    out = {}
    for name in files_under(root):
        with open(os.path.join(root, name), "rb") as f:
            out[name] = f.read()
    return out


def siblings(output_dir) -> list[str]:
    parent, base = os.path.split(str(output_dir).rstrip("/"))
    return sorted(n for n in os.listdir(parent) if n.startswith(base + ".tmp-") or n.startswith(base + ".old-"))


def cli(config, out, crash_after=None):
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop(commit.CRASH_AFTER_RENAME_ENV, None)
    if crash_after is not None:
        env[commit.CRASH_AFTER_RENAME_ENV] = str(crash_after)
    return subprocess.run([sys.executable, "-m", "pipelines.build_examples", f"--config={config}",
                           f"--output_dir={out}"], cwd=REPO, capture_output=True, text=True, env=env)


USER_FILES = {"NOTES.txt": b"mine", "model/best.keras": b"a model", "vocab/mine.txt": b"my own list"}


def add_user_files(out):
    for name, data in USER_FILES.items():
        os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny log's configs and two clean builds: ``clean`` (the config the kill tests run) and
    ``older`` (with a context column: one more vocabulary file, ``vocab/device.txt``)."""
    d = tmp_path_factory.mktemp("commit")
    config, older_config = tiny_config(str(d)), tiny_config(str(d), "older.json", device=True)
    build_examples(config, str(d / "clean"))
    build_examples(older_config, str(d / "older"))
    return {"dir": d, "config": config, "older_config": older_config,
            "clean": contents(d / "clean"), "older": contents(d / "older")}


# --------------------------------------------------------------------------
# The manifest: a rerun replaces exactly the files the earlier run wrote
# --------------------------------------------------------------------------


def test_manifest_lists_every_file_written_and_a_rerun_keeps_a_users_file_in_vocab(built, tmp_path):
    clean = built["clean"]
    assert json.loads(clean[MANIFEST_FILENAME]) == {
        "tool": "pipelines.build_examples",
        "files": sorted(set(clean) - {MANIFEST_FILENAME})}
    assert "vocab/item_id.txt" in clean and "vocab/device.txt" in built["older"]
    out = tmp_path / "out"
    shutil.copytree(built["dir"] / "older", out)
    add_user_files(out)
    build_examples(built["config"], str(out))  # the new build has no device vocabulary: the old one goes
    assert contents(out) == {**clean, **USER_FILES}
    assert siblings(out) == []


def test_a_users_file_with_the_name_of_a_new_file_is_refused(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built["dir"] / "clean", out)
    (out / "vocab" / "device.txt").write_text("mine")  # the earlier build did not write it; the next would
    before = contents(out)
    with pytest.raises(PreprocessError, match=r"holds \['vocab/device.txt'\], which build_examples did not "
                                              r"write and would replace"):
        build_examples(built["older_config"], str(out))
    assert contents(out) == before and siblings(out) == []


def test_an_output_written_before_manifests_keeps_a_users_file_in_vocab(built, tmp_path):
    """Without a manifest, the dataset config names the vocabulary files the earlier run wrote."""
    out = tmp_path / "out"
    shutil.copytree(built["dir"] / "older", out)
    os.remove(out / MANIFEST_FILENAME)
    shutil.rmtree(out / "state")  # outputs before manifests had no state/ either (it came later)
    add_user_files(out)
    build_examples(built["config"], str(out))
    assert contents(out) == {**built["clean"], **USER_FILES}


# --------------------------------------------------------------------------
# A symlinked --output_dir: followed, the link kept
# --------------------------------------------------------------------------


def test_cli_follows_a_symlinked_output_dir(built, tmp_path):
    target = tmp_path / "disk" / "built"
    shutil.copytree(built["dir"] / "older", target)
    add_user_files(target)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    proc = cli(built["config"], link)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert contents(target) == {**built["clean"], **USER_FILES}
    assert siblings(target) == [] and siblings(link) == []


def test_preprocess_follows_a_symlinked_output_dir(tmp_path):
    from tests.test_preprocess import write_dataset

    input_dir, config = write_dataset(tmp_path)
    target = tmp_path / "disk" / "data"
    target.parent.mkdir()
    link = tmp_path / "data"
    link.symlink_to(target, target_is_directory=True)
    pp.preprocess(input_dir, str(link), config, num_shards=2)  # the target does not exist yet
    first = contents(target)
    spec = pp.preprocess(input_dir, str(link), config, num_shards=1)  # replaces the target's contents
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert spec.splits["train"].files == ("train-00000-of-00001.tfrecord.gz",)
    assert sorted(n for n in contents(target) if n.startswith("train-")) == ["train-00000-of-00001.tfrecord.gz"]
    assert "train-00001-of-00002.tfrecord.gz" in first
    assert siblings(target) == [] and siblings(link) == []


# --------------------------------------------------------------------------
# The commit killed at every rename (the real CLI), then a rerun
# --------------------------------------------------------------------------


@pytest.mark.parametrize("earlier", ["older"])
def test_commit_killed_at_every_rename_is_completed_by_the_rerun(built, tmp_path, earlier):
    """``earlier``: an earlier (different) build with the user's files in it, which the commit moves to
    ``.old-*`` first: every kind of rename a commit makes happens here (a commit into no output makes a
    subset of them). The real CLI is killed (SIGKILL's exit status) after the 1st, 2nd, 3rd, each
    quarter's, the second-to-last and the last rename (each rename in turn is killed in process by
    ``test_commit_killed_at_every_rename_rolls_forward_or_back``, on the same commit code; launching the
    whole CLI for every one of the ~25 renames cost the suite three minutes), and one run more completes.
    After each kill the next run's first step (``_check_output_dir``: the commit's recovery, then the
    leftovers' removal) leaves a clean build's bytes, the user's files and no ``.tmp-*`` or ``.old-*``;
    the rest of a rerun is an ordinary rebuild over a whole output (a real rerun of the CLI:
    ``test_cli_rerun_after_a_kill_mid_commit``; one in-process here)."""
    from pipelines.build_examples import _check_output_dir

    want = {**built["clean"], **(USER_FILES if earlier else {})}
    inputs = [os.path.join(os.path.dirname(built["config"]), "events.csv")]
    renames = len(built["clean"]) + 2 + (len(built[earlier]) if earlier else 0)  # journal, files, manifest, done
    kills = sorted({1, 2, 3, renames // 4, renames // 2, 3 * renames // 4, renames - 1, renames})
    killed_states = []
    for n in [*kills, renames + 1]:
        out = tmp_path / f"run{n}" / "out"
        out.parent.mkdir()
        if earlier:
            shutil.copytree(built["dir"] / earlier, out)
            add_user_files(out)
        proc = cli(built["config"], out, crash_after=n)
        if n == renames + 1:  # past the last rename: nothing left to kill
            assert proc.returncode == 0, proc.stderr
            assert contents(out) == want and siblings(out) == []
            break
        assert proc.returncode == 137, (n, proc.stderr)
        assert siblings(out)  # the kill left the temporary directory (and the old one) behind
        killed_states.append(sorted(contents(out)))
        _, owned = _check_output_dir(str(out), inputs)
        assert contents(out) == want, n
        assert siblings(out) == [], n
        assert owned == set(built["clean"]), n
    build_examples(built["config"], str(out))  # and a whole rerun over the last one
    assert contents(out) == want and siblings(out) == []
    # the kills left outputs that the code before the journal refused ("not a build_examples output")
    assert any(DATASET_CONFIG_FILENAME not in s and "train.parquet" in s for s in killed_states)


def test_cli_rerun_after_a_kill_mid_commit(built, tmp_path):
    """The case of the report: killed with `valid.parquet` and `vocab/` in place but no dataset config; the
    real CLI's rerun completes it (in-process reruns cover every other rename above)."""
    out = tmp_path / "out"
    shutil.copytree(built["dir"] / "older", out)
    add_user_files(out)
    older = len(built["older"])
    proc = cli(built["config"], out, crash_after=1 + older + len(built["clean"]) - 2)  # all in but the marker
    assert proc.returncode == 137
    assert DATASET_CONFIG_FILENAME not in os.listdir(out) and "valid.parquet" in os.listdir(out)
    assert "item_id.txt" in os.listdir(out / "vocab")
    proc = cli(built["config"], out)
    assert proc.returncode == 0, proc.stderr
    assert contents(out) == {**built["clean"], **USER_FILES} and siblings(out) == []


# --------------------------------------------------------------------------
# The commit's helpers, on hand-made directories: roll forward, roll back, a live run's commit
# --------------------------------------------------------------------------


class Killed(BaseException):
    pass


def _dirs(tmp_path):
    out, work = tmp_path / "out", tmp_path / "out.tmp-0000beef"
    old = {"dataset_config.json": b"old config", "a.bin": b"old a", "vocab/x.txt": b"old x",
           "vocab/gone.txt": b"old gone", MANIFEST_FILENAME: json.dumps(
               {"tool": LEDGER.tool, "files": ["a.bin", "dataset_config.json", "vocab/gone.txt", "vocab/x.txt"]}
           ).encode()}
    new = {"dataset_config.json": b"new config", "a.bin": b"new a", "vocab/x.txt": b"new x", "b.bin": b"new b"}
    for root, files in ((out, {**old, **USER_FILES}), (work, new)):
        for name, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            with open(os.path.join(root, name), "wb") as f:
                f.write(data)
    commit.write_manifest(str(work), None, LEDGER)
    owned = set(json.loads(old[MANIFEST_FILENAME])["files"]) | {MANIFEST_FILENAME}
    manifest = {MANIFEST_FILENAME: (json.dumps({"tool": LEDGER.tool, "files": sorted(new)}, indent=2) + "\n").encode()}
    return out, work, owned, {**old, **USER_FILES}, {**new, **manifest, **USER_FILES}


def test_commit_killed_at_every_rename_rolls_forward_or_back(tmp_path, monkeypatch):
    """Killed after each rename in turn: with its temporary directory the next run completes the
    commit; without it (lost) it rolls back to the earlier output. Either way nothing is left beside."""
    real = beamio.rename
    for lose_tmp in (False, True):
        n = 0
        while True:
            n += 1
            base = tmp_path / f"{lose_tmp}-{n}"
            out, work, owned, before, after = _dirs(base)
            calls = []

            def rename(src, dst):
                real(src, dst)
                calls.append(dst)
                if len(calls) == n:
                    raise Killed

            monkeypatch.setattr(beamio, "rename", rename)
            try:
                commit.journalled_commit(str(work), str(out), owned, LEDGER, "build_examples")
                done = True
            except Killed:
                done = False
            monkeypatch.setattr(beamio, "rename", real)
            if done:
                assert contents(out) == after and os.listdir(base) == ["out"]
                break
            if lose_tmp:
                shutil.rmtree(work)
            commit.recover_commit(str(out), LEDGER)
            assert contents(out) == (before if lose_tmp and n < 12 else after), (lose_tmp, n)
            assert os.listdir(base) == ["out"], (lose_tmp, n)
        assert n == 13  # 12 renames: the journal, 5 files out, 4 in, the manifest, the journal's "done"


def test_a_failed_commit_is_rolled_back_at_once(tmp_path, monkeypatch):
    out, work, owned, before, _ = _dirs(tmp_path)
    real, calls = beamio.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 8:
            raise OSError("disk full (injected)")
        real(src, dst)

    monkeypatch.setattr(beamio, "rename", rename)
    with pytest.raises(OSError, match="disk full"):
        commit.journalled_commit(str(work), str(out), owned, LEDGER, "build_examples")
    assert contents(out) == before and os.listdir(tmp_path) == ["out"]


def test_a_live_runs_commit_is_left_alone(tmp_path):
    out, work, owned, _, _ = _dirs(tmp_path)
    journal = {"tool": LEDGER.tool, "host": socket.gethostname(), "pid": os.getppid(), "state": "commit",
               "created": False, "tmp": work.name, "old": "out.old-0000beef", "replaced": [], "new": []}
    (out / LEDGER.journal).write_text(json.dumps(journal))
    before = contents(out)
    with pytest.raises(PreprocessError, match=rf"another pipelines.build_examples run \(pid {os.getppid()}\)"):
        commit.recover_commit(str(out), LEDGER)
    assert contents(out) == before and work.exists()
