"""Event logs + item catalog -> leakage-free examples, vocabularies and the challenge layout, with Beam.

    python -m pipelines.build_examples --config=configs/logs/microlens50k.json \\
        --output_dir=/tmp/ml50k_built [Beam options]
    python -m pipelines.preprocess --input_dir=/tmp/ml50k_built --output_dir=/tmp/ml50k_data \\
        --dataset_config=/tmp/ml50k_built/dataset_config.json
    python -m pipelines.build_examples --config=DAY2.json --output_dir=/tmp/day2 \\
        --previous=/tmp/day1 [--valid_from=T] [--test_from=T]

The log configuration (:mod:`pipelines.logs_config`, documented field by
field there) names the event log, the item catalog, an optional user table
and the rules below. The output directory holds:

* ``train.parquet``, ``valid.parquet``, ``test.parquet``: the MMCTR challenge
  layout: ``user_id`` int64, ``item_seq`` list<int64> (the history, oldest
  first, not padded), the context columns (int64), ``item_id`` int64,
  ``label`` int64. Item and context values are dense ids; ``user_id`` is the
  raw user id (int64 ids) or its dense id in ``vocab/user_id.txt`` (string
  ids). Rows are ordered by user (raw id), then time, positives before their
  negatives; readers shuffle.
* ``item_info.parquet``: row ``i`` = dense item ``i``: ``item_id``,
  ``item_tags`` (``max_tags`` dense tag ids, left-padded with 0) and
  ``item_emb_d128`` (the catalog's vector; a one-wide zero when the catalog
  has none: the item is then its id and tags). Row 0 is padding, row 1 the
  OOV item (no tags, zero vector), as are items without a catalog row.
* ``vocab/item_id.txt``, ``vocab/tags.txt``, ``vocab/<context>.txt``: one raw
  id per line; line ``n`` (1-based) is dense id ``n + 1``. Dense id 0 is
  padding, 1 the OOV id. Order: frequency descending, ties by raw id.
* ``dataset_config.json``: the :class:`qin_tf.spec.DatasetConfig` that
  ``pipelines.preprocess`` reads unchanged, with ``vocabularies`` naming the
  vocabulary files (paths relative to it).
* ``stats.json``: events in and out, events dropped by reason, users, items,
  vocabulary sizes, history lengths and rows and positive rate per split.
* ``state/``: what a later build continues from (**Incremental builds**
  below; the files in :mod:`pipelines.incremental`).
* ``build_examples_manifest.json``: the files above (paths relative to the output).

The rules (each tested in ``tests/test_build_examples.py``):

* **Order and time.** A user's events are ordered by (time, file, row,
  position in the row). Without a time column the order in the files is the
  time. **Equal timestamps**: an event's history holds only events with a
  strictly earlier time, so events with the same timestamp never see each
  other; leave-last-out's "last" breaks ties by file order.
* **Duplicates.** With a time column, a second event with the same user,
  item and time is dropped (``duplicate_event``). ``history.duplicates``:
  ``keep`` (default: repeats stay, as in the challenge) or ``last`` (only
  an item's most recent occurrence).
* **Splits.** ``leave_last_out``: a user's last positive -> test, the one
  before -> valid, and every event at or after those (labelled negatives
  too) with it; earlier events -> train. ``time``: by ``valid_from`` /
  ``test_from``. Every example needs a history of at least ``history.min_len``
  (default 1) events; other events are counted as ``empty_history`` (so a
  user with one event yields nothing).
* **History.** Positives (``history.events: positives``, default) or every
  event (``all``) strictly before the target, the most recent ``max_len``
  (100), oldest first.
* **Negatives** (logs without a label): ``per_positive`` items per positive,
  uniform (or weighted by training-period popularity) over the item
  vocabulary minus every item the user has in the whole log, with the
  positive's history and context; drawn from a generator seeded by
  ``(seed, user)``, so the same seed gives the same bytes on any runner. A
  user with fewer such items than ``per_positive`` gets all of them (the
  shortfall is counted as ``negatives_unavailable``); the sampler always
  ends (:meth:`MakeExamples._negatives`). ``per_positive`` at or above the
  item vocabulary's size is refused once the vocabulary is known (one line
  naming the config and the field), and above 1,000 by the config check.
* **Vocabularies** count the **training period** only (events of the train
  split, including those without a history). Items get a dense id if they
  have a catalog row (the catalog is not time-bound: a test-period item
  keeps its content) or a training count >= ``item_min_count``; other items
  (seen only later, or rare, without a catalog row) map to OOV 1. Context
  values: training count >= ``context_min_count``. Tags: the number of
  catalog items carrying the tag >= ``tag_min_count``; rarer tags are
  dropped from the item's list; at most ``max_tags`` per item, in order.
* **Popularity level** (``views_level``): decile 1..10 of the target item's
  training-period interaction count among items with a count, 0 when unseen.
  A train row made from a training-period event leaves that event out of
  its own target's count (the decile edges stay those of the full counts):
  counting it would tell the model that every train positive was seen at
  least once, which sampled negatives mostly were not (on the 300-user
  sample that alone drove valid AUC below 0.5).
* **Items without a catalog row** (``unknown_items``): ``keep`` (default: no
  tags, zero vector), ``drop`` (their events are dropped, counted as
  ``unknown_item``) or ``fail``. **Catalog rows never in the log** keep their
  dense id (after every item with a training count): they can be negatives.
* **Bad rows** (a null or unparseable user, item, time or label, a time
  that is not finite (``nan``, ``inf``), a label column other than 0/1, a
  duplicate catalog row, a malformed catalog vector, an unknown item under
  ``fail``, and any user id, item id, tag or context value that breaks the
  raw-id rule, :data:`qin_tf.spec.RAW_ID_RULE`: int64 ids >= 1, strings
  non-empty and without control characters or line breaks, so that every
  vocabulary file round-trips the ids it holds): ``on_bad_row: fail``
  (default) stops with one line naming file, row (0-based, in the file) and
  column; ``drop`` counts them by reason (``bad_raw_id``,
  ``non_finite_time``, ...). An empty log is an error, and so are bytes
  that are not UTF-8 (the file's fault, whatever ``on_bad_row`` says) and
  catalog vectors of differing widths. An error raised in a Beam worker
  reaches the user as the same one line (:func:`run_pipeline`).
* **Incremental builds** (``--previous=DIR``; the state and its checks in
  :mod:`pipelines.incremental`, tested in ``tests/test_incremental_build.py``).
  Every build writes ``state/``: the config's
  rules fingerprint, the end of the data (the largest event time), per user
  the kept history entries, every item touched and the items at its last
  time, and the cumulative training-period item and context counts. A build
  with ``--previous`` reads only the files its config names plus that state,
  and its output equals the new events' rows of one build over everything:
  a history is the previous build's kept entries strictly earlier (the
  equal-timestamp rule) then the new events; negatives exclude the user's
  items of every build; the vocabularies and popularity levels use the
  cumulative counts. Existing raw ids keep their dense ids; ids that now
  qualify are appended (among themselves: count descending, ties by raw id),
  never renumbered. **Splits over time**: continuing needs ``split: time``
  (leave-last-out cannot know a user's last event before the log ends);
  ``--valid_from`` / ``--test_from`` override the config's cut per run (a
  daily build can make the end of its day the valid rows). Refused with one
  line, the previous build untouched: a previous build of other rules (the
  field is named), one without ``state/``, an event older than its end
  (file, row, column and both times, whatever ``on_bad_row`` says; events at
  exactly the end are allowed), ``--previous`` equal to or inside the
  output, or the output inside it.

How it scales: the launching process only expands the globs. The Beam
pipeline reads every file in a worker (streaming), groups events by user
(``CoGroupByKey`` with the user table and the previous build's user states),
works on one user's events at a time,
computes the vocabularies and the popularity levels with combiners, and
writes each split as sorted parts that one worker streams into the split's
file. The vocabularies reach the workers as side inputs, so a worker holds
one user's events plus the vocabularies (and the item-table writer holds the
item table). Nothing is half written: the output is built in
``{output_dir}.tmp-*``, then its files are renamed into place one by one under
a journal (:func:`pipelines.commit.journalled_commit`), which the next run
completes if this one is killed meanwhile. ``build_examples_manifest.json``
lists every file written (``vocab/item_id.txt``, ...): a rerun replaces exactly
those and keeps every other file, refusing one that has the name of a file it
would write. A symbolic link as ``output_dir`` is followed.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

import pyarrow.parquet as pq

from pipelines import beamio, incremental
from pipelines import preprocess as pp
from pipelines.beamio import beam  # imported quietly
from pipelines.commit import (Ledger, journalled_commit, read_manifest, recover_commit, remove_stale_siblings,
                              resolve_output_dir, write_manifest)
from pipelines.example_writers import (EMBEDDING_COLUMN, PARTS_DIR, ConcatSplit, WriteShard, examples_schema,
                                      write_item_info)
from pipelines.log_readers import JoinCatalog, ReadEvents, ReadTable, match_files, raw_key
from pipelines.logs_config import LogsConfig, LogsConfigError
from pipelines.user_examples import SPLITS, MakeExamples, UserEvents, shard_of
from qin_tf.cli import exit_error
from qin_tf.rows import PreprocessError
from pipelines.vocabularies import (OOV_ID, FirstError, MergeDicts, build_contexts, build_items, indexed, vocabulary,
                                    write_vocab)
from qin_tf.spec import SpecError

VOCAB_DIR = "vocab"
DATASET_CONFIG_FILENAME = "dataset_config.json"
ITEM_INFO_FILENAME = "item_info.parquet"
_ERROR_FILE = "_error.json"
_STATS_PART = "_stats.json"
MANIFEST_FILENAME = "build_examples_manifest.json"
#: The output's manifest lists every file a run wrote (``vocab/item_id.txt``, ...): a rerun replaces
#: exactly those and keeps every other file, in ``vocab/`` too (:func:`pipelines.commit.journalled_commit`).
LEDGER = Ledger(tool="pipelines.build_examples", manifest=MANIFEST_FILENAME, marker=DATASET_CONFIG_FILENAME)
#: The top-level files of an output written before manifests (its vocabularies: those its dataset config names).
_LEGACY_FILES = {*(f"{s}.parquet" for s in ("train", "valid", "test")), ITEM_INFO_FILENAME, DATASET_CONFIG_FILENAME,
                 "stats.json"}
_REFUSED = "_refused.json"  # a config value the data makes impossible (negatives.per_positive)
_ITEM_ERROR = "_item_error.json"  # the item table cannot be written (vectors of differing widths)


# --------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------


def _build_pipeline(p, cfg: LogsConfig, files: dict[str, list[str]], work_dir: str, resume: dict | None = None):
    """The whole build as one Beam graph: read, group by user, count, make vocabularies, write into ``work_dir``.

    Every step's bad rows and stats go to ``bads`` and ``stats``, written at the end (:func:`_write_reports`).
    """
    bads, stats = [], []
    ev_files = list(enumerate(files["events"]))
    read = (p | "EventFiles" >> beam.Create(ev_files) | "Spread" >> beam.Reshuffle()
            | "ReadEvents" >> beam.ParDo(ReadEvents(cfg)).with_outputs("bad", "stats", main="events"))
    bads.append(read.bad)
    stats.append(read.stats)
    user_rows = _read_users(p, cfg, files, bads, stats)
    catalog = _read_catalog(p, cfg, files, bads, stats)
    catalog_ids = catalog | "CatalogIds" >> beam.Keys()
    catalog_list = catalog_ids | "CatalogIdList" >> beam.combiners.ToList()
    per_user = _per_user(p, cfg, dict(ev_files), read.events, user_rows, catalog_list, resume)
    bads.append(per_user.bad)
    stats.append(per_user.stats)
    # Incremental: the previous build's vocabularies and cumulative counts are extended (pipelines/incremental.py).
    prev_vocabs = beam.pvalue.AsSingleton(p | "PrevVocabTrigger" >> beam.Create([resume])
                                          | "PrevVocabs" >> beam.Map(incremental.read_vocabularies))
    vocabs = _vocabularies(p, cfg, per_user, catalog, catalog_list, prev_vocabs, resume)
    incremental.write_state(p, cfg, resume, work_dir, per_user.state, vocabs["item_counts"], vocabs["ctx_counts"],
                            shard_of)
    _ = (per_user.late | "FirstLate" >> beam.CombineGlobally(FirstError())
         | "WriteLate" >> beam.Map(lambda e: e and beamio.write_text(beamio.join(work_dir, incremental.LATE_FILE),
                                                                  json.dumps(e))))
    stats.append(_write_examples(cfg, work_dir, per_user.records, vocabs))
    _write_item_table(cfg, work_dir, catalog, vocabs)
    _write_vocabularies(p, cfg, work_dir, vocabs)
    _write_reports(cfg, work_dir, bads, stats)


def _read_users(p, cfg: LogsConfig, files: dict[str, list[str]], bads: list, stats: list):
    """``(user, values)`` of the user table (none without one)."""
    if cfg.users is None:
        return p | "NoUsers" >> beam.Create([])
    u = (p | "UserFiles" >> beam.Create(list(enumerate(files["users"])))
         | "ReadUsers" >> beam.ParDo(ReadTable(cfg.users.source, cfg.users.user,
                                               [c.column for c in cfg.users.context], cfg.id_dtype, "user_table"))
         .with_outputs("bad", "stats", main="rows"))
    bads.append(u.bad)
    stats.append(u.stats)
    return u.rows


def _read_catalog(p, cfg: LogsConfig, files: dict[str, list[str]], bads: list, stats: list):
    """``(item, (raw tags, vector, location))`` of the catalog joined with its vector file (none without one)."""
    if cfg.catalog is None:
        return p | "NoCatalog" >> beam.Create([])
    cat = cfg.catalog
    cols = [cat.tags.column] if cat.tags else []
    cols += [cat.vector.column] if cat.vector and not cat.vector.source else []
    c = (p | "CatalogFiles" >> beam.Create(list(enumerate(files["catalog"])))
         | "ReadCatalog" >> beam.ParDo(ReadTable(cat.source, cat.item, cols, cfg.id_dtype, "catalog"))
         .with_outputs("bad", "stats", main="rows"))
    bads.append(c.bad)
    stats.append(c.stats)
    vec_rows = p | "NoVectors" >> beam.Create([])
    if cat.vector is not None and cat.vector.source is not None:
        v = (p | "VectorFiles" >> beam.Create(list(enumerate(files["vectors"])))
             | "ReadVectors" >> beam.ParDo(ReadTable(cat.vector.source, cat.vector.item, [cat.vector.column],
                                                     cfg.id_dtype, "vector_file"))
             .with_outputs("bad", "stats", main="rows"))
        vec_rows = v.rows
        bads.append(v.bad)
        stats.append(v.stats)
    joined = ({"catalog": c.rows, "vector": vec_rows} | "JoinCatalog" >> beam.CoGroupByKey()
              | "CatalogRows" >> beam.ParDo(JoinCatalog(cfg, located=True)).with_outputs("bad", main="rows"))
    bads.append(joined.bad)
    return joined.rows


def _per_user(p, cfg: LogsConfig, ev_files: dict[int, str], events, user_rows, catalog_list, resume: dict | None):
    """:class:`UserEvents` on each user's events, user row and previous state (incremental), grouped by user."""
    user_fn = UserEvents(cfg, ev_files, resume)
    side = {}
    if cfg.catalog is not None and cfg.unknown_items != "keep":
        side["catalog_ids"] = beam.pvalue.AsSingleton(catalog_list | "CatalogSet" >> beam.Map(set))
    # Incremental: the previous build's user states join the new events by user (pipelines/incremental.py).
    state_rows = incremental.read_user_states(p, resume)
    return ({"events": events, "user": user_rows, "state": state_rows} | "GroupByUser" >> beam.CoGroupByKey()
            | "UserEvents" >> beam.ParDo(user_fn, **side).with_outputs("bad", "stats", "item_counts", "ctx_counts",
                                                                       "state", "late", main="records"))


def _vocabularies(p, cfg: LogsConfig, per_user, catalog, catalog_list, prev_vocabs, resume: dict | None) -> dict:
    """The item, context, user and tag vocabularies (singletons) and the summed counts, by name."""
    item_counts = ((per_user.item_counts | "FlatItemCounts" >> beam.FlatMap(lambda x: x),
                    incremental.previous_item_counts(p, resume)) | "WithPrevItemCounts" >> beam.Flatten()
                   | "SumItems" >> beam.CombinePerKey(sum) | "ItemCountList" >> beam.combiners.ToList())
    items = (item_counts | "ItemVocab" >> beam.Map(lambda c, ids, prev: build_items(c, ids, cfg, (prev or {}).get(
        "item_id")), ids=beam.pvalue.AsSingleton(catalog_list), prev=prev_vocabs))
    ctx_counts = ((per_user.ctx_counts | "FlatCtxCounts" >> beam.FlatMap(lambda x: x),
                   incremental.previous_context_counts(p, resume)) | "WithPrevCtxCounts" >> beam.Flatten()
                  | "SumCtx" >> beam.CombinePerKey(sum) | "CtxCountList" >> beam.combiners.ToList())
    contexts = ctx_counts | "CtxVocab" >> beam.Map(lambda c, prev: build_contexts(c, cfg, prev), prev=prev_vocabs)
    users = p | "NoUserVocab" >> beam.Create([None])
    if cfg.id_dtype == "string":  # string user ids: the output's user_id is a dense id (meta only)
        users = (per_user.records | "UserKeys" >> beam.Keys() | "UserList" >> beam.combiners.ToList()
                 | "UserVocab" >> beam.Map(lambda us, prev: indexed(incremental.appended(
                     (prev or {}).get("user_id"), sorted(us, key=raw_key))), prev=prev_vocabs))
    tag_vocab = p | "NoTags" >> beam.Create([{"order": [], "dense": {}}])
    if cfg.catalog is not None and cfg.catalog.tags is not None:
        tag_vocab = (catalog | "TagsOfItems" >> beam.FlatMap(lambda kv: [(t, 1) for t in kv[1][0]])
                     | "SumTags" >> beam.CombinePerKey(sum) | "TagCountList" >> beam.combiners.ToList()
                     | "TagVocab" >> beam.Map(lambda c, prev: indexed(incremental.appended(
                         (prev or {}).get("tags"), vocabulary(dict(c), cfg.catalog.tags.min_count))), prev=prev_vocabs))
    return {"items": items, "contexts": contexts, "users": users, "tags": tag_vocab, "item_counts": item_counts,
            "ctx_counts": ctx_counts}


def _write_examples(cfg: LogsConfig, work_dir: str, records, vocabs: dict):
    """The rows of every split (:class:`MakeExamples`, :class:`WriteShard`, :class:`ConcatSplit`); returns their
    stats. A ``per_positive`` the data makes impossible is written for the launcher to refuse."""
    items = vocabs["items"]
    _ = (items | "RefuseNegatives" >> beam.Map(lambda it: it.get("refused") and beamio.write_text(
        beamio.join(work_dir, _REFUSED), json.dumps({"message": it["refused"]}))))
    made = (records
            | "MakeExamples" >> beam.ParDo(MakeExamples(cfg), items=beam.pvalue.AsSingleton(items),
                                           contexts=beam.pvalue.AsSingleton(vocabs["contexts"]),
                                           users=beam.pvalue.AsSingleton(vocabs["users"])).with_outputs("stats",
                                                                                                       main="rows"))
    _ = (made.rows | "GroupShards" >> beam.GroupByKey() | "WriteShards" >> beam.ParDo(WriteShard(cfg, work_dir))
         | "GroupParts" >> beam.GroupByKey() | "ConcatSplits" >> beam.ParDo(ConcatSplit(cfg, work_dir)))
    return made.stats


def _write_item_table(cfg: LogsConfig, work_dir: str, catalog, vocabs: dict):
    """``item_info.parquet`` from the catalog and the item and tag vocabularies."""
    max_tags = cfg.catalog.tags.max_tags if cfg.catalog is not None and cfg.catalog.tags else 1

    def item_row(kv, items, tags):
        item, (tag_list, vec, at) = kv
        ids = [tags["dense"][t] for t in tag_list if t in tags["dense"]][:max_tags]
        return (items["dense"].get(item, OOV_ID), ids, None if vec is None else vec.tolist(), at)

    def write_items(rows, items):
        try:
            write_item_info(beamio.join(work_dir, ITEM_INFO_FILENAME), len(items["order"]) + 2, rows, max_tags)
        except PreprocessError as e:  # vectors of differing widths: for the launcher to raise (no retries)
            beamio.write_text(beamio.join(work_dir, _ITEM_ERROR), json.dumps({"message": str(e)}))
        return True

    _ = (catalog | "ItemRows" >> beam.Map(item_row, items=beam.pvalue.AsSingleton(vocabs["items"]),
                                          tags=beam.pvalue.AsSingleton(vocabs["tags"]))
         | "ItemRowList" >> beam.combiners.ToList()
         | "WriteItemInfo" >> beam.Map(write_items, items=beam.pvalue.AsSingleton(vocabs["items"])))


def _write_vocabularies(p, cfg: LogsConfig, work_dir: str, vocabs: dict):
    """``vocab/<name>.txt`` for every vocabulary, and their sizes for the stats (``_vocab.json``)."""

    def write_vocabs(items, contexts, tags, users):
        vdir = beamio.join(work_dir, VOCAB_DIR)
        beamio.makedirs(vdir)
        info = {"item_id": (items["order"], cfg.id_dtype)}
        if cfg.catalog is not None and cfg.catalog.tags is not None:
            info["tags"] = (tags["order"], "string")
        for name in cfg.categorical_context:
            info[name] = (contexts[name]["order"], "string")
        if users is not None:
            info["user_id"] = (users["order"], "string")
        out = {}
        for name, (order, dtype) in info.items():
            write_vocab(beamio.join(vdir, f"{name}.txt"), order)
            out[name] = {"path": f"{VOCAB_DIR}/{name}.txt", "dtype": dtype, "oov_id": OOV_ID, "size": len(order) + 2}
        out_stats = {"vocabularies": out,
                     "items": {"vocabulary": len(items["order"]),
                               "with_training_count": int(sum(1 for c in items["counts"][2:] if c > 0)),
                               "catalog_only": int(sum(1 for c in items["counts"][2:] if c == 0))}}
        beamio.write_text(beamio.join(work_dir, "_vocab.json"), json.dumps(out_stats))
        return True

    _ = (p | "VocabTrigger" >> beam.Create([None])
         | "WriteVocabs" >> beam.Map(lambda _, i, c, t, u: write_vocabs(i, c, t, u),
                                     i=beam.pvalue.AsSingleton(vocabs["items"]),
                                     c=beam.pvalue.AsSingleton(vocabs["contexts"]),
                                     t=beam.pvalue.AsSingleton(vocabs["tags"]),
                                     u=beam.pvalue.AsSingleton(vocabs["users"])))


def _write_reports(cfg: LogsConfig, work_dir: str, bads: list, stats: list):
    """The merged stats (``_stats.json``), and the first bad row (``on_bad_row: fail``) or the bad rows
    counted by reason (``drop``; a file that does not decode is an error either way)."""
    _ = (stats | "FlattenStats" >> beam.Flatten() | "MergeStats" >> beam.CombineGlobally(MergeDicts())
         | "WriteStats" >> beam.Map(lambda s: beamio.write_text(beamio.join(work_dir, _STATS_PART), json.dumps(s))))
    bad_all = bads | "FlattenBad" >> beam.Flatten()
    if cfg.on_bad_row == "fail":
        _ = (bad_all | "FirstError" >> beam.CombineGlobally(FirstError())
             | "WriteError" >> beam.Map(lambda e: e and beamio.write_text(beamio.join(work_dir, _ERROR_FILE),
                                                                       json.dumps(e))))
    else:  # drop: count by reason (rows of the event log, the catalog and the user table alike)
        _ = (bad_all | "FileErrors" >> beam.Filter(lambda e: e.get("fatal", False))  # a file that does not decode
             | "FirstFileError" >> beam.CombineGlobally(FirstError())
             | "WriteFileError" >> beam.Map(lambda e: e and beamio.write_text(beamio.join(work_dir, _ERROR_FILE),
                                                                           json.dumps(e))))
        _ = (bad_all | "BadReasons" >> beam.Map(lambda e: {"bad_rows": {e["reason"]: 1}})
             | "MergeBad" >> beam.CombineGlobally(MergeDicts())
             | "WriteBad" >> beam.Map(lambda s: beamio.write_text(beamio.join(work_dir, "_bad.json"),
                                                                  json.dumps(s))))


def _check_output_dir(output_dir: str, inputs: list[str]) -> tuple[str, set[str]]:
    """``(output_dir, the files of it an earlier run wrote)``, once a killed run's commit into it is
    completed and killed runs' ``.tmp-*`` directories are gone; a symbolic link is followed."""
    out = resolve_output_dir(output_dir)
    if beamio.is_local(out):
        real = os.path.realpath(out)
        for f in inputs:
            rf = os.path.realpath(f)
            if rf == real or rf.startswith(real + os.sep):
                raise PreprocessError(f"{out}: the output directory holds an input file ({f}); refusing to replace it")
        if os.path.exists(out) and not os.path.isdir(out):
            raise PreprocessError(f"{out}: the output path exists and is not a directory")
    recover_commit(out, LEDGER)
    remove_stale_siblings(out, LEDGER)
    owned = _owned_files(out)
    if owned is None:
        raise PreprocessError(f"{out}: the output directory exists and is not a build_examples output "
                              f"(no {DATASET_CONFIG_FILENAME}); refusing to replace it")
    return out, owned


def _owned_files(out: str) -> set[str] | None:
    """The files of ``out`` that an earlier run wrote (relative paths); None if ``out`` is no earlier output."""
    names = beamio.list_dir(out)
    if not names:
        return set()
    if MANIFEST_FILENAME in names:
        manifest = read_manifest(out, LEDGER)
        if manifest is None or not isinstance(manifest.get("files"), list):
            return None
        return set(manifest["files"]) | {MANIFEST_FILENAME}
    if DATASET_CONFIG_FILENAME in names:  # written before manifests: its dataset config names the vocabularies
        try:
            vocabs = json.loads(beamio.read_text(beamio.join(out, DATASET_CONFIG_FILENAME))).get("vocabularies") or {}
            return _LEGACY_FILES | {v["path"] for v in vocabs.values()}
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            return None
    return None


def _dataset_config(cfg: LogsConfig, vocabs: dict) -> dict:
    return {
        "name": cfg.name,
        "splits": {s: {"file": f"{s}.parquet", "labelled": True} for s in SPLITS},
        "label": "label", "meta": ["user_id"], "target_item": "item_id", "sequence": "item_seq",
        "context": list(cfg.context_names),
        "item_table": {"file": ITEM_INFO_FILENAME, "id": "item_id", "tags": "item_tags",
                       "embedding": EMBEDDING_COLUMN},
        "max_len": cfg.max_len,
        "vocabularies": {k: {"path": v["path"], "dtype": v["dtype"], "oov_id": v["oov_id"]}
                         for k, v in vocabs.items()},
    }


class RunnerError(RuntimeError):
    """The Beam runner failed, or its counts do not add up (elements lost); nothing was written."""


def _check_counts(raw: dict, work_dir: str):
    """Every event read is either in an example or dropped with a reason, and every row is written."""
    dropped = sum(raw.get("events_dropped", {}).values()) + sum(raw.get("events_bad", {}).values())
    if raw.get("events_in", 0) != raw.get("events_out", 0) + dropped:
        raise RunnerError(f"the Beam runner lost events: {raw.get('events_in', 0)} read, "
                           f"{raw.get('events_out', 0)} used and {dropped} dropped")
    made = sum(v.get("rows", 0) - v.get("sampled_negatives", 0) for v in raw.get("splits", {}).values())
    if made != raw.get("events_out", 0):
        raise RunnerError(f"the Beam runner lost users: {raw.get('events_out', 0)} examples made, "
                           f"{made} turned into rows")
    for s in SPLITS:
        path = beamio.join(work_dir, f"{s}.parquet")
        want = raw.get("splits", {}).get(s, {}).get("rows", 0)
        got = pq.ParquetFile(path if beamio.is_local(path) else beamio.open_read(path)).metadata.num_rows \
            if beamio.exists(path) else 0
        if got != want:
            raise RunnerError(f"the Beam runner lost rows: {want} {s} rows made, {got} written")


def run_pipeline(p, errors=(PreprocessError, LogsConfigError, SpecError)):
    """Runs the Beam pipeline ``p`` to the end; a worker's own error comes back as itself.

    Beam reports what a worker raised as a ``RuntimeError`` holding the worker's
    traceback: the project's errors (``errors``) are rebuilt from it, anything
    else becomes a :class:`RunnerError` of one line
    (:func:`pipelines.beamio.run_pipeline`).
    """
    beamio.run_pipeline(p, errors, failure=RunnerError, stopped=RunnerError)


def build_examples(config, output_dir: str, *, beam_options=None, previous: str | None = None,
                   valid_from: float | None = None, test_from: float | None = None) -> dict:
    """Builds examples, item table, vocabularies, dataset config and stats from raw logs.

    Args:
        config: a :class:`LogsConfig` or the path of its JSON.
        output_dir: where to write; replaced as a whole on success only.
        beam_options: as :func:`pipelines.beamio.pipeline_options`.
        previous: an earlier build's output directory to continue from (its ``state/``; the config
            names only the new events); see "Incremental builds" above. Never modified.
        valid_from, test_from: override the config's time split for this run (split ``time`` only).

    Returns:
        The stats (as written to ``stats.json``).

    Raises:
        PreprocessError: bad input (the message names file, row and column).
        LogsConfigError: a malformed log config.
    """
    cfg = config if isinstance(config, LogsConfig) else LogsConfig.load(config)
    cfg, resume = incremental.prepare(cfg, output_dir, previous, valid_from, test_from)
    files = {"events": match_files(cfg.events.source, "the event log")}
    if cfg.catalog is not None:
        files["catalog"] = match_files(cfg.catalog.source, "the item catalog")
        if cfg.catalog.vector is not None and cfg.catalog.vector.source is not None:
            files["vectors"] = match_files(cfg.catalog.vector.source, "the item vectors")
    if cfg.users is not None:
        files["users"] = match_files(cfg.users.source, "the user table")
    output_dir, owned = _check_output_dir(output_dir, [f for fs in files.values() for f in fs])
    opts = beamio.pipeline_options(beam_options)
    work_dir = f"{output_dir}.tmp-{uuid.uuid4().hex[:8]}"
    beamio.makedirs(work_dir)
    try:
        write_manifest(work_dir, None, LEDGER)  # marks our temporary dir
        beamio.makedirs(beamio.join(work_dir, PARTS_DIR))
        p = beam.Pipeline(options=opts)
        _build_pipeline(p, cfg, files, work_dir, resume)
        run_pipeline(p)
        incremental.raise_late(work_dir, resume)
        if beamio.exists(beamio.join(work_dir, _ERROR_FILE)):
            e = json.loads(beamio.read_text(beamio.join(work_dir, _ERROR_FILE)))
            raise PreprocessError(e["message"], file=e["file"], row=e["row"], column=e["column"], reason=e["reason"])
        if beamio.exists(beamio.join(work_dir, _ITEM_ERROR)):
            raise PreprocessError(json.loads(beamio.read_text(beamio.join(work_dir, _ITEM_ERROR)))["message"])
        if beamio.exists(beamio.join(work_dir, _REFUSED)):
            raise LogsConfigError(json.loads(beamio.read_text(beamio.join(work_dir, _REFUSED)))["message"])
        raw = json.loads(beamio.read_text(beamio.join(work_dir, _STATS_PART)))
        if not raw.get("events_in"):
            raise PreprocessError(f"{', '.join(files['events'])}: the event log has no events")
        if not raw.get("events_out"):
            raise PreprocessError(f"{', '.join(files['events'])}: no event yields an example "
                                  f"(dropped: {raw.get('events_dropped', {})})")
        _check_counts(raw, work_dir)
        vocab = json.loads(beamio.read_text(beamio.join(work_dir, "_vocab.json")))
        bad = json.loads(beamio.read_text(beamio.join(work_dir, "_bad.json"))) if beamio.exists(
            beamio.join(work_dir, "_bad.json")) else {}
        for s in SPLITS:  # a split without rows still gets its (empty) file
            path = beamio.join(work_dir, f"{s}.parquet")
            if not beamio.exists(path):
                with beamio.create(path) as f:
                    pq.write_table(examples_schema(cfg).empty_table(), f)
        if not beamio.exists(beamio.join(work_dir, ITEM_INFO_FILENAME)):  # no catalog: ids only
            write_item_info(beamio.join(work_dir, ITEM_INFO_FILENAME), vocab["items"]["vocabulary"] + 2, [],
                            cfg.catalog.tags.max_tags if cfg.catalog and cfg.catalog.tags else 1)
        stats = _final_stats(cfg, files, raw, vocab, bad)
        beamio.delete(beamio.join(work_dir, PARTS_DIR))
        for name in (_STATS_PART, "_vocab.json", "_bad.json"):
            beamio.delete(beamio.join(work_dir, name))
        beamio.write_text(beamio.join(work_dir, DATASET_CONFIG_FILENAME),
                       json.dumps(_dataset_config(cfg, vocab["vocabularies"]), indent=2) + "\n")
        beamio.write_text(beamio.join(work_dir, "stats.json"), json.dumps(stats, indent=2) + "\n")
        # A rerun replaces only the files the earlier run wrote; anything else the user keeps there stays.
        journalled_commit(work_dir, output_dir, owned, LEDGER, "build_examples")
    except BaseException:
        beamio.delete(work_dir)
        raise
    return stats


def _final_stats(cfg, files, raw, vocab, bad) -> dict:
    splits = {}
    for s in SPLITS:
        m = raw.get("splits", {}).get(s, {})
        hist = {int(k): v for k, v in m.get("history_lengths", {}).items()}
        n = sum(hist.values())
        splits[s] = {"rows": m.get("rows", 0), "positives": m.get("positives", 0),
                     "positive_rate": m.get("positives", 0) / m["rows"] if m.get("rows") else None,
                     "sampled_negatives": m.get("sampled_negatives", 0),
                     "negatives_unavailable": m.get("negatives_unavailable", 0),
                     "target_oov": m.get("target_oov", 0),
                     "history_length_mean": sum(k * v for k, v in hist.items()) / n if n else 0.0,
                     "history_length_max": max(hist) if hist else 0,
                     "history_length_histogram": {str(k): hist[k] for k in sorted(hist)}}
    dropped = dict(raw.get("events_dropped", {}))
    for reason, n in raw.get("events_bad", {}).items():
        dropped[f"bad_row:{reason}"] = dropped.get(f"bad_row:{reason}", 0) + n
    return {
        "dataset": cfg.name, "config": cfg.path, "files": files,
        "events_in": raw.get("events_in", 0), "events_out": raw.get("events_out", 0),
        "events_dropped": dict(sorted(dropped.items())),
        "bad_rows": bad.get("bad_rows", {}),
        "users_in": raw.get("users_in", 0), "users_out": raw.get("users_out", 0),
        "users_without_user_row": raw.get("users_without_user_row", 0),
        "catalog_rows_in": raw.get("catalog_rows_in", 0),
        "items": vocab["items"],
        "vocab_sizes": {k: v["size"] for k, v in vocab["vocabularies"].items()},
        "splits": splits,
    }


# --------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------


def _define_flags():
    from absl import flags

    flags.DEFINE_string("config", None, "The logs config JSON file (its fields: pipelines/logs_config.py).")
    flags.DEFINE_string("output_dir", None, "Where to write the examples, item table, vocabularies, dataset "
                        "config and stats.")
    flags.DEFINE_string("preprocess_dir", None, "Where to also write the TFRecords of pipelines.preprocess run on "
                        "the output; unset, preprocessing is left to you.")
    flags.DEFINE_string("previous", None, "An earlier build's output directory to continue from (its state/): "
                        "the config names only the new events; ids are appended, never renumbered.")
    flags.DEFINE_float("valid_from", None, "Overrides the config's split.valid_from for this run (split time).")
    flags.DEFINE_float("test_from", None, "Overrides the config's split.test_from for this run (split time).")
    flags.mark_flags_as_required(["config", "output_dir"])
    return flags.FLAGS


def main(argv):
    from absl import flags

    from absl import logging as absl_logging

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    t0 = time.time()
    try:
        stats = build_examples(FLAGS.config, FLAGS.output_dir, beam_options=argv[1:], previous=FLAGS.previous,
                               valid_from=FLAGS.valid_from, test_from=FLAGS.test_from)
        rows = ", ".join(f"{s} {v['rows']:,} rows" for s, v in stats["splits"].items())
        print(f"build_examples: {stats['events_in']:,} events -> {rows}; {stats['users_out']:,} users; "
              f"{stats['items']['vocabulary']:,} items; wrote {FLAGS.output_dir} in {time.time() - t0:.1f} s")
        if FLAGS.preprocess_dir:
            out = FLAGS.output_dir.rstrip("/")
            spec = pp.preprocess(out, FLAGS.preprocess_dir, beamio.join(out, DATASET_CONFIG_FILENAME))
            print(f"preprocess: {spec.num_items:,} items; max_len {spec.max_len}; wrote {FLAGS.preprocess_dir}")
    except (PreprocessError, LogsConfigError, SpecError, RunnerError, OSError) as e:
        exit_error("build_examples", e)


def _parse_flags(argv):
    _define_flags()
    from absl import flags

    try:
        return flags.FLAGS(argv, known_only=True)
    except flags.Error as e:
        exit_error("build_examples", e)


def run():
    from qin_tf.runtime import run_app

    run_app(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
