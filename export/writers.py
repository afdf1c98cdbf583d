"""Output writers of the serving side: scores to parquet or CSV, atomically, and the output-path rule.

Used by both batch scoring (``export.score``) and the serving client
(``export.client``):

* :func:`check_output`: :func:`qin_tf.fileio.check_output_path` before any
  work (never an input, never inside the export read, never a directory or a
  device; an existing file replaced only with ``--overwrite``), as one
  :class:`qin_tf.rows.PreprocessError` naming the output.
* :class:`ScoreWriter`: streams columns through a temporary file beside the
  output (``.{name}.score-{pid}-*.tmp``), renamed when complete; a failed run
  leaves nothing behind, and the temporary files of killed runs into the same
  output are removed (:func:`remove_stale_temp_files`).
* :func:`write_scores`: the client's ``row,ctr`` in one go.
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
import uuid
from typing import Mapping, Sequence

import numpy as np

from qin_tf import fileio
from qin_tf.rows import fail
from qin_tf.runtime import process_alive
from qin_tf.signatures import OUTPUT

FORMATS = ("parquet", "csv", "challenge")
#: Column names of the outputs.
ROW_COLUMN = "row"
SCORE_COLUMN = OUTPUT


def check_output(output: str, inputs: Sequence[str], *, overwrite: bool = False,
                 saved_model: str | None = None) -> None:
    """Refuses, before any work, an output that would lose data or cannot be created.

    The rule is :func:`qin_tf.fileio.check_output_path`, the one
    ``export.client`` applies too: never one of ``inputs`` or inside the
    export ``saved_model`` (its base and version directories), never a
    directory or a device, an existing file replaced only with ``overwrite``.

    Raises:
        PreprocessError: naming ``output`` and the reason.
    """
    try:
        fileio.check_output_path(output, inputs, overwrite=overwrite,
                                 read_trees=fileio.export_trees(saved_model) if saved_model else ())
    except fileio.OutputPathError as e:
        fail(output, None, None, e.reason)


def _temp_pattern(path: str) -> re.Pattern:
    """The names of :class:`ScoreWriter`'s temporary files for ``path``; group 1 is the writer's pid."""
    return re.compile(rf"\.{re.escape(os.path.basename(path))}\.score-(\d+)-[0-9a-f]{{8}}\.tmp")


def remove_stale_temp_files(path: str) -> list[str]:
    """Removes the temporary files of killed runs that wrote ``path``; returns their paths.

    Only files named as :class:`ScoreWriter` names them for this output, and
    only those whose writing process is gone (a live run keeps its file).
    """
    directory = os.path.dirname(os.path.abspath(path))
    pattern, removed = _temp_pattern(path), []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        m = pattern.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not process_alive(int(m.group(1))):
            try:
                os.remove(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
            except FileNotFoundError:  # another run cleaned it first
                pass
    return removed


class ScoreWriter:
    """Streams scores to parquet or CSV through a temporary file renamed on :meth:`close`.

    The temporary file (``.{name}.score-{pid}-{random}.tmp`` beside ``path``)
    is created with the umask's permissions, as the output then has; the
    temporary files of killed runs into the same ``path`` are removed first
    (:func:`remove_stale_temp_files`).

    When ``path`` is a URL (``gs://``, ``ram://``), the scores are written to
    a local temporary file, which :meth:`close` copies to the temporary name
    beside ``path`` and renames over ``path`` (a copy and a delete on an
    object store: see :mod:`qin_tf.fileio`). A killed run's temporary object
    there is not removed (whether its writer lives is not known from another
    machine).
    """

    def __init__(self, path: str, fmt: str):
        if fmt not in FORMATS:
            raise ValueError(f"`format` must be one of {FORMATS}. Received: format={fmt!r}")
        self.path = path
        self.fmt = fmt
        self.local = fileio.is_local(path)
        name = f".{os.path.basename(path)}.score-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        if self.local:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            remove_stale_temp_files(path)
            self.tmp = self.file = os.path.join(directory, name)
            os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 & ~umask
        else:
            fileio.gfile().makedirs(os.path.dirname(path))
            self.tmp = os.path.join(os.path.dirname(path), name)
            fd, self.file = tempfile.mkstemp(prefix="qin_score_", suffix=".tmp")  # what pyarrow and csv write
            os.close(fd)
        self._parquet = None
        self._csv_file = None
        self._csv = None

    def write(self, columns: Mapping[str, np.ndarray]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.fmt == "parquet":
            table = pa.table(dict(columns))
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.file, table.schema)
            self._parquet.write_table(table)
            return
        if self._csv is None:
            self._csv_file = open(self.file, "w", newline="")
            self._csv = csv.writer(self._csv_file)
            self._csv.writerow(list(columns))
        cols = [c.tolist() for c in columns.values()]
        self._csv.writerows(zip(*cols))

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._csv_file is not None:
            self._csv_file.close()
        if self.local:
            os.replace(self.tmp, self.path)
            return
        g = fileio.gfile()
        g.copy(self.file, self.tmp, overwrite=True)
        os.remove(self.file)
        g.rename(self.tmp, self.path, overwrite=True)

    def abort(self) -> None:
        for f in (self._parquet, self._csv_file):
            try:
                if f is not None:
                    f.close()
            except Exception:
                pass
        if os.path.exists(self.file):
            os.remove(self.file)
        if not self.local:
            fileio.remove(self.tmp)


def write_scores(path: str, scores: np.ndarray) -> None:
    """Writes ``row,ctr`` to ``path`` (parquet when it ends in ``.parquet``, else CSV), atomically."""
    writer = ScoreWriter(path, "parquet" if path.endswith(".parquet") else "csv")
    try:
        writer.write({ROW_COLUMN: np.arange(scores.shape[0], dtype=np.int64), SCORE_COLUMN: scores})
        writer.close()
    except BaseException:
        writer.abort()
        raise

