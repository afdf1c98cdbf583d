"""Files on any TensorFlow filesystem: a local path and a URL (``gs://``, ``ram://``) alike.

Every path qin-tf reads or writes (``data_dir``, ``model_dir``,
``export_base``, the scoring input and output) goes through ``tf.io.gfile``
and these helpers; ``os.path.join`` is fine on URLs (it joins with ``/``),
``os.path.abspath``, ``os.path.exists`` and ``open`` are not (they would
look on the local disk).

What "atomic" means depends on the filesystem:

* local or POSIX (NFS): :func:`write_bytes` writes a temporary name and
  renames it, a ``rename(2)``: a reader sees the old file or the new one.
* object stores (``gs://``): an object appears whole when its upload
  finishes, and a rename is a copy and a delete. A reader still never sees
  a partial object under the final name, but a kill between the copy and the
  delete can leave the ``.tmp`` object behind. A directory cannot be renamed
  at once (TensorFlow's ``ram://`` does not move its files at all), so
  there a directory is published with :func:`copy_tree`, file by file, the
  ones named in ``last`` last, instead of being renamed.

Example::

    write_json("gs://bucket/run/metrics.json", {"auc": 0.75})
    read_json("gs://bucket/run/metrics.json")
"""

from __future__ import annotations

import errno
import io
import json
import os
import posixpath
import stat
from typing import Sequence


def gfile():
    """``tf.io.gfile``; TensorFlow is imported quietly on first use, but not started.

    Not started (no device set up): a multi-worker strategy may still be
    created afterwards (see :mod:`qin_tf.task`).
    """
    from qin_tf.runtime import import_tensorflow

    return import_tensorflow(start=False).io.gfile


def is_local(path: str) -> bool:
    """Whether ``path`` is on the local file system (no URL scheme, or ``file://``)."""
    return "://" not in path or path.startswith("file://")


def absolute(path: str) -> str:
    """``os.path.abspath`` of a local path; a URL is already absolute (``abspath`` would mangle it)."""
    return os.path.abspath(path) if is_local(path) else path


class OutputPathError(ValueError):
    """An output path that would lose data or cannot be created; ``path`` and ``reason`` as attributes.

    The message is ``"{path}: {reason}"``, one line.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _normal_url(url: str) -> str:
    """``url`` with its path normalised (``a//b/./c/`` -> ``a/b/c``), for comparing URLs as strings."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{posixpath.normpath('/' + rest).lstrip('/')}"


def _within(path: str, root: str, sep: str) -> bool:
    return path == root or path.startswith(root.rstrip(sep) + sep)


def check_output_path(output: str, inputs: Sequence[str] = (), *, overwrite: bool = False,
                      read_trees: Sequence[str] = ()) -> None:
    """The one rule for a command's output file (batch scoring, the serving client), checked before any work.

    Refused:

    * an output that is one of ``inputs`` or lies inside one (an input may be a directory);
    * an output inside one of ``read_trees``: directories the command reads
      (an export base and its version directories);
    * a directory, or a path under a file;
    * anything but a regular file where the output exists (a device such as
      ``/dev/full``, a pipe, a socket): ``--overwrite`` replaces only a regular file;
    * an existing output without ``overwrite``.

    Local paths are compared after resolving symbolic links (``realpath``);
    URLs (``gs://``, ``ram://``) as normalised strings.

    Raises:
        OutputPathError: naming ``output`` and the reason.
    """
    trees = [p for p in (*inputs, *read_trees) if p]
    if not is_local(output):
        g = gfile()
        out = _normal_url(output)
        if g.isdir(output):
            raise OutputPathError(output, "the output is a directory; give the path of a file")
        for p in trees:
            if not is_local(p) and _within(out, _normal_url(p), "/"):
                raise OutputPathError(output, _inside(p, inputs, out == _normal_url(p)))
        if g.exists(output) and not overwrite:
            raise OutputPathError(output, "the output exists; pass --overwrite to replace it, or choose "
                                          "another file")
        return
    path = os.path.abspath(output)
    real = os.path.realpath(path)
    if os.path.isdir(real):
        raise OutputPathError(output, "the output is a directory; give the path of a file")
    for p in trees:
        if is_local(p) and _within(real, os.path.realpath(p), os.sep):
            raise OutputPathError(output, _inside(p, inputs, real == os.path.realpath(p)))
    if os.path.lexists(path):
        try:
            mode = os.stat(real).st_mode
        except OSError:  # a dangling symbolic link: writing would create its target
            mode = None
        if mode is not None and not stat.S_ISREG(mode):
            raise OutputPathError(output, "the output is not a regular file (a device, pipe or socket); "
                                          "--overwrite replaces only a regular file")
        if not overwrite:
            raise OutputPathError(output, "the output exists; pass --overwrite to replace it, or choose "
                                          "another file")
    parent = os.path.dirname(real)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputPathError(output, f"cannot create the output: {parent} is a file, not a directory")


def _inside(tree: str, inputs: Sequence[str], same: bool) -> str:
    if tree in inputs:
        return ("the output is one of the inputs; write the scores to another file" if same else
                f"the output lies inside the input {tree}; write the scores to another file")
    return f"the output lies inside {tree}, which this command reads; write the scores elsewhere"


def export_trees(saved_model: str) -> list[str]:
    """What a command that loads ``saved_model`` reads: the path, and the export base above a version directory.

    ``saved_model`` is an export base (its numbered versions inside) or one
    version directory (``.../export/3``): then its parent, the export base,
    is read too (the next version appears there).
    """
    trees = [saved_model]
    name = os.path.basename(saved_model.rstrip("/"))
    if name.isdigit():
        trees.append(os.path.dirname(saved_model.rstrip("/")))
    return trees


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary name and a rename (see the module docstring)."""
    g = gfile()
    tmp = f"{path}.tmp"
    with g.GFile(tmp, "wb") as f:
        f.write(data)
    g.rename(tmp, path, overwrite=True)


def write_text(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically (:func:`write_bytes`)."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically (:func:`write_bytes`)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def read_bytes(path: str) -> bytes:
    """The bytes of ``path``; a missing file raises ``FileNotFoundError`` (as ``open`` does)."""
    g = gfile()
    import tensorflow as tf

    try:
        with g.GFile(path, "rb") as f:
            return f.read()
    except tf.errors.NotFoundError:  # open()'s own error and message
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from None


def read_text(path: str) -> str:
    """The UTF-8 text of ``path`` (:func:`read_bytes`)."""
    return read_bytes(path).decode("utf-8")


def read_json(path: str):
    """The JSON value in ``path`` (``json.JSONDecodeError`` on bad JSON)."""
    return json.loads(read_text(path))


def replace(src: str, dst: str) -> None:
    """Renames the file ``src`` to ``dst``, replacing it (``os.replace`` on any filesystem)."""
    gfile().rename(src, dst, overwrite=True)


def remove(path: str) -> None:
    """Removes the file or directory tree ``path``; nothing if it does not exist."""
    g = gfile()
    import tensorflow as tf

    try:
        if g.isdir(path):
            g.rmtree(path)
        elif g.exists(path):
            g.remove(path)
    except tf.errors.NotFoundError:  # removed concurrently, or a ram:// entry already gone
        pass


def copy_tree(src: str, dst: str, *, last: Sequence[str] = ()) -> None:
    """Copies the files under directory ``src`` into ``dst`` (any filesystems), creating directories.

    Files whose path relative to ``src`` is in ``last`` are copied after all
    the others (``saved_model.pb`` of a SavedModel: a version directory
    holds one only once the rest is there).
    """
    g = gfile()
    files = []
    for directory, _, names in g.walk(src):
        rel = os.path.relpath(directory, src) if is_local(src) else directory[len(src):].strip("/")
        target = dst if rel in ("", ".") else os.path.join(dst, rel)
        g.makedirs(target)
        files += [(os.path.join(directory, n), os.path.join(target, n),
                   os.path.normpath(os.path.join(rel, n))) for n in names]
    for a, b, _ in sorted(files, key=lambda f: f[2] in last):
        g.copy(a, b, overwrite=False)


def open_text(path: str):
    """``path`` opened for reading UTF-8 text: ``open`` for a local path, a ``GFile`` for a URL."""
    return open(path, encoding="utf-8") if is_local(path) else gfile().GFile(path, "r")


class _GFileReader(io.RawIOBase):
    """A seekable binary reader over a ``GFile`` (what pyarrow needs; a ``GFile`` lacks ``closed``)."""

    def __init__(self, path: str):
        super().__init__()
        self._f = gfile().GFile(path, "rb")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._f.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._f.seek(offset, whence)
        return self._f.tell()

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def binary_source(path: str):
    """What pyarrow reads ``path`` from: the path itself when local, else a seekable file object."""
    return path if is_local(path) else io.BufferedReader(_GFileReader(path))
