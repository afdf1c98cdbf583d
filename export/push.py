r"""Pushes a blessed version into the TF Serving model base path as its next version (TFX's Pusher).

    python -m export.push --candidate=runs/day2/export/3 --serving=/srv/models/qin

(``python -m export.validate ... --push`` does the same right after a blessing.)

A version is pushed only with a blessing for exactly it: the record
``<version>.validation.json`` beside it (written by :mod:`export.validate`)
must say ``"blessed": true`` for this version directory, its fingerprint must
match the bytes there now (nothing changed since the gate looked), and the
serving version it was compared with must still be the newest in the base
(on the first day: the base must still hold no version). Otherwise one line
says why, exit code 1, the base untouched.

The copy becomes the version after the highest number the base has ever
used (those rolled back into ``BASE.rolled_back/`` count too, see
:mod:`export.rollback`), so no number is reused and no version is
overwritten. It is written as the exporter writes a version: on a local
filesystem into a hidden ``.tmp-push-*`` directory inside the base (TF
Serving ignores it), checked against the blessed fingerprint and renamed
into place; on a URL (``gs://``) copied file by file, ``saved_model.pb``
last (:func:`export.validate.copy_version`). The record, with ``"pushed"`` filled
in, is written beside the new version (``BASE/<n>.validation.json``, before
the version appears) and rewritten beside the candidate.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

from export.exporter import ExportError, list_versions, servable_versions
from export.validate import (copy_version, fingerprint, read_record, record_path, resolve_version, utc_now,
                             version_number)
from qin_tf import fileio
from qin_tf.cli import exit_error
from qin_tf.rows import one_line
from qin_tf.spec import SpecError

#: Suffix of the sibling folder that holds rolled-back versions (``/srv/models/qin.rolled_back``).
ROLLED_BACK_SUFFIX = ".rolled_back"


def rolled_back_dir(model_base_path: str) -> str:
    """The sibling folder of ``model_base_path`` where :mod:`export.rollback` moves versions."""
    return model_base_path.rstrip("/") + ROLLED_BACK_SUFFIX


def used_numbers(model_base_path: str) -> list[int]:
    """Every version number the base has used: its numbered directories and those rolled back."""
    g = fileio.gfile()
    used = list_versions(model_base_path)
    side = rolled_back_dir(model_base_path)
    if g.isdir(side):
        for name in (n.rstrip("/") for n in g.listdir(side)):
            head = name.split("-", 1)[0]
            if head.isdigit() and g.isdir(os.path.join(side, name)):
                used.append(int(head))
    return sorted(set(used))


def check_blessing(candidate_dir: str, model_base_path: str) -> dict:
    """The blessing record of ``candidate_dir``, checked against its bytes and the serving base; see the docstring."""
    record = read_record(candidate_dir)
    where = record_path(candidate_dir)
    cand = record.get("candidate") or {}
    if record.get("blessed") is not True:
        reasons = "; ".join(record.get("reasons") or []) or "no reason recorded"
        raise ExportError(f"{candidate_dir}: not blessed ({where}: {reasons}); only a blessed version is pushed.")
    if cand.get("path") != fileio.absolute(candidate_dir):
        raise ExportError(f"{where}: the blessing is for {cand.get('path')}, not {fileio.absolute(candidate_dir)}.")
    now = fingerprint(candidate_dir)
    if cand.get("fingerprint") != now:
        raise ExportError(f"{candidate_dir}: its files changed since the blessing ({where} has "
                          f"{cand.get('fingerprint')}, the directory {now}); validate it again.")
    serving = record.get("serving") or {}
    if serving.get("model_base_path") != fileio.absolute(model_base_path):
        raise ExportError(f"{where}: the blessing compared against {serving.get('model_base_path')}, "
                          f"not {fileio.absolute(model_base_path)}; validate against this base.")
    versions = servable_versions(model_base_path)
    newest = versions[-1] if versions else None
    if newest != serving.get("version"):
        was = f"version {serving.get('version')}" if serving.get("version") is not None else "no version"
        raise ExportError(f"{model_base_path}: serves {'version ' + str(newest) if newest else 'no version'} now, "
                          f"the blessing compared against {was}; validate again.")
    if newest is not None and fingerprint(os.path.join(model_base_path, str(newest))) != serving.get("fingerprint"):
        raise ExportError(f"{model_base_path}/{newest}: changed since the blessing compared against it; "
                          "validate again.")
    return record


def push(candidate: str, model_base_path: str) -> dict:
    """Copies the blessed ``candidate`` into ``model_base_path`` as the next version; returns the updated record.

    Raises:
        ExportError: no blessing for exactly these bytes against this base, or the copy failed (the base
            is left as it was).
    """
    g = fileio.gfile()
    if not g.isdir(model_base_path):
        raise ExportError(f"{model_base_path}: no such directory; --serving is the TF Serving model base path.")
    candidate_dir = resolve_version(candidate, "--candidate")
    if version_number(candidate_dir) is None:
        raise ExportError(f"{candidate_dir}: not a numbered version directory.")
    record = check_blessing(candidate_dir, model_base_path)
    used = used_numbers(model_base_path)
    version = (used[-1] + 1) if used else 1
    final = os.path.join(model_base_path, str(version))
    if g.exists(final):
        raise ExportError(f"{final} already exists; versions are never overwritten.")
    record = dict(record, pushed={"serving_version": version, "path": fileio.absolute(final), "time": utc_now()})
    beside = record_path(final)
    local = fileio.is_local(model_base_path)
    tmp = os.path.join(model_base_path, f".tmp-push-{version}-{uuid.uuid4().hex[:8]}")
    published = False
    try:
        if local:
            copy_version(candidate_dir, tmp)
            if fingerprint(tmp) != record["candidate"]["fingerprint"]:
                raise ExportError(f"{tmp}: the copy's bytes differ from the blessed ones; nothing pushed.")
            fileio.write_json(beside, record)
            if os.path.exists(final):
                raise ExportError(f"{final} appeared while pushing; nothing pushed.")
            os.rename(tmp, final)
        else:
            fileio.write_json(beside, record)
            copy_version(candidate_dir, final)
            if fingerprint(final) != record["candidate"]["fingerprint"]:
                raise ExportError(f"{final}: the copy's bytes differ from the blessed ones.")
        published = True
    except BaseException:
        if local:
            shutil.rmtree(tmp, ignore_errors=True)
        elif not published:
            fileio.remove(final)
        if not published:
            fileio.remove(beside)
        raise
    fileio.write_json(record_path(candidate_dir), record)
    return record


def main(argv):
    del argv
    import tensorflow as tf
    from absl import flags

    FLAGS = flags.FLAGS
    try:
        record = push(FLAGS.candidate, FLAGS.serving)
    except (ExportError, SpecError, FileNotFoundError, OSError) as e:
        exit_error("push", one_line(e))
    except tf.errors.OpError as e:
        exit_error("push", e)
    print(json.dumps(record["pushed"], sort_keys=True))


def _define_flags():
    from absl import flags

    flags.DEFINE_string("candidate", None, "The blessed version directory (or its export base: the newest "
                        "version).", required=True)
    flags.DEFINE_string("serving", None, "The TF Serving model base path to push into.", required=True)


if __name__ == "__main__":
    from qin_tf.runtime import run_app

    _define_flags()
    run_app(main, tensorflow=True)
