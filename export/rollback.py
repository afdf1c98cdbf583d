r"""Rolls TF Serving back to an earlier version: the newer versions leave the model base path, kept aside.

    python -m export.rollback --model_base_path=/srv/models/qin [--to_version=2]

TF Serving (and ``export.local_server``) serve the newest version in the base
path. This moves every version newer than the target (default: the newest
servable version's predecessor) out of the base into the sibling folder
``BASE.rolled_back/`` (:func:`export.push.rolled_back_dir`), with its
``<v>.validation.json``; nothing is deleted. The versions are moved oldest
first, the newest last, so the server goes from the newest version straight
to the target. On a local filesystem each move is one ``rename(2)`` (atomic);
on a URL (``gs://``) a directory cannot be renamed at once, so each is
copied into the sibling folder and then removed from the base,
``saved_model.pb`` first (the server stops loading it at once).

The action is recorded in ``BASE.rolled_back/rollback-<UTC time>.json``:
the versions moved, from and to which version, when. A rolled-back number is
not reused: :mod:`export.push` numbers the next version after it. To serve a
rolled-back version again, validate and push it as a new version.

Refused, one line and exit code 1, nothing moved: a base with only one
servable version (rolling it back would leave nothing to serve), a
``--to_version`` that is not a servable version older than the newest, a
wrong path, or a name already taken in the sibling folder.
"""

from __future__ import annotations

import datetime
import json
import os

from export.exporter import ExportError, list_versions, servable_versions
from export.push import rolled_back_dir
from export.validate import copy_version, record_path, utc_now
from qin_tf import fileio
from qin_tf.cli import exit_error
from qin_tf.rows import one_line


def rollback(model_base_path: str, to_version: int | None = None) -> dict:
    """Moves the versions newer than ``to_version`` out of ``model_base_path``; returns the action's record.

    Raises:
        ExportError: see the module docstring; nothing is moved.
    """
    g = fileio.gfile()
    if not g.isdir(model_base_path):
        raise ExportError(f"{model_base_path}: no such directory; --model_base_path is the TF Serving model base path.")
    servable = servable_versions(model_base_path)
    if not servable:
        raise ExportError(f"{model_base_path}: no servable version here; nothing to roll back.")
    if len(servable) == 1:
        raise ExportError(f"{model_base_path}: version {servable[0]} is the only one left; rolling it back "
                          "would leave nothing to serve.")
    newest = servable[-1]
    if to_version is None:
        to_version = servable[-2]
    elif to_version not in servable or to_version >= newest:
        raise ExportError(f"{model_base_path}: --to_version={to_version} is not a servable version older than the "
                          f"newest ({newest}); servable versions: {servable}.")
    moving = [v for v in list_versions(model_base_path) if v > to_version]  # ascending: the served one last
    side = rolled_back_dir(model_base_path)
    moves = []
    for v in moving:
        src = os.path.join(model_base_path, str(v))
        dst = os.path.join(side, str(v))
        for a, b in ((src, dst), (record_path(src), record_path(dst))):
            if g.exists(a):
                if g.exists(b):
                    raise ExportError(f"{b} already exists; move it away before rolling back version {v}.")
                moves.append((a, b))
    g.makedirs(side)
    local = fileio.is_local(model_base_path) and fileio.is_local(side)
    for a, b in moves:
        if local:
            os.rename(a, b)
        elif g.isdir(a):
            copy_version(a, b, last=())
            fileio.remove(os.path.join(a, "saved_model.pb"))
            fileio.remove(a)
        else:
            g.copy(a, b, overwrite=False)
            g.remove(a)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    record = {"action": "rollback", "model_base_path": fileio.absolute(model_base_path), "from_version": newest,
              "to_version": to_version, "moved": {str(v): fileio.absolute(os.path.join(side, str(v)))
                                                  for v in moving},
              "time": utc_now()}
    fileio.write_json(os.path.join(side, f"rollback-{stamp}.json"), record)
    return record


def main(argv):
    del argv
    import tensorflow as tf
    from absl import flags

    FLAGS = flags.FLAGS
    try:
        record = rollback(FLAGS.model_base_path, FLAGS.to_version)
    except (ExportError, FileNotFoundError, OSError) as e:
        exit_error("rollback", one_line(e))
    except tf.errors.OpError as e:
        exit_error("rollback", e)
    print(json.dumps(record, sort_keys=True))


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model_base_path", None, "The TF Serving model base path.", required=True)
    flags.DEFINE_integer("to_version", None, "The version to serve; default: the one before the newest.",
                         lower_bound=1)


if __name__ == "__main__":
    from qin_tf.runtime import run_app

    _define_flags()
    run_app(main, tensorflow=True)
