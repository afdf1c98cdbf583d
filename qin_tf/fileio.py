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
