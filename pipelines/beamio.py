"""Beam on the pipeline side: its quiet import, its file systems, its options, and running a pipeline.

* ``beam``: ``apache_beam``, imported without the "apitools not found" log
  line Beam writes when its [gcp] extra is missing.
* Files through Beam's ``FileSystems`` (local paths, ``gs://``, ``s3://``,
  ``hdfs://``): :func:`join`, :func:`exists`, :func:`list_dir`,
  :func:`open_read`, :func:`create`, :func:`read_text`, :func:`write_text`,
  :func:`makedirs`, :func:`rename`, :func:`delete`. A local path goes through
  Python's own ``open`` and ``os``; on an object store a "directory" is the
  objects under a prefix.
* :func:`pipeline_options`: ``PipelineOptions`` with the project's local
  defaults, refusing arguments Beam does not know.
* :func:`run_pipeline`: runs a pipeline to the end; the project's own error a
  worker raised comes back as itself, anything else as one line.

Used by :mod:`pipelines.preprocess`, :mod:`pipelines.build_examples` and the
modules beside them; :mod:`pipelines.commit` puts their outputs in place.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence


class _DropBeamImportNoise(logging.Filter):
    """Beam without its [gcp] extra logs 'apitools not found ...' on import: not a user's concern."""

    def filter(self, record):
        return "apitools not found" not in record.getMessage()


_noise = _DropBeamImportNoise()
logging.getLogger().addFilter(_noise)
try:
    import apache_beam as beam  # noqa: F401  (imported once, quietly: modules take it from here)
finally:
    logging.getLogger().removeFilter(_noise)
from apache_beam.io.filesystem import CompressionTypes  # noqa: E402
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from qin_tf.rows import PreprocessError

from pipelines.validation import beam_failure, beam_worker_errors_unlogged, unwrap_beam_error


# --------------------------------------------------------------------------
# Files (through Beam's FileSystems: local paths, gs://, s3://, hdfs://)
# --------------------------------------------------------------------------


def is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) is None


def has_dirs(path: str) -> bool:
    """False on object stores (``gs://``, ``s3://``): a "directory" there is the objects under a prefix."""
    return is_local(path) or FileSystems.get_filesystem(path).has_dirs()


def join(base: str, *parts: str) -> str:
    return os.path.join(base, *parts) if is_local(base) else FileSystems.join(base, *parts)


def create(path: str):
    """A new file at ``path``, open for writing bytes."""
    if is_local(path):
        return open(path, "wb")
    return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)


def open_read(path: str):
    """The file at ``path``, open for reading bytes."""
    if is_local(path):
        return open(path, "rb")
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def under(directory: str, start: str = "") -> list[str]:
    """Paths of the objects under ``directory/start*`` on an object store, at any depth."""
    return [m.path for m in FileSystems.match([directory.rstrip("/") + "/" + start + "**"])[0].metadata_list]


def exists(path: str) -> bool:
    """A file or a directory; on an object store, a directory exists while objects are under it."""
    if is_local(path):
        return os.path.exists(path)
    return FileSystems.exists(path) or (not has_dirs(path) and bool(under(path)))


def makedirs(path: str):
    if is_local(path):
        os.makedirs(path, exist_ok=True)
    elif has_dirs(path) and not FileSystems.exists(path):
        FileSystems.mkdirs(path)


def delete(path: str):
    """Deletes a file or a directory with all it holds (nothing if absent)."""
    if has_dirs(path):
        if exists(path):
            FileSystems.delete([path])
        return
    found = ([path] if FileSystems.exists(path) else []) + under(path)
    if found:
        FileSystems.delete(found)


def rename(src: str, dst: str):
    """Moves a file or a directory; on an object store, a directory's objects one by one."""
    if has_dirs(src) or FileSystems.exists(src):
        FileSystems.rename([src], [dst])
        return
    objects = under(src)
    if not objects:
        raise FileNotFoundError(f"{src}: nothing to move")
    prefix = src.rstrip("/") + "/"
    FileSystems.rename(objects, [dst.rstrip("/") + "/" + p[len(prefix):] for p in objects])


def list_dir(directory: str, start: str = "") -> list[str]:
    """Base names of the entries directly in ``directory`` (those starting with ``start``)."""
    if is_local(directory):
        names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        return [n for n in names if n.startswith(start)]
    prefix = directory.rstrip("/") + "/"
    if has_dirs(directory):
        found = [m.path for m in FileSystems.match([prefix + start + "*"])[0].metadata_list]
    else:
        found = under(directory, start)
    return sorted({p[len(prefix):].split("/")[0] for p in found})


def write_text(path: str, text: str):
    with create(path) as f:
        f.write(text.encode("utf-8"))


def read_text(path: str) -> str:
    with open_read(path) as f:
        return f.read().decode("utf-8")


# --------------------------------------------------------------------------
# Beam options
# --------------------------------------------------------------------------


#: The embedded worker's timed flush interval we set (ms): longer than any run, so no timed flush happens.
_NO_TIMED_FLUSH_MS = 2 ** 31


def _disable_timed_flush():
    """Turns off the timed flush of Beam's in-process gRPC data plane (``multi_threading`` mode); size-based stays.

    Beam (2.77 and earlier) gives the embedded gRPC worker and the runner's
    data service ``DATA_BUFFER_TIME_LIMIT_MS`` = 1000: every data output
    stream gets a timer thread that flushes it once a second (``get()``, send,
    then ``_clear()``) while the bundle's thread keeps writing elements into it
    without that lock, so what is written between the ``get()`` and the
    ``_clear()`` is lost. Any bundle that outlasts a second can drop elements at
    random (build_examples lost users and rows on MovieLens-100k in every
    ``multi_threading`` run). A batch pipeline needs no timed flush: the streams
    still flush by size and on close. ``in_memory`` (no data plane) and
    ``multi_processing`` (the worker's own default is no timed flush) never
    used it.
    """
    from apache_beam.runners.portability.fn_api_runner import worker_handlers

    worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = _NO_TIMED_FLUSH_MS


def _default_direct_args() -> list[str]:
    return ["--runner=FnApiRunner", "--direct_running_mode=multi_threading",
            f"--direct_num_workers={os.cpu_count() or 1}"]


def pipeline_options(beam_options=None) -> PipelineOptions:
    """Beam ``PipelineOptions`` from ``None``, a list of Beam flags or ``PipelineOptions``.

    Defaults, for flags not given: ``--runner=FnApiRunner`` (Beam's local
    runner, the engine Python's DirectRunner runs batch pipelines on; naming
    it directly skips DirectRunner's attempt to download and start the Prism
    runner first), ``--direct_running_mode=multi_threading`` and
    ``--direct_num_workers`` = the number of cores. Raises
    :class:`PreprocessError` for arguments Beam does not know (Beam would
    drop a typo with a warning). Also turns off the local runner's lossy
    timed flush (:func:`_disable_timed_flush`).
    """
    _disable_timed_flush()
    if isinstance(beam_options, PipelineOptions):
        return beam_options
    args = list(beam_options or [])
    stray = [a for i, a in enumerate(args)
             if not a.startswith("-") and not (i and args[i - 1].startswith("--") and "=" not in args[i - 1])]
    given = {a.split("=", 1)[0].lstrip("-") for a in args if a.startswith("-")}
    for a in _default_direct_args():
        if a.split("=", 1)[0].lstrip("-") not in given:
            args.append(a)
    opts = PipelineOptions(args)
    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    beam_log.setLevel(logging.ERROR)  # we report unknown arguments ourselves, as an error
    try:
        unknown = sorted(set(opts.get_all_options(retain_unknown_options=True))
                         - set(opts.get_all_options()))
    finally:
        beam_log.setLevel(level)
    if stray or unknown:
        bad = stray + ["--" + u for u in unknown]
        raise PreprocessError(f"unknown arguments {bad}: neither preprocess flags nor Beam pipeline options")
    return opts


# --------------------------------------------------------------------------
# Running a pipeline
# --------------------------------------------------------------------------


def run_pipeline(p, errors: Sequence[type], failure: type, stopped: type = RuntimeError):
    """Runs the Beam pipeline ``p`` to the end; a worker's own error comes back as itself.

    Beam reports what a worker raised as a ``RuntimeError`` holding the worker's
    traceback: the project's errors (``errors``) are rebuilt from it
    (:func:`pipelines.validation.unwrap_beam_error`), anything else becomes a
    ``failure`` of one line (the whole error with ``QIN_TF_VERBOSE=1``). A run
    that ends in a state other than done raises ``stopped``.
    """
    try:
        with beam_worker_errors_unlogged():
            state = p.run().wait_until_finish()
    except Exception as e:  # noqa: BLE001  (Beam wraps a worker's error in a RuntimeError of its traceback)
        own = unwrap_beam_error(e, tuple(errors))
        if own is not None:
            raise own from None
        if os.environ.get("QIN_TF_VERBOSE"):
            raise
        raise failure(beam_failure(e)) from None
    if state is not None and str(state) not in ("DONE", "PipelineState.DONE"):
        raise stopped(f"the Beam pipeline ended in state {state}")
