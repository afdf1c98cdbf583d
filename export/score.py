r"""Batch scoring with an exported SavedModel: no model code, bounded memory.

    python -m export.score --saved_model=runs/sample/export \
        --input='data/microlens_sample/test.parquet' --output=runs/sample/test_scores.parquet

* ``--saved_model`` is a version directory written by ``export.exporter``, or
  the export base holding numbered versions (the newest is used). It is
  loaded with ``tf.saved_model.load`` alone; the feature spec comes from the
  export's own ``assets/feature_spec.json``.
* ``--input`` is a file or a glob of files, all parquet in the MMCTR layout
  (the raw logs: the same columns ``pipelines.preprocess`` reads) or all
  TFRecords written by the pipeline (``*.tfrecord.gz`` GZIP, ``*.tfrecord``
  uncompressed). Files are read in sorted order, ``--batch_size`` rows at a
  time (``pyarrow`` ``iter_batches`` for parquet, ``tf.data`` for TFRecords),
  so memory does not grow with the input, except for one label and one score
  per row kept for the AUC when the input is labelled.
* Parquet rows are turned into model inputs exactly as preprocessing does
  (:func:`export.readers.sequence_to_dense`): the behaviour sequence keeps its most recent
  ``max_len`` non-zero items, oldest first, left-padded with 0. TFRecords go
  through the export's ``predict_examples`` signature unchanged.
* ``--format``: ``parquet`` or ``csv`` write one row per input row with the
  columns ``row`` (0-based index over all inputs), the meta columns (e.g.
  ``user_id``) and the label when the input has them, and ``ctr``;
  ``challenge`` writes the MMCTR challenge's submission CSV, ``ID,Task2``
  with ``ID`` the row's 0-based index and ``Task2`` its score. The output is
  written to a temporary file beside ``--output`` (``.{name}.score-{pid}-*.tmp``)
  and renamed when complete: a failed run leaves nothing behind, and a run
  removes the temporary files of killed runs into the same output (those
  whose process is gone). The output follows the umask.
* ``--output`` follows :func:`qin_tf.fileio.check_output_path`, the rule
  ``export.client`` follows too, checked before any work: never one of the
  inputs, never inside the export being read (its base and versions), never
  a directory, a path under a file or a device; an existing regular file is
  replaced only with ``--overwrite`` (the rule of training's ``--model_dir``).
* ``--raw_ids``: the rows hold ids as the log had them (strings, or int64s,
  as the export's vocabularies say): parquet files with one column per
  model input (the history a list, oldest first, unpadded), or JSON lines
  (``*.jsonl``, ``*.json``, ``*.ndjson``: one object per line, one key per model input, as
  ``python -m export.client --raw_ids`` sends). They go through the export's
  ``serving_raw`` signature, which maps them to dense ids with the
  vocabularies inside the SavedModel (an unknown id is the OOV id 1) and pads
  or cuts the history by the spec's rule: a row's score is bit for bit the
  score of its dense ids. Ids of inputs with a vocabulary follow the raw-id
  rule (:data:`qin_tf.spec.RAW_ID_RULE`: 0 and ``""`` only as history
  padding), the others the dense :data:`qin_tf.spec.ID_RULE`. The label and
  the meta columns (keys) are carried when the input has them; a meta
  column holds one type (int64 or string) in every row, else the first row
  of the other type is refused.
* When the input has labels, the AUC (and log loss, and the gAUC over the
  first meta column) is printed, from :mod:`qin_tf.metrics`.

Bad input stops the run with an error naming the file, the row (0-based in
that file) and the column: a missing column, a null, a non-integer type, a
negative id, an id beyond int64, a malformed record; a corrupt parquet file
names the row group (``x.parquet: row group 3 (rows 3072..4095): corrupt
parquet (...)``), a corrupt TFRecord file the record, an export version that
cannot be loaded its directory. TensorFlow's own text reaches the user as one
plain line (:func:`qin_tf.cli.error_line`).

Inputs are read by :mod:`export.readers` and scores written by
:mod:`export.writers`, the modules ``export.client`` uses too.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from export.readers import (Batch, find_bad_record, input_files, iter_parquet, iter_raw, iter_tfrecord,
                            load_export)
from export.writers import FORMATS, ROW_COLUMN, SCORE_COLUMN, ScoreWriter, check_output
from qin_tf.rows import PreprocessError, fail, one_line
from qin_tf.signatures import EXAMPLES_INPUT, EXAMPLES_SIGNATURE, OUTPUT, RAW_SIGNATURE, SERVING_SIGNATURE
from qin_tf.spec import FeatureSpec

#: Rows per batch by default.
DEFAULT_BATCH_SIZE = 1024
CHALLENGE_COLUMNS = ("ID", "Task2")

#: Bad input: the same error type and messages as ``pipelines.preprocess``.
InputError = PreprocessError


def _output_columns(batch: Batch, scores: np.ndarray, row0: int, fmt: str,
                    label_name: str) -> dict[str, np.ndarray]:
    ids = np.arange(row0, row0 + scores.shape[0], dtype=np.int64)
    if fmt == "challenge":
        return {CHALLENGE_COLUMNS[0]: ids, CHALLENGE_COLUMNS[1]: scores}
    cols = {ROW_COLUMN: ids}
    cols.update(batch.meta)
    if batch.label is not None:
        cols[label_name] = batch.label
    cols[SCORE_COLUMN] = scores
    return cols


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------


class _Scorer:
    """The export's signatures and the batches of the inputs; :meth:`scores` of one batch."""

    def __init__(self, saved_model: str, files, kind: str, batch_size: int, raw_ids: bool):
        loaded, self.spec, self.version_dir = load_export(saved_model)
        self.serve_examples = loaded.signatures[EXAMPLES_SIGNATURE]
        if raw_ids:
            if RAW_SIGNATURE not in loaded.signatures:
                fail(self.version_dir, None, None, f"this export has no `{RAW_SIGNATURE}` signature (its feature "
                                                   "spec has no vocabularies); score dense ids without --raw_ids")
            self.serve = loaded.signatures[RAW_SIGNATURE]
            self.batches = iter_raw(files, kind, self.spec, batch_size)
        else:
            self.serve = loaded.signatures[SERVING_SIGNATURE]
            self.batches = (iter_parquet(files, self.spec, batch_size) if kind == "parquet"
                            else iter_tfrecord(files, self.spec, batch_size))

    def scores(self, batch: Batch) -> np.ndarray:
        """float32 ``[rows]`` of one batch; a row the model refuses stops the run, naming it."""
        import tensorflow as tf

        from qin_tf.cli import error_line

        if batch.examples is not None:
            try:
                out = self.serve_examples(**{EXAMPLES_INPUT: batch.examples})[OUTPUT]
            except tf.errors.InvalidArgumentError:
                bad = find_bad_record(batch.examples.numpy(), _model_parse_spec(self.spec))
                if bad is None:
                    raise
                fail(batch.source, batch.first_row + bad[0], None, bad[1])
        else:
            try:
                out = self.serve(**{k: tf.constant(v) for k, v in batch.features.items()})[OUTPUT]
            except (tf.errors.OpError, TypeError, ValueError) as e:  # the graph's own checks
                last = batch.first_row + batch.num_rows - 1
                fail(batch.source, None, None, f"rows {batch.first_row}..{last}: the model refused "
                                               f"them: {error_line(e)}")
        return out.numpy().astype(np.float32).reshape(-1)


class _Tally:
    """What a run keeps: every score, and the labels (and groups) when the input is labelled."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self.scores, self.labels, self.groups = [], [], []
        self.labelled = None
        self.group_name = spec.meta[0] if spec.meta else None
        self.num_rows = 0

    def add(self, batch: Batch, scores: np.ndarray) -> None:
        if self.labelled is None:
            self.labelled = batch.label is not None
        elif self.labelled != (batch.label is not None):
            fail(batch.source, None, self.spec.label, "this input lacks the label column that the "
                                                      "inputs before it have (or the other way round)")
        if self.labelled:
            self.labels.append(batch.label)
            if self.group_name is not None and self.group_name in batch.meta:
                self.groups.append(batch.meta[self.group_name])
        self.scores.append(scores)
        self.num_rows += scores.shape[0]

    def result(self, version_dir: str, log) -> dict:
        """``{"num_rows", "saved_model", "scores"}``, plus the metrics for labelled input."""
        from qin_tf import metrics

        result = {"num_rows": self.num_rows, "saved_model": version_dir, "scores": np.concatenate(self.scores)}
        if self.labelled:
            y = np.concatenate(self.labels)
            g = np.concatenate(self.groups) if self.groups and len(self.groups) == len(self.labels) else None
            try:
                result.update(metrics.evaluate(y, result["scores"], g))
            except ValueError as e:  # e.g. one class only: AUC undefined; the scores stand
                log(f"no metrics: {e}")
        return result


def _score_all(scorer: _Scorer, tally: _Tally, writer: ScoreWriter | None, input_pattern: str, fmt: str,
               progress_every_s: float, log) -> None:
    """Scores every batch into ``tally`` and ``writer``, a progress line every ``progress_every_s``."""
    start = last_log = time.monotonic()
    for batch in scorer.batches:
        scores = scorer.scores(batch)
        row0 = tally.num_rows
        tally.add(batch, scores)
        if writer is not None:
            writer.write(_output_columns(batch, scores, row0, fmt, scorer.spec.label))
        now = time.monotonic()
        if now - last_log >= progress_every_s:
            log(f"scored {tally.num_rows:,} rows ({tally.num_rows / (now - start):,.0f} rows/s), "
                f"at {batch.source}")
            last_log = now
    if tally.num_rows == 0:
        fail(input_pattern, None, None, "no rows to score")


def score(saved_model: str, input_pattern: str, output: str | None = None, *, fmt: str = "parquet",
          batch_size: int = DEFAULT_BATCH_SIZE, progress_every_s: float = 10.0,
          log=None, overwrite: bool = False, raw_ids: bool = False) -> dict:
    """Scores every row of ``input_pattern`` with the SavedModel; see the module docstring.

    Args:
        saved_model: a version directory or an export base.
        input_pattern: a parquet or TFRecord file, or a glob of them.
        output: where to write the scores (``fmt``); ``None`` writes nothing.
        fmt: ``"parquet"``, ``"csv"`` or ``"challenge"``.
        batch_size: rows per batch.
        progress_every_s: seconds between progress lines on ``log``.
        log: a callable taking one line; default: print to stderr.
        overwrite: replace an existing ``output`` (never one of the inputs).
        raw_ids: the input holds raw ids (parquet or JSON lines), scored
            through the export's ``serving_raw`` signature.

    Returns:
        ``{"num_rows", "saved_model", "scores"}`` plus, for labelled input, the
        metrics of :func:`qin_tf.metrics.evaluate` (``auc``, ``logloss``, ...).
        ``scores`` is the float32 array of all scores.
    """
    if fmt not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}. Received: format={fmt!r}")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={batch_size}")
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    files, kind = input_files(input_pattern, raw_ids)
    if output:
        check_output(output, files, overwrite=overwrite, saved_model=saved_model)
    scorer = _Scorer(saved_model, files, kind, batch_size, raw_ids)
    writer = ScoreWriter(output, fmt) if output else None
    tally = _Tally(scorer.spec)
    start = time.monotonic()
    try:
        _score_all(scorer, tally, writer, input_pattern, fmt, progress_every_s, log)
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    n, elapsed = tally.num_rows, time.monotonic() - start
    log(f"scored {n:,} rows in {elapsed:.2f} s ({n / elapsed:,.0f} rows/s) with {scorer.version_dir}")
    return tally.result(scorer.version_dir, log)


def _model_parse_spec(spec: FeatureSpec) -> dict:
    from qin_tf.data import example_parse_spec

    return example_parse_spec(spec, labelled=False, with_meta=False)


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv):
    del argv
    import tensorflow as tf
    from absl import flags

    from qin_tf.cli import exit_error

    FLAGS = flags.FLAGS
    try:
        result = score(FLAGS.saved_model, FLAGS.input, FLAGS.output, fmt=FLAGS.format,
                       batch_size=FLAGS.batch_size, overwrite=FLAGS.overwrite, raw_ids=FLAGS.raw_ids)
    except (InputError, FileNotFoundError) as e:
        exit_error("score", one_line(e))
    except tf.errors.OpError as e:  # a TensorFlow filesystem's error (gs://: permission, network)
        exit_error("score", e)
    summary = {k: v for k, v in result.items() if k != "scores"}
    if FLAGS.output:
        summary["output"] = FLAGS.output
    if "auc" in result:
        print(f"AUC {result['auc']:.4f}  logloss {result['logloss']:.4f}"
              + (f"  gAUC {result['gauc']:.4f}" if "gauc" in result else "")
              + f"  ({result['num_examples']:,} rows)")
    print(json.dumps(summary, sort_keys=True))


def _define_flags():
    from absl import flags

    flags.DEFINE_string("saved_model", None, "Version directory written by export.exporter, or the "
                        "export base (newest version).", required=True)
    flags.DEFINE_string("input", None, "Parquet (MMCTR layout) or TFRecord file, or a glob.", required=True)
    flags.DEFINE_string("output", None, "Where to write the scores; none: only metrics are printed.")
    flags.DEFINE_enum("format", "parquet", FORMATS, "Output format: parquet or csv (one row per input row), or "
                      "challenge (the MMCTR submission CSV with the columns ID,Task2).")
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Rows per batch.", lower_bound=1)
    flags.DEFINE_boolean("raw_ids", False, "The input (parquet or JSON lines) holds ids as the log had them; "
                         "score it through the export's serving_raw signature.")
    flags.DEFINE_boolean("overwrite", False, "Replace an existing --output (never one of the inputs).")


if __name__ == "__main__":
    from qin_tf.runtime import run_app

    _define_flags()
    run_app(main, tensorflow=True)
