"""Raw logs (parquet, MMCTR layout) -> GZIP TFRecords, item table and feature spec, with Apache Beam.

    python -m pipelines.preprocess --input_dir=../shared/data/microlens50k_mmctr \\
        --output_dir=/tmp/ml50k [--dataset_config=microlens50k|mmctr_challenge|PATH.json] \\
        [--max_len=64] [--num_shards=N] [--on_bad_row=fail|quarantine] \\
        [Beam options, e.g. --runner=DataflowRunner --project=... --setup_file=./setup.py]

Reads the split files named by the dataset configuration (a split with
``labelled: false`` has no label column, as the challenge's test set) and the
item table, and writes into ``output_dir``:

* ``{split}-{i:05d}-of-{n:05d}.tfrecord.gz``: one GZIP ``tf.train.Example`` a
  row with the features ``spec.example_features(labelled)``, all Int64Lists:
  label, meta, target item, the history (the most recent ``max_len`` non-zero
  items, oldest first, left-padded with 0; zeros in the input are padding and
  dropped first) and the context ids. Shard ``i`` holds a contiguous range of
  the file's rows, in file order, so the rows of a split read back in order.
* ``item_table.npz``: ``tags`` int32 ``[num_items, num_tags]`` and
  ``embedding`` float32 ``[num_items, mm_dim]``, row ``i`` = item ``i``, row 0
  = padding (zeros). See :mod:`pipelines.validation` for the table's rules.
* ``feature_spec.json`` (:class:`qin_tf.spec.FeatureSpec`): a context
  vocabulary size is ``1 +`` the largest value seen at least ``min_count``
  times in the good rows of the ``train`` split (of all splits if none is
  called ``train``), at most ``max_size`` (the dataset config's
  ``context_vocab``, :class:`qin_tf.spec.ContextVocabConfig`); other values
  use the model's OOV row. ``tag_vocab_size = max tag + 1``.
* ``stats.json``: rows in/out/quarantined (with reasons) per split, positive
  rate, history length histogram (before truncation), truncated histories,
  vocabulary sizes, each context vocabulary's bound with the train values it
  sent to the OOV row (``context_vocab``: counts and the most frequent
  values), and context rows and values beyond the vocabulary per split.
* ``quarantine/{split}.jsonl`` (``--on_bad_row=quarantine`` and only for splits
  with rejected rows): one JSON object per rejected row with ``file``, ``row``
  (0-based index in the file), ``column``, ``reason``, ``message`` and the
  row's original ``values``.
* ``preprocess_manifest.json``: the names of the entries above, the ones this
  run wrote (and the host and process that wrote them).

Bad input (see :mod:`pipelines.validation`) stops the run with a one-line
error naming file, row and column; schema-level problems, and a corrupt
parquet file (named with its row group), stop it whatever ``--on_bad_row``
says. Nothing is half written: everything goes to a sibling directory
``{output_dir}.tmp-*`` (marked by its manifest) that replaces the output only
when the whole run succeeded and is removed on failure; a run first removes
the marked ``.tmp-*`` (and ``.old-*``) siblings that killed runs into the same
``output_dir`` left (not those of a run still going on this host).

An existing ``output_dir`` must be empty or an earlier output (it holds a
``preprocess_manifest.json``, or, from versions before manifests, a
``feature_spec.json``, whose files are then the spec's shards, item table,
stats and quarantine). A rerun replaces exactly the entries the earlier run
wrote (never appends) and keeps everything else (a model directory, notes);
it refuses any other non-empty directory, and a kept entry that has the name
of a file it would write.
A symbolic link as ``output_dir`` is followed: its target's contents are
replaced, and the link stays.

How it runs: the plan (in the launching process) cuts every split file into
``num_shards`` contiguous row ranges, aligned to parquet row groups where the
file has enough of them. The Beam pipeline is ``Create(work items) |
Reshuffle | ParDo(ConvertShard)``: each work item reads its range in Arrow
batches, checks and converts a batch at a time with numpy
(:func:`qin_tf.rows.convert_batch`), encodes the Examples of the whole
batch at once (:mod:`pipelines.example_codec`) and streams them into its own
gzip shard. Only work items and file names travel through Beam, so the
runner's per-element overhead does not matter; files are opened through
``apache_beam.io.filesystems.FileSystems``, so the same code runs on Dataflow,
Flink or Spark with shared storage (give workers the code with
``--setup_file``). By default it runs locally on Beam's FnApiRunner (the
engine of Python's DirectRunner), one thread per core; see
:func:`pipelines.beamio.pipeline_options`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import time
import uuid
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import beamio
from pipelines.beamio import beam  # imported quietly
from pipelines.commit import (Ledger, read_manifest, remove_stale_siblings, resolve_output_dir, swap_commit,
                              write_manifest)
from pipelines.example_codec import DEFAULT_GZIP_LEVEL, GzipTFRecordWriter, encode_tfrecords
from pipelines.validation import item_table_columns, read_item_table
from qin_tf.cli import exit_error
from qin_tf.rows import (CORRUPT, Columns, PreprocessError, check_columns, convert_batch, fail, iter_row_groups,
                         one_line, split_columns)
from qin_tf.spec import (OOV_ID, RAW_ID_RULE, VOCAB_DIR, ITEM_TABLE_EMBEDDING_KEY, ITEM_TABLE_FILENAME,
                         ITEM_TABLE_TAGS_KEY, SPEC_FILENAME, STATS_FILENAME, DatasetConfig, FeatureSpec, SpecError,
                         SplitInfo, raw_id_problem)

#: The dataset configurations shipped inside the package, ``NAME.json`` (package data;
#: ``configs/datasets`` in a checkout links here).
BUNDLED_DATASET_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "datasets")
#: A bundled config's name, so the default works without the repository.
DEFAULT_DATASET_CONFIG = "microlens50k"
#: With ``num_shards=None`` a split gets ceil(rows / this) shards.
DEFAULT_ROWS_PER_SHARD = 100_000
#: Rows per Arrow batch inside a work item (bounds a worker's memory).
DEFAULT_BATCH_ROWS = 32_768
ON_BAD_ROW = ("fail", "quarantine")
#: stats.json lists at most this many context values sent to the OOV row, per feature and split.
MAX_REPORTED_OOV_VALUES = 20
QUARANTINE_DIR = "quarantine"
#: What a run wrote into the output directory; also the marker of its temporary directories.
MANIFEST_FILENAME = "preprocess_manifest.json"
_TOOL = "pipelines.preprocess"
#: How a run marks its output and its temporary directories (:mod:`pipelines.commit`).
LEDGER = Ledger(tool=_TOOL, manifest=MANIFEST_FILENAME, marker=SPEC_FILENAME)
_PARTS_DIR = "_parts"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord.gz"


def _parquet_file(path: str, what: str) -> pq.ParquetFile:
    if not beamio.exists(path):
        fail(path, None, None, f"file not found ({what})")
    try:
        return pq.ParquetFile(path if beamio.is_local(path) else beamio.open_read(path))
    except (pa.ArrowException, OSError) as e:
        fail(path, None, None, f"not a readable parquet file: {one_line(e)}")


# --------------------------------------------------------------------------
# The plan: work items = contiguous row ranges of the split files
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One output shard: rows ``[start, stop)`` of a split file."""

    split: str
    shard: int
    num_shards: int
    file: str
    start: int
    stop: int
    row_groups: tuple[int, ...]  # the file's row groups overlapping the range
    row_group_start: int  # file row index of the first row of row_groups[0]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.shard, self.num_shards)


@dataclasses.dataclass(frozen=True)
class Job:
    """What every worker needs besides its work item (small, picklable)."""

    columns: dict[str, Columns]
    num_items: int
    max_len: int
    work_dir: str
    on_bad_row: str
    batch_rows: int
    gzip_level: int


def plan_ranges(row_group_rows: Sequence[int], num_shards: int) -> list[tuple[int, int]]:
    """Cuts a file into ``min(num_shards, rows)`` (at least 1) contiguous row ranges.

    Boundaries snap to row-group edges when the file has at least as many row
    groups as shards (then no worker decodes rows it does not keep); otherwise
    the ranges are as equal as possible.

    >>> plan_ranges([10], 3)
    [(0, 3), (3, 7), (7, 10)]
    >>> plan_ranges([4, 4, 4, 4], 2)
    [(0, 8), (8, 16)]
    """
    total = int(sum(row_group_rows))
    n = max(1, min(num_shards, total))
    ideal = [round(j * total / n) for j in range(n + 1)]
    if len(row_group_rows) >= n:
        edges = np.concatenate([[0], np.cumsum(row_group_rows)]).astype(np.int64)
        chosen = [0]
        for j in range(1, n):
            lo = chosen[-1] + 1
            hi = len(edges) - 1 - (n - j)
            k = int(np.clip(np.argmin(np.abs(edges - ideal[j])), lo, hi))
            chosen.append(k)
        chosen.append(len(edges) - 1)
        bounds = [int(edges[k]) for k in chosen]
    else:
        bounds = ideal
    return list(zip(bounds[:-1], bounds[1:]))


def _work_items(split: str, path: str, pf: pq.ParquetFile, num_shards: int | None) -> list[WorkItem]:
    rg_rows = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    rows = sum(rg_rows)
    n = num_shards if num_shards else max(1, math.ceil(rows / DEFAULT_ROWS_PER_SHARD))
    ranges = plan_ranges(rg_rows, n)
    edges = np.concatenate([[0], np.cumsum(rg_rows)]).astype(np.int64)
    items = []
    for i, (start, stop) in enumerate(ranges):
        groups = tuple(g for g in range(len(rg_rows)) if edges[g] < stop and edges[g + 1] > start)
        items.append(WorkItem(split=split, shard=i, num_shards=len(ranges), file=path, start=start,
                              stop=stop, row_groups=groups,
                              row_group_start=int(edges[groups[0]]) if groups else 0))
    return items


# --------------------------------------------------------------------------
# The worker: one shard
# --------------------------------------------------------------------------


def _read_range(item: WorkItem, columns: Sequence[str], batch_rows: int,
                stats: dict[str, Any]) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Yields ``(first file row, batch)`` for the rows ``[item.start, item.stop)``.

    A row group that does not decode ends the range; its error (naming the
    file and the row group) goes into ``stats["error"]``.
    """
    if not item.row_groups:
        return
    source = item.file if beamio.is_local(item.file) else beamio.open_read(item.file)
    pf = pq.ParquetFile(source)
    try:
        for row, batch in iter_row_groups(pf, item.file, columns, batch_rows, row_groups=item.row_groups,
                                          use_threads=False):
            lo, hi = max(row, item.start), min(row + batch.num_rows, item.stop)
            if lo < hi:
                yield lo, batch.slice(lo - row, hi - lo)
            if row + batch.num_rows >= item.stop:
                break
    except PreprocessError as e:
        stats["error"] = {"message": str(e), "file": item.file, "row": e.row, "column": None, "reason": e.reason}


def _new_shard_stats(item: WorkItem) -> dict[str, Any]:
    return {"split": item.split, "shard": item.shard, "rows_in": 0, "rows_out": 0, "positives": 0,
            "quarantined": 0, "reasons": {}, "columns": {}, "seq_len_hist": [], "truncated": 0,
            "context_counts": {}, "error": None}


def _add_hist(hist: list[int], lengths: np.ndarray) -> list[int]:
    counts = np.bincount(lengths, minlength=len(hist)) if lengths.size else np.zeros(len(hist), np.int64)
    counts[:len(hist)] += np.asarray(hist, dtype=np.int64)
    return counts.tolist()


def _add_counts(acc: dict[str, int], values: np.ndarray):
    uniq, counts = np.unique(values, return_counts=True)
    for u, c in zip(uniq.tolist(), counts.tolist()):
        acc[str(u)] = acc.get(str(u), 0) + c


def convert_shard(item: WorkItem, job: Job) -> dict[str, Any]:
    """Converts one work item into its shard; writes its stats (and quarantine) part file.

    In ``fail`` mode the first bad row stops the shard: its partial shard file
    is removed and the error goes into the stats part, for the launcher to
    raise (raising here would make a distributed runner retry the item).
    """
    cols = job.columns[item.split]
    keys = list(cols.all)
    stats = _new_shard_stats(item)
    out_path = beamio.join(job.work_dir, item.name)
    parts = beamio.join(job.work_dir, _PARTS_DIR)
    quarantine_path = beamio.join(parts, f"{item.name}.quarantine.jsonl")
    quarantine = None
    ctx = {c: {} for c in cols.context}
    try:
        with beamio.create(out_path) as f:
            writer = GzipTFRecordWriter(f, job.gzip_level)
            for first_row, batch in _read_range(item, keys, job.batch_rows, stats):
                conv = convert_batch(batch, first_row, cols, job.num_items, job.max_len)
                stats["rows_in"] += batch.num_rows
                if conv.bad and job.on_bad_row == "fail":
                    b = conv.bad[0]
                    stats["error"] = {"message": b.message(item.file), "file": item.file, "row": b.row,
                                      "column": b.column, "reason": b.reason}
                    break
                if conv.bad:
                    if quarantine is None:
                        quarantine = beamio.create(quarantine_path)
                    lines = []
                    for b in conv.bad:
                        stats["reasons"][b.reason] = stats["reasons"].get(b.reason, 0) + 1
                        stats["columns"][b.column] = stats["columns"].get(b.column, 0) + 1
                        lines.append(json.dumps({"file": item.file, "row": b.row, "column": b.column,
                                                 "reason": b.reason, "message": b.text,
                                                 "values": b.values}))
                    quarantine.write(("\n".join(lines) + "\n").encode("utf-8"))
                    stats["quarantined"] += len(conv.bad)
                m = conv.num_rows
                if m:
                    writer.write(encode_tfrecords(keys, [conv.features[k] for k in keys]))
                stats["rows_out"] += m
                if cols.label:
                    stats["positives"] += int(conv.features[cols.label].sum())
                stats["seq_len_hist"] = _add_hist(stats["seq_len_hist"], conv.seq_lengths)
                stats["truncated"] += int((conv.seq_lengths > job.max_len).sum())
                for c in cols.context:
                    _add_counts(ctx[c], conv.features[c])
            writer.close()
    finally:
        if quarantine is not None:
            quarantine.close()
    stats["context_counts"] = ctx
    if stats["error"] is not None:
        beamio.delete(out_path)
    beamio.write_text(beamio.join(parts, f"{item.name}.stats.json"), json.dumps(stats))
    return stats


class ConvertShard(beam.DoFn):
    """Beam DoFn: work item -> its shard file and part files (:func:`convert_shard`); emits the shard's name."""

    def __init__(self, job: Job):
        super().__init__()
        self.job = job

    def process(self, item: WorkItem):
        convert_shard(item, self.job)
        yield item.name
def _run_pipeline(work: list[WorkItem], job: Job, beam_options):
    p = beam.Pipeline(options=beamio.pipeline_options(beam_options))
    _ = (p
         | "WorkItems" >> beam.Create(work)
         | "Spread" >> beam.Reshuffle()
         | "ConvertShards" >> beam.ParDo(ConvertShard(job)))
    beamio.run_pipeline(p, (PreprocessError, SpecError), failure=PreprocessError)


# --------------------------------------------------------------------------
# Merging the parts, writing spec and stats, committing the directory
# --------------------------------------------------------------------------


def _merge_stats(cfg: DatasetConfig, work: list[WorkItem], work_dir: str) -> dict[str, Any]:
    parts = beamio.join(work_dir, _PARTS_DIR)
    per_split: dict[str, dict[str, Any]] = {}
    errors = []
    for item in work:
        path = beamio.join(parts, f"{item.name}.stats.json")
        if not beamio.exists(path):
            raise RuntimeError(f"shard {item.name} did not complete (no stats part)")
        s = json.loads(beamio.read_text(path))
        if s["error"] is not None:
            errors.append(s["error"])
            continue
        m = per_split.setdefault(item.split, {"rows_in": 0, "rows_out": 0, "positives": 0, "quarantined": 0,
                                              "reasons": {}, "columns": {}, "seq_len_hist": [],
                                              "truncated": 0, "context_counts": {}, "shards": []})
        for k in ("rows_in", "rows_out", "positives", "quarantined", "truncated"):
            m[k] += s[k]
        for k in ("reasons", "columns"):
            for r, c in s[k].items():
                m[k][r] = m[k].get(r, 0) + c
        hist = np.zeros(max(len(m["seq_len_hist"]), len(s["seq_len_hist"])), dtype=np.int64)
        hist[:len(m["seq_len_hist"])] += np.asarray(m["seq_len_hist"], dtype=np.int64)
        hist[:len(s["seq_len_hist"])] += np.asarray(s["seq_len_hist"], dtype=np.int64)
        m["seq_len_hist"] = hist.tolist()
        for c, counts in s["context_counts"].items():
            acc = m["context_counts"].setdefault(c, {})
            for v, n in counts.items():
                acc[v] = acc.get(v, 0) + n
        m["shards"].append(item.name)
    if errors:
        order = {s: i for i, s in enumerate(cfg.splits)}
        splits_of = {w.file: w.split for w in work}
        first = min(errors, key=lambda e: (order[splits_of[e["file"]]], e["row"]))
        raise PreprocessError(first["message"], file=first["file"], row=first["row"],
                              column=first["column"], reason=first["reason"])
    return per_split


def _out_of_vocab(counts: dict, vocab_size: int) -> dict[str, Any]:
    """Rows and values of ``{value: rows}`` at or beyond ``vocab_size`` (the OOV row's share).

    ``oov_values`` maps the most frequent of them (at most
    ``MAX_REPORTED_OOV_VALUES``, ties by value) to their row counts.
    """
    oov = sorted(((int(v), n) for v, n in counts.items() if not 0 <= int(v) < vocab_size),
                 key=lambda vn: (-vn[1], vn[0]))
    return {"oov_distinct_values": len(oov), "oov_rows": int(sum(n for _, n in oov)),
            "oov_values": {str(v): n for v, n in oov[:MAX_REPORTED_OOV_VALUES]}}


def _stats_and_spec(cfg: DatasetConfig, per_split: dict[str, dict[str, Any]], items, input_dir: str,
                    on_bad_row: str) -> tuple[dict[str, Any], FeatureSpec]:
    vocab_splits = ["train"] if "train" in cfg.splits else list(cfg.splits)
    vocab, vocab_report = {}, {}
    for c in cfg.context:
        counts: dict[int, int] = {}
        for s in vocab_splits:
            for v, n in per_split[s]["context_counts"].get(c, {}).items():
                counts[int(v)] = counts.get(int(v), 0) + n
        bound = cfg.context_vocab_config(c)
        vocab[c] = bound.vocab_size(counts)
        vocab_report[c] = {"max_size": bound.max_size, "min_count": bound.min_count, "vocab_size": vocab[c],
                           "distinct_values": len(counts), **_out_of_vocab(counts, vocab[c])}
    splits_out = {}
    for split, sc in cfg.splits.items():
        m = per_split[split]
        hist = m["seq_len_hist"]
        lengths = np.arange(len(hist))
        total = int(sum(hist))
        oov = {c: _out_of_vocab(m["context_counts"].get(c, {}), vocab[c]) for c in cfg.context}
        entry = {
            "file": beamio.join(input_dir, sc.file),
            "labelled": sc.labelled,
            "rows_in": m["rows_in"],
            "rows_out": m["rows_out"],
            "rows_quarantined": m["quarantined"],
            "quarantine_reasons": dict(sorted(m["reasons"].items())),
            "quarantine_columns": dict(sorted(m["columns"].items())),
            "positives": m["positives"] if sc.labelled else None,
            "positive_rate": (m["positives"] / m["rows_out"]) if sc.labelled and m["rows_out"] else None,
            "sequence_length_histogram": {str(i): int(n) for i, n in enumerate(hist) if n},
            "sequence_length_mean": float((lengths * hist).sum() / total) if total else 0.0,
            "sequence_length_max": int(lengths[np.flatnonzero(hist)[-1]]) if total else 0,
            "truncated_sequences": m["truncated"],
            "context_out_of_vocab": {c: o["oov_rows"] for c, o in oov.items()},
            "context_out_of_vocab_values": {c: o["oov_values"] for c, o in oov.items()},
            "shards": len(m["shards"]),
        }
        splits_out[split] = entry
    spec = FeatureSpec(
        dataset=cfg.name, label=cfg.label, meta=tuple(cfg.meta), target_item=cfg.target_item,
        sequence=cfg.sequence, context=tuple(cfg.context),
        context_vocab_sizes=tuple(vocab[c] for c in cfg.context), max_len=cfg.max_len,
        num_items=items.num_items, num_tags=int(items.tags.shape[1]), tag_vocab_size=items.tag_vocab_size,
        mm_dim=int(items.embedding.shape[1]), item_table_file=ITEM_TABLE_FILENAME,
        item_tags_name=cfg.item_table.tags, item_embedding_name=cfg.item_table.embedding,
        splits={s: SplitInfo(files=tuple(per_split[s]["shards"]), num_rows=per_split[s]["rows_out"],
                             labelled=sc.labelled) for s, sc in cfg.splits.items()},
        compression="GZIP")
    stats = {
        "dataset": cfg.name,
        "input_dir": input_dir,
        "max_len": cfg.max_len,
        "on_bad_row": on_bad_row,
        "vocab_sizes": {**vocab, cfg.target_item: items.num_items, cfg.item_table.tags: items.tag_vocab_size},
        "item_table": {"file": beamio.join(input_dir, cfg.item_table.file), "rows_in": items.rows_in,
                       "num_items": items.num_items, "num_tags": int(items.tags.shape[1]),
                       "tag_vocab_size": items.tag_vocab_size, "mm_dim": int(items.embedding.shape[1]),
                       "padding_row_added": items.padding_row_added,
                       "padding_row_zeroed": items.padding_row_zeroed},
        "context_vocab_from": vocab_splits,
        "context_vocab": vocab_report,
        "splits": splits_out,
    }
    return stats, spec


def _merge_quarantine(work: list[WorkItem], work_dir: str):
    parts = beamio.join(work_dir, _PARTS_DIR)
    by_split: dict[str, list[str]] = {}
    for item in work:  # work is in split, shard order, so rows stay in file order
        path = beamio.join(parts, f"{item.name}.quarantine.jsonl")
        if beamio.exists(path):
            by_split.setdefault(item.split, []).append(path)
    if by_split:
        beamio.makedirs(beamio.join(work_dir, QUARANTINE_DIR))
    for split, paths in by_split.items():
        with beamio.create(beamio.join(work_dir, QUARANTINE_DIR, f"{split}.jsonl")) as out:
            for p in paths:
                with beamio.open_read(p) as f:
                    out.write(f.read())


def _write_item_table(work_dir: str, items):
    buf = io.BytesIO()
    np.savez(buf, **{ITEM_TABLE_TAGS_KEY: items.tags, ITEM_TABLE_EMBEDDING_KEY: items.embedding})
    with beamio.create(beamio.join(work_dir, ITEM_TABLE_FILENAME)) as f:
        f.write(buf.getvalue())


def _owned_entries(out: str, names: Sequence[str]) -> set[str] | None:
    """The entries of ``out`` that an earlier run wrote; None if ``out`` is no earlier output."""
    if MANIFEST_FILENAME in names:
        manifest = read_manifest(out, LEDGER)
        if manifest is None or not isinstance(manifest.get("files"), list):
            return None
        return set(manifest["files"]) | {MANIFEST_FILENAME}
    if SPEC_FILENAME in names:  # written before manifests: the spec names the files
        try:
            spec = json.loads(beamio.read_text(beamio.join(out, SPEC_FILENAME)))
            shards = {f for split in spec["splits"].values() for f in split["files"]}
            return shards | {SPEC_FILENAME, STATS_FILENAME, QUARANTINE_DIR,
                             spec.get("item_table_file", ITEM_TABLE_FILENAME)}
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            return None
    return None


def _check_output_dir(output_dir: str, input_dir: str) -> tuple[str, set[str] | None]:
    """``(output_dir, entries of it that an earlier run wrote)``; ``None``: it does not exist."""
    out = resolve_output_dir(output_dir)
    if beamio.is_local(out):
        real_out, real_in = os.path.realpath(out), os.path.realpath(input_dir)
        if real_out == real_in or real_in.startswith(real_out + os.sep):
            fail(out, None, None, "the output directory would replace the input directory")
        if os.path.exists(out) and not os.path.isdir(out):
            fail(out, None, None, "the output path exists and is not a directory")
    if not beamio.exists(out):
        return out, None
    names = beamio.list_dir(out)
    owned = _owned_entries(out, names) if names else set()
    if owned is None:
        fail(out, None, None, f"the output directory is not empty and is not a preprocessing output (no "
                              f"{MANIFEST_FILENAME} or {SPEC_FILENAME}); refusing to write into it")
    return out, owned


# --------------------------------------------------------------------------


def bundled_dataset_configs() -> list[str]:
    """Names of the dataset configurations shipped with the package (``microlens50k``, ...)."""
    return sorted(n[:-len(".json")] for n in os.listdir(BUNDLED_DATASET_CONFIGS) if n.endswith(".json"))


def dataset_config_path(name_or_path: str) -> str:
    """The JSON file of a dataset config given as a path or as a bundled config's name.

    A path that exists wins; then a name without a directory (``microlens50k``
    or ``microlens50k.json``) is looked up among the bundled configs; then a
    relative path is tried against the repository root, so
    ``configs/datasets/NAME.json`` works from any directory of a checkout.
    """
    path = str(name_or_path)
    if not beamio.is_local(path):  # a URL (gs://...): that file or nothing
        if beamio.FileSystems.exists(path):
            return path
        raise PreprocessError(f"{path}: dataset config not found")
    if os.path.exists(path):
        return path
    if path and os.sep not in path:
        bundled = os.path.join(BUNDLED_DATASET_CONFIGS, path if path.endswith(".json") else f"{path}.json")
        if os.path.exists(bundled):
            return bundled
    if not os.path.isabs(path) and os.path.exists(os.path.join(_REPO_ROOT, path)):
        return os.path.join(_REPO_ROOT, path)
    raise PreprocessError(f"{path}: dataset config not found (give a JSON path or a bundled config: "
                          f"{', '.join(bundled_dataset_configs())})")
def _dataset_config_dir(dataset_config, input_dir: str) -> str:
    """Where a dataset config's relative vocabulary paths resolve: its file's directory, else ``input_dir``."""
    if isinstance(dataset_config, (DatasetConfig, dict)):
        return input_dir
    return os.path.dirname(dataset_config_path(str(dataset_config))) or "."


def _copy_vocabularies(cfg: DatasetConfig, config_dir: str, work_dir: str) -> dict:
    """Checks the config's vocabulary files and copies them to ``work_dir/vocab/``; returns the spec's entries.

    A vocabulary file is UTF-8 text, one raw id a line (line n is dense id
    n + 1), no empty line, no repeated id, decimal integers for dtype int64,
    every id keeping :data:`qin_tf.spec.RAW_ID_RULE` (a ``\\r`` left by a CRLF
    file, an int64 id 0, a negative one or one beyond int64 are refused: the
    export's lookup table would not hold them as written).
    """
    out = {}
    for key, v in sorted(cfg.vocabularies.items()):
        src = v["path"] if os.path.isabs(v["path"]) or "://" in v["path"] else beamio.join(config_dir, v["path"])
        if not beamio.exists(src):
            raise PreprocessError(f"{src}: vocabulary file of `{key}` not found (the dataset config's "
                                  f"vocabularies.{key}.path)")
        try:
            text = beamio.read_text(src)
        except UnicodeDecodeError as e:
            raise PreprocessError(f"{src}: not UTF-8 text: {e}") from None
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        seen: dict[str, int] = {}
        dtype = v.get("dtype", "string")
        for row, raw in enumerate(lines):
            if not raw:
                fail(src, row, None, "empty line; one raw id a line")
            if raw in seen:
                fail(src, row, None, f"raw id {raw!r} repeats line {seen[raw]}; a vocabulary lists each id once")
            if dtype == "int64" and not (raw.lstrip("-").isdigit() and str(int(raw)) == raw):
                fail(src, row, None, f"{raw!r} is not a decimal int64 (vocabularies.{key}.dtype is int64)")
            why = raw_id_problem(int(raw) if dtype == "int64" else raw)
            if why is not None:
                fail(src, row, None, f"{why}; {RAW_ID_RULE}")
            seen[raw] = row
        rel = f"{VOCAB_DIR}/{key}.txt"
        beamio.makedirs(beamio.join(work_dir, VOCAB_DIR))
        beamio.write_text(beamio.join(work_dir, rel), "".join(f"{x}\n" for x in lines))
        out[key] = {"path": rel, "dtype": dtype, "oov_id": int(v.get("oov_id", OOV_ID)), "size": len(lines) + 2}
    return out


def resolve_dataset_config(dataset_config) -> DatasetConfig:
    """A :class:`DatasetConfig` from itself, a dict, a JSON path or a bundled config's name
    (:func:`dataset_config_path`)."""
    if isinstance(dataset_config, DatasetConfig):
        return dataset_config
    if isinstance(dataset_config, dict):
        return DatasetConfig.from_dict(dataset_config)
    path = dataset_config_path(dataset_config)
    if beamio.is_local(path):
        return DatasetConfig.load(path)
    try:  # DatasetConfig.load reads local files only
        d = json.loads(beamio.read_text(path))
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: not valid JSON: {e}") from None
    return DatasetConfig.from_dict(d, where=path)


def _read_items(cfg: DatasetConfig, input_dir: str):
    """The item table of ``input_dir``, checked (:func:`pipelines.validation.read_item_table`)."""
    table_path = beamio.join(input_dir, cfg.item_table.file)
    tpf = _parquet_file(table_path, "the item table")
    check_columns(table_path, tpf.schema_arrow, item_table_columns(cfg.item_table))
    try:
        table = tpf.read(columns=list(item_table_columns(cfg.item_table)))
    except (pa.ArrowException, OSError) as e:
        fail(table_path, None, None, f"corrupt parquet ({one_line(e)})", reason=CORRUPT)
    return read_item_table(table_path, table, cfg.item_table)


def _plan(cfg: DatasetConfig, input_dir: str, num_shards: int | None) -> tuple[list[WorkItem], dict[str, Columns]]:
    """The work items of every split file (their columns checked first) and each split's columns."""
    work: list[WorkItem] = []
    columns: dict[str, Columns] = {}
    for split, sc in cfg.splits.items():
        path = beamio.join(input_dir, sc.file)
        pf = _parquet_file(path, f"split `{split}` of the dataset config")
        check_columns(path, pf.schema_arrow, split_columns(cfg, sc.labelled))
        columns[split] = Columns(label=cfg.label if sc.labelled else None, meta=tuple(cfg.meta),
                                 target_item=cfg.target_item, sequence=cfg.sequence,
                                 context=tuple(cfg.context))
        work += _work_items(split, path, pf, num_shards)
    return work, columns


def preprocess(input_dir: str, output_dir: str, dataset_config=DEFAULT_DATASET_CONFIG, *,
               max_len: int | None = None, num_shards: int | None = None, on_bad_row: str = "fail",
               beam_options=None, batch_rows: int = DEFAULT_BATCH_ROWS,
               gzip_level: int = DEFAULT_GZIP_LEVEL) -> FeatureSpec:
    """Converts the logs in ``input_dir`` into TFRecords, item table, spec and stats in ``output_dir``.

    Args:
        input_dir: directory of the split files and the item table (MMCTR layout).
        output_dir: where to write, on success only; the entries an earlier run
            wrote there are replaced, anything else is kept (see the module docstring).
        dataset_config: a :class:`DatasetConfig`, a dict, the path of its JSON, or the
            name of a bundled one (``microlens50k``, ``mmctr_challenge``).
        max_len: history length; defaults to the config's ``max_len``.
        num_shards: shards per split; ``None``: ``ceil(rows / 100,000)`` per split.
        on_bad_row: ``"fail"`` (stop at the first bad row) or ``"quarantine"``
            (write bad rows to ``quarantine/{split}.jsonl`` and go on).
        beam_options: ``None`` (local FnApiRunner, one thread per core), a list of
            Beam flags (``["--runner=...", ...]``) or ``PipelineOptions``.
        batch_rows: rows per Arrow batch inside a worker.
        gzip_level: zlib level of the shards.

    Returns:
        The :class:`FeatureSpec`, loaded from ``output_dir``.

    Raises:
        PreprocessError: bad input (the message names file, row and column).
        SpecError: a malformed dataset config.
    """
    cfg = resolve_dataset_config(dataset_config).with_max_len(max_len)
    if on_bad_row not in ON_BAD_ROW:
        raise PreprocessError(f"`on_bad_row` must be one of {ON_BAD_ROW}. Received: on_bad_row={on_bad_row!r}")
    if num_shards is not None and (not isinstance(num_shards, int) or num_shards < 1):
        raise PreprocessError(f"`num_shards` must be an integer >= 1. Received: num_shards={num_shards!r}")
    if batch_rows < 1:
        raise PreprocessError(f"`batch_rows` must be >= 1. Received: batch_rows={batch_rows}")
    if not beamio.exists(input_dir):
        raise PreprocessError(f"{input_dir}: input directory not found")
    output_dir, owned = _check_output_dir(output_dir, input_dir)
    opts = beamio.pipeline_options(beam_options)  # fail on bad Beam arguments before reading anything

    items = _read_items(cfg, input_dir)
    work, columns = _plan(cfg, input_dir, num_shards)
    remove_stale_siblings(output_dir, LEDGER)
    work_dir = f"{output_dir}.tmp-{uuid.uuid4().hex[:8]}"
    beamio.makedirs(work_dir)
    try:
        write_manifest(work_dir, None, LEDGER)  # the marker of our temporary directory
        beamio.makedirs(beamio.join(work_dir, _PARTS_DIR))
        _write_item_table(work_dir, items)
        job = Job(columns=columns, num_items=items.num_items, max_len=cfg.max_len, work_dir=work_dir,
                  on_bad_row=on_bad_row, batch_rows=batch_rows, gzip_level=gzip_level)
        _run_pipeline(work, job, opts)
        per_split = _merge_stats(cfg, work, work_dir)
        stats, spec = _stats_and_spec(cfg, per_split, items, input_dir, on_bad_row)
        spec = dataclasses.replace(spec, vocabularies=_copy_vocabularies(
            cfg, _dataset_config_dir(dataset_config, input_dir), work_dir))
        _merge_quarantine(work, work_dir)
        beamio.delete(beamio.join(work_dir, _PARTS_DIR))
        beamio.write_text(beamio.join(work_dir, SPEC_FILENAME), spec.to_json())
        beamio.write_text(beamio.join(work_dir, STATS_FILENAME), json.dumps(stats, indent=2) + "\n")
        write_manifest(work_dir, beamio.list_dir(work_dir), LEDGER)
        swap_commit(work_dir, output_dir, owned, LEDGER, "preprocessing")
    except BaseException:
        beamio.delete(work_dir)
        raise
    if beamio.is_local(output_dir):
        return FeatureSpec.load(output_dir)
    return FeatureSpec.from_json(beamio.read_text(beamio.join(output_dir, SPEC_FILENAME)), base_dir=output_dir)


# --------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------


def _define_flags():
    from absl import flags

    flags.DEFINE_string("input_dir", None, "Directory of the split parquet files and the item table.")
    flags.DEFINE_string("output_dir", None, "Where to write TFRecords, item table, feature_spec.json, stats.json.")
    flags.DEFINE_string("dataset_config", DEFAULT_DATASET_CONFIG,
                        "Dataset config (roles of the columns): a JSON path, or the name of a bundled one "
                        "(microlens50k, mmctr_challenge).")
    flags.DEFINE_integer("max_len", None, "History length (default: the config's max_len).", lower_bound=1)
    flags.DEFINE_integer("num_shards", None, "Shards per split (default: ceil(rows / 100,000)).", lower_bound=1)
    flags.DEFINE_enum("on_bad_row", "fail", list(ON_BAD_ROW),
                      "What to do with a bad row: fail stops at the first one; quarantine sets bad rows "
                      "aside and goes on.")
    flags.mark_flags_as_required(["input_dir", "output_dir"])
    return flags.FLAGS


def _oov_note(stats: dict[str, Any]) -> str:
    """``"; context values beyond the vocabulary bound (OOV row): ..."`` or ``""``."""
    sent = [f"{c} {r['oov_distinct_values']:,} value{'s' if r['oov_distinct_values'] > 1 else ''} "
            f"({r['oov_rows']:,} row{'s' if r['oov_rows'] > 1 else ''})"
            for c, r in stats.get("context_vocab", {}).items() if r["oov_rows"]]
    return f"; train context values sent to the OOV row (see stats.json): {', '.join(sent)}" if sent else ""


def main(argv):
    from absl import flags

    from absl import logging as absl_logging

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    t0 = time.time()
    try:
        spec = preprocess(FLAGS.input_dir, FLAGS.output_dir, FLAGS.dataset_config, max_len=FLAGS.max_len,
                          num_shards=FLAGS.num_shards, on_bad_row=FLAGS.on_bad_row, beam_options=argv[1:])
    except (PreprocessError, SpecError, OSError) as e:  # bad input or an unwritable place: no traceback
        exit_error("preprocess", e)
    stats = json.loads(beamio.read_text(beamio.join(FLAGS.output_dir.rstrip("/"), STATS_FILENAME)))
    rows = ", ".join(f"{s} {v['rows_out']:,} rows ({v['shards']} shard{'s' if v['shards'] > 1 else ''}"
                     + (f", {v['rows_quarantined']:,} quarantined" if v["rows_quarantined"] else "") + ")"
                     for s, v in stats["splits"].items())
    print(f"preprocess: {rows}; {spec.num_items:,} items; max_len {spec.max_len}; "
          f"wrote {FLAGS.output_dir} in {time.time() - t0:.1f} s{_oov_note(stats)}")


def _parse_flags(argv):
    _define_flags()
    from absl import flags

    try:
        return flags.FLAGS(argv, known_only=True)
    except flags.Error as e:
        exit_error("preprocess", e)


def run():
    from qin_tf.runtime import run_app

    run_app(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
