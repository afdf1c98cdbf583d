"""Putting a finished run's output in place: all of it or nothing, and recoverable after a kill.

A run writes into a sibling ``{output_dir}.tmp-*`` directory marked by its
tool's manifest (host and process), then puts it in place:

* :func:`swap_commit` (:mod:`pipelines.preprocess`): a directory rename when
  the output holds nothing else, else entry by entry, keeping the rest.
* :func:`journalled_commit` (:mod:`pipelines.build_examples`): file by file
  under a journal, which :func:`recover_commit` completes or rolls back in the
  next run after a kill.

A :class:`Ledger` names the tool, its manifest and its marker file;
:func:`remove_stale_siblings` removes what killed runs left (not what a run
still going on this host is writing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import uuid
from typing import Sequence

from pipelines import beamio
from qin_tf.rows import fail
from qin_tf.runtime import process_alive


@dataclasses.dataclass(frozen=True)
class Ledger:
    """How a tool marks what it owns in an output directory.

    ``manifest`` (in the output) lists every file the last run wrote, as paths
    relative to the output (``vocab/item_id.txt``), and nothing else: the same
    bytes for the same files. In a ``.tmp-*`` directory it marks the run
    (host, pid) instead. ``marker`` is the file that makes a directory an
    output: it goes out first and comes back last.
    """

    tool: str
    manifest: str
    marker: str

    @property
    def journal(self) -> str:
        """The commit's journal, in the output while a commit is under way."""
        return f".{self.manifest}.commit"


def write_manifest(directory: str, files: Sequence[str] | None, ledger: Ledger):
    """Writes ``ledger``'s manifest (atomically): ``files`` are the entries the run owns; ``None``: a marker only."""
    tmp = beamio.join(directory, f".{ledger.manifest}.tmp")
    beamio.write_text(tmp, json.dumps({"tool": ledger.tool, "host": socket.gethostname(), "pid": os.getpid(),
                                       "files": None if files is None else sorted(files)}, indent=2) + "\n")
    beamio.rename(tmp, beamio.join(directory, ledger.manifest))


def read_manifest(directory: str, ledger: Ledger) -> dict | None:
    """``ledger``'s manifest in ``directory`` if it has one written by ``ledger.tool``, else None."""
    path = beamio.join(directory, ledger.manifest)
    if not beamio.exists(path):
        return None
    try:
        manifest = json.loads(beamio.read_text(path))
    except (ValueError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("tool") == ledger.tool else None


def _running_elsewhere(record: dict) -> bool:
    """Whether the run a manifest or journal names (``host``, ``pid``) is another process still alive here."""
    pid = record.get("pid")
    return (record.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid()
            and process_alive(pid))


def resolve_output_dir(output_dir: str) -> str:
    """``output_dir`` without a trailing slash; a local symbolic link is followed, so that the run
    replaces the contents of its target (next to which the ``.tmp-*`` directory goes) and the link stays."""
    out = output_dir.rstrip("/") or output_dir
    return os.path.realpath(out) if beamio.is_local(out) and os.path.islink(out) else out


def _sibling(output_dir: str, name: str) -> str:
    """``name`` in the directory that holds ``output_dir``."""
    if beamio.is_local(output_dir):
        return os.path.join(os.path.dirname(output_dir) or ".", name)
    return output_dir.rsplit("/", 1)[0] + "/" + name


def remove_stale_siblings(output_dir: str, ledger: Ledger):
    """Removes the ``{output_dir}.tmp-*`` directories (and ``.old-*`` ones, when
    ``output_dir`` exists) that killed runs left: only those marked by ``ledger``'s
    manifest, and not those of a process still running on this host."""
    if beamio.is_local(output_dir):
        parent, base = os.path.dirname(output_dir) or ".", os.path.basename(output_dir)
    else:
        parent, base = output_dir.rsplit("/", 1)
    prefixes = (f"{base}.tmp-",) + ((f"{base}.old-",) if beamio.exists(output_dir) else ())
    for entry in sorted({n for start in prefixes for n in beamio.list_dir(parent, start)}):
        path = beamio.join(parent, entry)
        manifest = read_manifest(path, ledger)
        if manifest is None or _running_elsewhere(manifest):
            continue
        beamio.delete(path)


def swap_commit(work_dir: str, output_dir: str, owned: set[str] | None, ledger: Ledger, what: str):
    """Puts the finished ``work_dir`` in place of the earlier run's entries (``owned``) of ``output_dir``.

    When ``output_dir`` holds nothing else, a directory rename (the old
    output is removed after). Otherwise entry by entry, keeping the rest;
    meanwhile the output's manifest names the earlier and the new entries,
    so a rerun after a kill still knows them all. ``ledger.marker`` is the entry
    that makes the directory an output (:mod:`pipelines.preprocess`'s feature
    spec): it goes out first and comes back last. ``what`` names the tool in
    an error (a kept entry that has the name of a new one).
    """
    kept = sorted(set(beamio.list_dir(output_dir)) - (owned or set())) if beamio.exists(output_dir) else []
    if kept:
        _swap_entries(work_dir, output_dir, owned or set(), kept, ledger, what)
        return
    old = None
    if beamio.exists(output_dir):
        old = f"{output_dir}.old-{uuid.uuid4().hex[:8]}"
        beamio.rename(output_dir, old)
    try:
        beamio.rename(work_dir, output_dir)
    except Exception:
        if old is not None:
            beamio.rename(old, output_dir)
        raise
    if old is not None:
        beamio.delete(old)


def _swap_entries(work_dir: str, output_dir: str, owned: set[str], kept: Sequence[str], ledger: Ledger,
                  what: str):
    marker = ledger.marker
    new = [n for n in beamio.list_dir(work_dir) if n != ledger.manifest]
    has_manifest = beamio.exists(beamio.join(work_dir, ledger.manifest))
    clash = sorted(set(new) & set(kept))
    if clash:
        fail(output_dir, None, None, f"holds {clash}, which {what} did not write and would replace; "
                                     f"move them away or choose another --output_dir")
    present = set(beamio.list_dir(output_dir))
    old = f"{output_dir}.old-{uuid.uuid4().hex[:8]}"
    beamio.makedirs(old)
    write_manifest(old, None, ledger)  # marked: removed by the next run if this one is killed
    write_manifest(output_dir, (owned | set(new)) - {ledger.manifest}, ledger)
    # The marker goes first and comes back last: a half-swapped directory is no loadable output.
    for name in [marker] + sorted(owned - {marker, ledger.manifest}):
        if name in present:
            beamio.rename(beamio.join(output_dir, name), beamio.join(old, name))
    for name in sorted(set(new) - {marker}) + [marker]:
        beamio.rename(beamio.join(work_dir, name), beamio.join(output_dir, name))
    if has_manifest:
        beamio.rename(beamio.join(work_dir, ledger.manifest), beamio.join(output_dir, ledger.manifest))
    else:
        beamio.delete(beamio.join(output_dir, ledger.manifest))
    beamio.delete(old)
    beamio.delete(work_dir)


# --------------------------------------------------------------------------
# The journalled commit: file by file, recoverable after a kill
# --------------------------------------------------------------------------

#: Tests only: the journalled commit exits at once, as SIGKILL would stop it, right after its Nth rename.
CRASH_AFTER_RENAME_ENV = "QIN_TF_CRASH_AFTER_RENAME"
_renames_done = 0


def _has(directory: str, name: str) -> bool:
    return beamio.exists(beamio.join(directory, name))


def _parent(path: str) -> str:
    return os.path.dirname(path) if beamio.is_local(path) else path.rsplit("/", 1)[0]


def _files_under(directory: str) -> list[str]:
    """The files under ``directory`` at any depth, as ``/``-separated paths relative to it."""
    if not beamio.exists(directory):
        return []
    if beamio.is_local(directory):
        return sorted(os.path.relpath(os.path.join(d, f), directory).replace(os.sep, "/")
                      for d, _, fs in os.walk(directory) for f in fs)
    prefix = directory.rstrip("/") + "/"
    return sorted(p[len(prefix):] for p in beamio.under(directory))


def _commit_rename(src: str, dst: str):
    global _renames_done
    beamio.makedirs(_parent(dst))
    beamio.rename(src, dst)
    _renames_done += 1
    if os.environ.get(CRASH_AFTER_RENAME_ENV) == str(_renames_done):
        os._exit(137)


def _write_journal(work_dir: str, output_dir: str, journal: dict, ledger: Ledger):
    tmp = beamio.join(work_dir, f"{ledger.journal}.tmp")
    beamio.write_text(tmp, json.dumps(journal, indent=2) + "\n")
    _commit_rename(tmp, beamio.join(output_dir, ledger.journal))


def journalled_commit(work_dir: str, output_dir: str, owned: set[str], ledger: Ledger, what: str):
    """Puts the files of the finished ``work_dir`` in place of the earlier run's files (``owned``,
    relative paths) in ``output_dir``, keeping every other file there.

    Before its first rename it writes a journal into ``output_dir`` naming the
    temporary and the old directory and the files going out and in; a run
    killed meanwhile is completed (or, without its temporary directory, rolled
    back) by :func:`recover_commit` in the next run. ``work_dir`` holds the
    run's marker manifest, which stays behind; the output gets a manifest
    listing the new files. Raises PreprocessError, changing nothing, when a
    file that is not ``owned`` has the name of a new one (or of a folder of one).
    """
    new = [f for f in _files_under(work_dir) if f != ledger.manifest and not f.startswith(".")]
    present = set(_files_under(output_dir)) - {ledger.journal}
    kept = present - owned
    clash = sorted(k for k in kept for n in new if n == k or n.startswith(k + "/") or k.startswith(n + "/"))
    if clash:
        fail(output_dir, None, None, f"holds {clash}, which {what} did not write and would replace; "
                                     f"move them away or choose another --output_dir")
    replaced = sorted(present & owned, key=lambda n: (n != ledger.marker, n))
    journal = {"tool": ledger.tool, "host": socket.gethostname(), "pid": os.getpid(), "state": "commit",
               "created": not beamio.exists(output_dir), "tmp": os.path.basename(work_dir.rstrip("/")),
               "old": f"{os.path.basename(output_dir)}.old-{uuid.uuid4().hex[:8]}", "replaced": replaced,
               "new": sorted(set(new) - {ledger.marker}) + ([ledger.marker] if ledger.marker in new else [])}
    beamio.makedirs(output_dir)
    _write_journal(work_dir, output_dir, journal, ledger)
    try:
        _roll_forward(output_dir, journal, ledger)
    except Exception:
        try:
            _roll_back(output_dir, journal, ledger)
        except Exception:  # the journal stays: the next run finishes the job
            pass
        raise


def _roll_forward(output_dir: str, journal: dict, ledger: Ledger):
    tmp, old = _sibling(output_dir, journal["tmp"]), _sibling(output_dir, journal["old"])
    for name in journal["replaced"]:  # out first; a file already in `old` went out before a kill
        if not beamio.exists(beamio.join(old, name)) and beamio.exists(beamio.join(output_dir, name)):
            _commit_rename(beamio.join(output_dir, name), beamio.join(old, name))
    for name in journal["new"]:  # in, the marker last; a file no longer in `tmp` came in before a kill
        if beamio.exists(beamio.join(tmp, name)):
            _commit_rename(beamio.join(tmp, name), beamio.join(output_dir, name))
    manifest = beamio.join(tmp, f".{ledger.manifest}.new")
    beamio.write_text(manifest, json.dumps({"tool": ledger.tool, "files": sorted(journal["new"])}, indent=2) + "\n")
    _commit_rename(manifest, beamio.join(output_dir, ledger.manifest))
    _write_journal(tmp, output_dir, {**journal, "state": "done"}, ledger)
    _finish(output_dir, journal, ledger)


def _roll_back(output_dir: str, journal: dict, ledger: Ledger):
    old = _sibling(output_dir, journal["old"])
    replaced = set(journal["replaced"])
    for name in journal["new"] + [ledger.manifest]:  # a new file is one not replaced, or one whose old one went out
        if _has(output_dir, name) and (name not in replaced or _has(old, name)):
            beamio.delete(beamio.join(output_dir, name))
    for name in journal["replaced"]:
        if beamio.exists(beamio.join(old, name)):
            _commit_rename(beamio.join(old, name), beamio.join(output_dir, name))
    _finish(output_dir, journal, ledger, emptied=journal["new"])


def _finish(output_dir: str, journal: dict, ledger: Ledger, emptied: Sequence[str] = ()):
    """Removes the old and the temporary directory, folders the swap emptied, then the journal."""
    beamio.delete(_sibling(output_dir, journal["old"]))
    beamio.delete(_sibling(output_dir, journal["tmp"]))
    if beamio.is_local(output_dir):
        folders = {os.path.dirname(n) for n in [*journal["replaced"], *emptied]} - {""}
        for folder in sorted(folders, key=len, reverse=True):
            path = os.path.join(output_dir, folder)
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
    beamio.delete(beamio.join(output_dir, ledger.journal))
    if journal.get("created") and journal.get("state") != "done" and beamio.is_local(output_dir) \
            and not os.listdir(output_dir):
        os.rmdir(output_dir)  # rolled back a first run: no output, as before it


def recover_commit(output_dir: str, ledger: Ledger):
    """Completes (or rolls back) the commit of a run killed during :func:`journalled_commit`.

    Roll forward when the temporary directory still holds every new file that
    is not yet in place; otherwise roll back from the old directory. A commit
    of a run still going on this host is left alone, and this run refused.
    """
    path = beamio.join(output_dir, ledger.journal)
    if not beamio.exists(path):
        return
    try:
        journal = json.loads(beamio.read_text(path))
        if journal.get("tool") != ledger.tool:
            raise ValueError(journal.get("tool"))
        tmp, old = _sibling(output_dir, journal["tmp"]), _sibling(output_dir, journal["old"])
        replaced, new = set(journal["replaced"]), list(journal["new"])
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        fail(path, None, None, f"not a commit journal of {ledger.tool}; move it away to write into "
                               f"{output_dir}")
    if _running_elsewhere(journal):
        fail(output_dir, None, None, f"another {ledger.tool} run (pid {journal['pid']}) is replacing this directory's "
                                     f"files; wait for it to end")
    if journal.get("state") == "done":
        _finish(output_dir, journal, ledger)
    elif beamio.exists(tmp) and all(_has(tmp, n) or (_has(output_dir, n) and (n not in replaced or _has(old, n)))
                                    for n in new):
        _roll_forward(output_dir, journal, ledger)
    else:
        _roll_back(output_dir, journal, ledger)


# --------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------
