r"""The gate before serving: a candidate export is compared with the version in service on the same new rows.

    python -m export.validate --candidate=runs/day2/export --serving=/srv/models/qin \
        --data=runs/day2/data --split=valid [--auc_tolerance=0.002] [--max_logloss_increase=0.01] \
        [--max_calibration_error=0.1] [--min_auc=0.6] [--push]

(TFX's Evaluator blessing, then its Pusher.)

* ``--candidate`` is a version directory written by ``export.exporter`` (or
  ``export.refresh_catalog``), or an export base (its newest version).
* ``--serving`` is the TF Serving model base path. The baseline is its newest
  servable version (TF Serving's default policy,
  :func:`export.exporter.latest_version_dir`). The directory must exist: an
  empty one is the first day (no baseline), a missing one is a wrong path.
* ``--data`` is the rows both are scored on: a preprocessed data directory
  (its ``feature_spec.json``; ``--split`` names the split, default
  ``valid``), or a file or glob of TFRecords or parquet files as
  ``python -m export.score --input`` reads them. The rows must be labelled.

Both versions score every row through their own ``predict_examples`` (or
``serving_default`` for parquet) signature, read by :mod:`export.readers`'
readers; the metrics are :func:`qin_tf.metrics.evaluate`'s (exact AUC,
log loss) plus the calibration, mean prediction / positive rate (1 is
calibrated).

**The decision.** The candidate is *blessed* when its AUC is at least the
baseline's AUC minus ``--auc_tolerance`` (default 0.002) and every other
threshold the user set holds: ``--max_logloss_increase`` (candidate log loss
at most the baseline's plus this), ``--max_calibration_error`` (``|calibration
- 1|`` of the candidate at most this), ``--min_auc`` (the candidate's AUC at
least this). On the first day (an empty serving base) only the absolute
thresholds (``--min_auc``, ``--max_calibration_error``) apply, and the record
says ``"first_version": true``.

**The record.** The decision, the thresholds, both versions' paths, versions,
fingerprints and metrics, and the rows go to ``<version>.validation.json``
beside the candidate's version directory (``CANDIDATE_BASE/3.validation.json``
for ``CANDIDATE_BASE/3``), blessed or not. TF Serving, and
:func:`export.exporter.list_versions`, only take directories named by a
number, so the file is never mistaken for a version. The *fingerprint* is a
SHA-256 over every file of the version directory (relative path and bytes):
:mod:`export.push` pushes only the bytes that were blessed.

**Refusals** are one line on stderr and exit code 1, the serving base
untouched, the record still written::

    validate: refused: AUC 0.6012 < serving 0.6770 - 0.002 (version 3 in /srv/models/qin)

Exports of different feature specs (other feature names, roles, ``max_len``,
label, vocabularies; an item table or context vocabulary that is *smaller*
than the serving version's) are not compared: one line says what differs.
Larger vocabularies are fine: ids are appended, never renumbered, so a row
means the same to both. Bad input (missing or empty rows, unlabelled rows, an
unreadable export, a wrong path) is one line ``validate: error: ...``, exit
code 1, nothing written.

The metrics of both versions are printed on stdout, then one JSON line:
``blessed``, the candidate, its record, and where it was pushed.
``--push`` copies a blessed candidate into the serving base as the next
version (:func:`export.push.push`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import sys
from typing import Sequence

import numpy as np

from export import readers
from export.exporter import ExportError, latest_version_dir, servable_versions
from qin_tf import fileio
from qin_tf.cli import error_line, exit_error
from qin_tf.rows import PreprocessError, fail, one_line
from qin_tf.signatures import EXAMPLES_INPUT, EXAMPLES_SIGNATURE, OUTPUT, SERVING_SIGNATURE, SPEC_ASSET_PATH
from qin_tf.spec import ID_RULE, SPEC_FILENAME, FeatureSpec, SpecError

#: The default ``--auc_tolerance``: see README, "A gate before serving".
DEFAULT_AUC_TOLERANCE = 0.002
#: Suffix of the decision record beside a version directory.
RECORD_SUFFIX = ".validation.json"
DEFAULT_SPLIT = "valid"
DEFAULT_BATCH_SIZE = 1024


class Refused(ExportError):
    """The candidate is not blessed; the message names each failed threshold and both values."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


# --------------------------------------------------------------------------
# Versions, records, fingerprints
# --------------------------------------------------------------------------


def record_path(version_dir: str) -> str:
    """``BASE/<v>.validation.json`` for the version directory ``BASE/<v>``."""
    version_dir = version_dir.rstrip("/")
    return os.path.join(os.path.dirname(version_dir), os.path.basename(version_dir) + RECORD_SUFFIX)


def version_number(version_dir: str) -> int | None:
    name = os.path.basename(version_dir.rstrip("/"))
    return int(name) if name.isdigit() else None


def version_files(version_dir: str) -> list[tuple[str, str]]:
    """``(relative path, path)`` of every file under ``version_dir``, sorted by relative path.

    On a URL, only paths that exist as files are kept: TensorFlow's ``ram://``
    lists ``1/assets.extra/x`` under ``1/assets`` too (as ``.extra/x``, a
    prefix match), a file that is not there.
    """
    g = fileio.gfile()
    local = fileio.is_local(version_dir)
    files = []
    for directory, _, names in g.walk(version_dir):
        rel = os.path.relpath(directory, version_dir) if local else directory[len(version_dir.rstrip("/")):].strip("/")
        for n in names:
            path = os.path.join(directory, n)
            if local or (g.exists(path) and not g.isdir(path)):
                files.append((os.path.normpath(os.path.join(rel, n)), path))
    return sorted(set(files))


def copy_version(src: str, dst: str, *, last: Sequence[str] = ("saved_model.pb",)) -> None:
    """Copies the files of the version directory ``src`` into ``dst`` (any filesystems), ``last`` ones last."""
    g = fileio.gfile()
    files = version_files(src)
    for rel, path in sorted(files, key=lambda f: f[0] in last):
        target = os.path.join(dst, rel)
        g.makedirs(os.path.dirname(target))
        g.copy(path, target, overwrite=False)


def fingerprint(version_dir: str) -> str:
    """``sha256:<hex>`` over every file under ``version_dir``: its relative path and its bytes, in sorted order."""
    files = version_files(version_dir)
    if not files:
        raise ExportError(f"{version_dir}: no files; not a SavedModel version directory.")
    h = hashlib.sha256()
    for rel, path in files:
        h.update(rel.encode("utf-8") + b"\0")
        h.update(hashlib.sha256(fileio.read_bytes(path)).digest())
    return "sha256:" + h.hexdigest()


def resolve_version(path: str, what: str) -> str:
    """``path`` if it holds ``saved_model.pb``, else the newest servable version of the export base ``path``."""
    g = fileio.gfile()
    if g.exists(os.path.join(path, "saved_model.pb")):
        return path.rstrip("/")
    if not g.isdir(path):
        raise ExportError(f"{path}: no such directory; {what} is an export base or one of its version directories.")
    return latest_version_dir(path)


def load_version_spec(version_dir: str) -> FeatureSpec:
    path = os.path.join(version_dir, SPEC_ASSET_PATH)
    if not fileio.gfile().exists(path):
        raise ExportError(f"{version_dir}: no {SPEC_ASSET_PATH}; not a version written by export.exporter.")
    return FeatureSpec.load(path)


# --------------------------------------------------------------------------
# Feature specs
# --------------------------------------------------------------------------


def spec_differences(candidate: FeatureSpec, serving: FeatureSpec) -> list[str]:
    """What keeps two exports from being compared on the same rows; ``[]`` when nothing does.

    The signature must be the same (feature names, roles, dtypes, ``max_len``,
    label, the vocabularies' keys, dtypes and OOV ids). Sizes may grow in the
    candidate (ids are appended, never renumbered), not shrink.
    """
    out = []

    def same(name, a, b):
        if a != b:
            out.append(f"{name}: candidate {a!r}, serving {b!r}")

    same("label", candidate.label, serving.label)
    same("target item", candidate.target_item, serving.target_item)
    same("sequence", candidate.sequence, serving.sequence)
    same("context features", list(candidate.context), list(serving.context))
    same("max_len", candidate.max_len, serving.max_len)
    same("tags per item", candidate.num_tags, serving.num_tags)
    same("multimodal width", candidate.mm_dim, serving.mm_dim)
    same("vocabularies", sorted(candidate.vocabularies), sorted(serving.vocabularies))
    for key in sorted(set(candidate.vocabularies) & set(serving.vocabularies)):
        a, b = candidate.vocabularies[key], serving.vocabularies[key]
        for field in ("dtype", "oov_id"):
            same(f"vocabulary `{key}` {field}", a.get(field), b.get(field))
        if int(a.get("size", 0)) < int(b.get("size", 0)):
            out.append(f"vocabulary `{key}` size: candidate {a.get('size')} < serving {b.get('size')}")
    if candidate.num_items < serving.num_items:
        out.append(f"item table: candidate {candidate.num_items} items < serving {serving.num_items}")
    if candidate.context == serving.context:
        for name, a, b in zip(candidate.context, candidate.context_vocab_sizes, serving.context_vocab_sizes):
            if a < b:
                out.append(f"context `{name}` vocabulary: candidate {a} < serving {b}")
    return out


def _check_same_signature(data: FeatureSpec, version: FeatureSpec, data_where: str, version_where: str) -> None:
    a = [(f.name, f.role, f.dtype, f.shape) for f in data.model_features]
    b = [(f.name, f.role, f.dtype, f.shape) for f in version.model_features]
    if a != b or data.label != version.label:
        diff = "; ".join(spec_differences(version, data)[:3]) or "model features"
        raise SpecError(f"{data_where}: the rows' feature spec differs from {version_where}'s ({diff}).")


# --------------------------------------------------------------------------
# Rows and scores
# --------------------------------------------------------------------------


def data_files(data: str, split: str) -> tuple[list[str], str, str | None]:
    """``(files, kind, split)`` of ``--data``: a preprocessed data directory's split, or a file / glob."""
    g = fileio.gfile()
    if g.isdir(data):
        if not g.exists(os.path.join(data, SPEC_FILENAME)):
            fail(data, None, None, f"a directory without {SPEC_FILENAME}; pass a preprocessed data "
                                   "directory, or a file or glob of TFRecords or parquet files")
        spec = FeatureSpec.load(data)
        files = spec.split_files(split)
        if not spec.splits[split].labelled:
            fail(data, None, None, f"split `{split}` has no labels; the gate needs labelled rows")
        missing = [f for f in files if not g.exists(f)]
        if not files or missing:
            fail(missing[0] if missing else data, None, None, f"no such file (split `{split}` of {data})")
        return files, "tfrecord", split
    files, kind = readers.input_files(data)
    return files, kind, None


def score_version(version_dir: str, files: Sequence[str], kind: str,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, scores)`` of every row of ``files`` under the export ``version_dir``, in file order.

    The readers are :mod:`export.readers`' (``iter_tfrecord`` through the
    export's ``predict_examples``, ``iter_parquet`` through ``serving_default``).
    """
    import tensorflow as tf

    try:
        loaded, spec, _ = readers.load_export(version_dir)
    except (SpecError, FileNotFoundError):
        raise
    except Exception as e:  # the loader's errors are of many types (DecodeError, OpError, ValueError, ...)
        text = error_line(e) if isinstance(e, tf.errors.OpError) else one_line(e)
        raise ExportError(f"{version_dir}: not a loadable SavedModel ({type(e).__name__}: {text})") from None
    batches = (readers.iter_tfrecord(files, spec, batch_size) if kind == "tfrecord"
               else readers.iter_parquet(files, spec, batch_size))
    labels, scores = [], []
    for batch in batches:
        if batch.label is None:
            fail(batch.source, None, spec.label, "the rows have no labels; the gate needs labelled rows")
        try:
            if batch.examples is not None:
                out = loaded.signatures[EXAMPLES_SIGNATURE](**{EXAMPLES_INPUT: batch.examples})[OUTPUT]
            else:
                out = loaded.signatures[SERVING_SIGNATURE](
                    **{k: tf.constant(v) for k, v in batch.features.items()})[OUTPUT]
        except tf.errors.InvalidArgumentError as e:
            bad = _bad_row(batch, spec)
            if bad is not None:
                fail(batch.source, batch.first_row + bad[0], bad[1], bad[2])
            fail(batch.source, None, None, f"rows {batch.first_row}..{batch.first_row + batch.num_rows - 1}: "
                                           f"{version_dir} cannot score them: {error_line(e)}")
        labels.append(np.asarray(batch.label))
        scores.append(out.numpy().astype(np.float32).reshape(-1))
    if not scores:
        fail(files[0] if len(files) == 1 else ", ".join(files), None, None, "no rows")
    return np.concatenate(labels), np.concatenate(scores)


def _bad_row(batch, spec: FeatureSpec) -> tuple[int, str | None, str] | None:
    """``(row in the batch, column, reason)`` of the first row an export refuses: a record that does not parse,
    or a negative id (the spec's id rule, which the export asserts); None if none is found."""
    import tensorflow as tf

    from qin_tf.data import example_parse_spec

    if batch.examples is None:
        rows = [{n: v[i:i + 1] for n, v in batch.features.items()} for i in range(batch.num_rows)]
    else:
        parse, rows = example_parse_spec(spec, labelled=False, with_meta=False), []
        for i, s in enumerate(batch.examples.numpy()):
            try:
                rows.append({n: v.numpy() for n, v in tf.io.parse_example(tf.constant([s]), parse).items()})
            except tf.errors.InvalidArgumentError as e:
                return i, None, error_line(e)
    for i, row in enumerate(rows):
        for name in spec.model_feature_names:
            values = np.asarray(row[name]).reshape(-1)
            if (values < 0).any():
                return i, name, f"negative id {int(values[values < 0][0])}; {ID_RULE}"
    return None


def version_metrics(labels: np.ndarray, scores: np.ndarray) -> dict:
    """:func:`qin_tf.metrics.evaluate` plus ``calibration`` (mean prediction / positive rate)."""
    from qin_tf import metrics

    try:
        m = metrics.evaluate(labels, scores)
    except ValueError as e:  # one class only: AUC undefined
        raise ExportError(f"the rows cannot judge a model: {e}") from None
    m["calibration"] = m["mean_prediction"] / m["positive_rate"] if m["positive_rate"] > 0 else math.inf
    return m


# --------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------


def decide(candidate: dict, baseline: dict | None, *, auc_tolerance: float = DEFAULT_AUC_TOLERANCE,
           max_logloss_increase: float | None = None, max_calibration_error: float | None = None,
           min_auc: float | None = None, where: str = "") -> list[str]:
    """The failed thresholds, one phrase each naming the metric and both values; ``[]``: blessed.

    ``baseline`` None (no serving version) applies the absolute thresholds only.
    """
    out = []
    at = f" ({where})" if where else ""
    if baseline is not None:
        if candidate["auc"] < baseline["auc"] - auc_tolerance:
            out.append(f"AUC {candidate['auc']:.4f} < serving {baseline['auc']:.4f} - {auc_tolerance:g}{at}")
        if max_logloss_increase is not None and candidate["logloss"] > baseline["logloss"] + max_logloss_increase:
            out.append(f"logloss {candidate['logloss']:.4f} > serving {baseline['logloss']:.4f} + "
                       f"{max_logloss_increase:g}{at}")
    if min_auc is not None and candidate["auc"] < min_auc:
        out.append(f"AUC {candidate['auc']:.4f} < --min_auc {min_auc:g}")
    if max_calibration_error is not None and not abs(candidate["calibration"] - 1.0) <= max_calibration_error:
        out.append(f"calibration {candidate['calibration']:.4f} (mean prediction {candidate['mean_prediction']:.4f} / "
                   f"positive rate {candidate['positive_rate']:.4f}) is off by more than {max_calibration_error:g}")
    return out


def _check_thresholds(auc_tolerance, max_logloss_increase, max_calibration_error, min_auc) -> None:
    for name, value in (("auc_tolerance", auc_tolerance), ("max_logloss_increase", max_logloss_increase),
                        ("max_calibration_error", max_calibration_error)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ExportError(f"`{name}` must be a finite number >= 0. Received: {name}={value}")
    if min_auc is not None and not 0 <= min_auc <= 1:
        raise ExportError(f"`min_auc` must be in [0, 1]. Received: min_auc={min_auc}")


def utc_now() -> str:
    """The time now, UTC, ISO 8601 to the second (the records' ``time``)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _versions_to_compare(candidate: str, serving: str) -> tuple[str, list[int], str | None, FeatureSpec]:
    """``(candidate version dir, serving versions, newest serving version dir or None, candidate spec)``.

    Raises:
        ExportError: the candidate is no numbered version, or one of ``serving`` itself; no ``serving`` base.
        SpecError: the two versions' feature specs differ.
    """
    g = fileio.gfile()
    cand_dir = resolve_version(candidate, "--candidate")
    if version_number(cand_dir) is None:
        raise ExportError(f"{cand_dir}: a version directory is named by its number (BASE/3); "
                          "the blessing is recorded beside it as BASE/3.validation.json.")
    if not g.isdir(serving):
        raise ExportError(f"{serving}: no such directory; --serving is the TF Serving model base path "
                          "(create it empty for the first version).")
    versions = servable_versions(serving)
    base_dir = os.path.join(serving, str(versions[-1])) if versions else None
    if fileio.absolute(os.path.dirname(cand_dir)).rstrip("/") == fileio.absolute(serving).rstrip("/"):
        raise ExportError(f"{cand_dir}: the candidate is a version of the serving base itself; validate the "
                          "export it came from (to serve an older version again, use export.rollback).")
    cand_spec = load_version_spec(cand_dir)
    base_spec = load_version_spec(base_dir) if base_dir else None
    if base_spec is not None:
        diff = spec_differences(cand_spec, base_spec)
        if diff:
            raise SpecError(f"the candidate ({cand_dir}) and the serving version ({base_dir}) have different "
                            f"feature specs: {'; '.join(diff)}")
    return cand_dir, versions, base_dir, cand_spec


def validate(candidate: str, serving: str, data: str, *, split: str = DEFAULT_SPLIT,
             auc_tolerance: float = DEFAULT_AUC_TOLERANCE, max_logloss_increase: float | None = None,
             max_calibration_error: float | None = None, min_auc: float | None = None,
             batch_size: int = DEFAULT_BATCH_SIZE, log=None) -> dict:
    """Scores the candidate and the serving version on ``data``, decides, writes the record; see the module docstring.

    ``log`` (a callable taking one line; default: stderr) gets each version's metrics.

    Returns:
        The record written to :func:`record_path` of the candidate (``"blessed"`` true).

    Raises:
        Refused: the candidate is not blessed (the record, written, is ``e.record``).
        ExportError, SpecError, PreprocessError, FileNotFoundError: bad input; nothing written.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    _check_thresholds(auc_tolerance, max_logloss_increase, max_calibration_error, min_auc)
    cand_dir, versions, base_dir, cand_spec = _versions_to_compare(candidate, serving)
    files, kind, used_split = data_files(data, split)
    if used_split is not None:
        _check_same_signature(FeatureSpec.load(data), cand_spec, data, cand_dir)
    # the bytes about to be scored: push checks that they are the bytes it copies
    cand_fingerprint = fingerprint(cand_dir)
    base_fingerprint = fingerprint(base_dir) if base_dir else None

    labels, cand_scores = score_version(cand_dir, files, kind, batch_size)
    cand = version_metrics(labels, cand_scores)
    log(f"candidate {cand_dir}: AUC {cand['auc']:.4f}, logloss {cand['logloss']:.4f}, "
        f"calibration {cand['calibration']:.4f} on {cand['num_examples']:,} rows")
    base = None
    if base_dir is not None:
        base_labels, base_scores = score_version(base_dir, files, kind, batch_size)
        if not np.array_equal(base_labels, labels):
            raise ExportError(f"{data}: the rows read differently for the two versions; score them again.")
        base = version_metrics(base_labels, base_scores)
        log(f"serving {base_dir}: AUC {base['auc']:.4f}, logloss {base['logloss']:.4f}, "
            f"calibration {base['calibration']:.4f}")
    where = f"version {versions[-1]} in {serving}" if versions else ""
    failed = decide(cand, base, auc_tolerance=auc_tolerance, max_logloss_increase=max_logloss_increase,
                    max_calibration_error=max_calibration_error, min_auc=min_auc, where=where)
    record = {
        "blessed": not failed,
        "decision": "blessed" if not failed else "refused",
        "reasons": failed,
        "first_version": base_dir is None,
        "time": utc_now(),
        "thresholds": {"auc_tolerance": auc_tolerance, "max_logloss_increase": max_logloss_increase,
                       "max_calibration_error": max_calibration_error, "min_auc": min_auc},
        "candidate": {"path": fileio.absolute(cand_dir), "version": version_number(cand_dir),
                      "fingerprint": cand_fingerprint, "metrics": cand},
        "serving": {"model_base_path": fileio.absolute(serving),
                    "path": fileio.absolute(base_dir) if base_dir else None,
                    "version": versions[-1] if versions else None,
                    "fingerprint": base_fingerprint,
                    "metrics": base},
        "data": {"input": data, "split": used_split, "files": list(files), "num_rows": int(labels.size)},
        "pushed": None,
    }
    fileio.write_json(record_path(cand_dir), _json_safe(record))
    if failed:
        raise Refused("; ".join(failed), record)
    return record


def _json_safe(obj):
    """inf / NaN (a calibration without positives) as strings: the record stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def read_record(version_dir: str) -> dict:
    """The decision record beside ``version_dir``; ExportError when there is none or it is not JSON."""
    path = record_path(version_dir)
    try:
        record = fileio.read_json(path)
    except FileNotFoundError:
        raise ExportError(f"{path}: no validation record; run `python -m export.validate` on "
                          f"{version_dir} first.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not a validation record ({one_line(e)}).") from None
    if not isinstance(record, dict):
        raise ExportError(f"{path}: not a validation record.")
    return record


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv):
    del argv
    import tensorflow as tf
    from absl import flags

    FLAGS = flags.FLAGS
    try:
        record = validate(FLAGS.candidate, FLAGS.serving, FLAGS.data, split=FLAGS.split,
                          auc_tolerance=FLAGS.auc_tolerance, max_logloss_increase=FLAGS.max_logloss_increase,
                          max_calibration_error=FLAGS.max_calibration_error, min_auc=FLAGS.min_auc,
                          batch_size=FLAGS.batch_size, log=lambda line: print(line, flush=True))
        if FLAGS.push:
            from export.push import push

            record = push(record["candidate"]["path"], FLAGS.serving)
    except Refused as e:
        sys.exit(f"validate: refused: {e}")
    except (ExportError, SpecError, PreprocessError, FileNotFoundError, OSError) as e:
        exit_error("validate", one_line(e))
    except tf.errors.OpError as e:  # a TensorFlow filesystem's error (gs://: permission, network)
        exit_error("validate", e)
    print(json.dumps({"blessed": record["blessed"], "candidate": record["candidate"]["path"],
                      "record": record_path(record["candidate"]["path"]), "pushed": record["pushed"]},
                     sort_keys=True))


def _define_flags():
    from absl import flags

    flags.DEFINE_string("candidate", None, "The candidate: a version directory, or an export base (its newest "
                        "version).", required=True)
    flags.DEFINE_string("serving", None, "The TF Serving model base path; its newest servable version is the "
                        "baseline (empty: the first version).", required=True)
    flags.DEFINE_string("data", None, "The rows: a preprocessed data directory (with --split), or a file or glob "
                        "of TFRecords or parquet files.", required=True)
    flags.DEFINE_string("split", DEFAULT_SPLIT, "The split of a --data directory.")
    flags.DEFINE_float("auc_tolerance", DEFAULT_AUC_TOLERANCE, "Blessed only if AUC >= serving AUC - this.",
                       lower_bound=0.0)
    flags.DEFINE_float("max_logloss_increase", None, "Blessed only if logloss <= serving logloss + this.",
                       lower_bound=0.0)
    flags.DEFINE_float("max_calibration_error", None, "Blessed only if |mean prediction / positive rate - 1| "
                       "<= this.", lower_bound=0.0)
    flags.DEFINE_float("min_auc", None, "Blessed only if AUC >= this (also on the first day).",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Rows per batch.", lower_bound=1)
    flags.DEFINE_boolean("push", False, "Push a blessed candidate into --serving as the next version.")


if __name__ == "__main__":
    from qin_tf.runtime import run_app

    _define_flags()
    run_app(main, tensorflow=True)
