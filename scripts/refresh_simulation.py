"""The catalog refresh, simulated: train without 10% of the items, serve them by refresh, score their rows.

Two subcommands around an ordinary build and training run::

    python scripts/refresh_simulation.py prepare --config=configs/logs/microlens50k.json \\
        --fraction=0.1 --seed=0 --output_dir=W
    python -m pipelines.build_examples --config=W/logs_config.json --output_dir=W/examples \\
        --preprocess_dir=W/data                                   # the reduced build
    python -m qin_tf.train ... --data_dir=W/data --model_dir=M    # train as usual (once per model)
    python -m pipelines.build_examples --config=configs/logs/microlens50k.json \\
        --output_dir=FULL                                         # the full build (no preprocessing needed)
    python scripts/refresh_simulation.py evaluate --full_examples=FULL --removed=W/removed_items.txt \\
        --config=configs/logs/microlens50k.json --model_dirs=M1,M2 --export_base=E1,E2 \\
        --split=test --output=W/results.json

**prepare** picks R, a seeded random ``--fraction`` of the catalog items
that occur in the event log (of the log items when the config has no
catalog), and writes into ``--output_dir``:

* ``raw/``: the inputs without R: the catalog and the vector file without
  R's rows, and the event log without any event of an R item (a user left
  without events loses the line; other tables are the config's own files);
* ``removed_items.txt``: R's raw ids, one a line, sorted;
* ``logs_config.json``: the log config pointing at those files (absolute
  paths), otherwise the same;
* ``prepare.json``: R's size and the rows and events kept and removed.

R's events go from the whole log, not only from the training period. Under
``leave_last_out`` a user's training events are all but the last two; when
the user's last item is in R, the reduced sequence simply ends one event
earlier, so its valid and test events are events that the full build put in
train or valid. Every reduced training event still has two later events in
the full sequence, so the reduced build's train events are a subset of the
full build's, and no event after the full build's training period enters
training. (Removing R from the training period only would leave R's
test-period events in the reduced log, where they would become the reduced
valid/test rows of users whose last item is in R, and they would be
unknown to the vocabulary anyway.) Under a ``time`` split removing events
moves no boundary.

**evaluate** takes the full build's ``--split`` rows (``build_examples``
output: dense ids and the vocabularies), maps them back to raw ids through
its vocabularies, and parts them by target: ``removed`` (the target is in R:
the new items) and ``kept``. For each model (``best.keras`` in a model dir
and its export base, exported here when the base has no version yet) it
scores both parts through the export's raw-id signature
(:func:`export.score.score` with ``raw_ids``) with

* ``as_trained``: the newest version whose item vocabulary is the training
  run's (R's ids are unknown to it: the OOV row), and
* ``refreshed``: a new version written by :func:`export.refresh_catalog.
  refresh_catalog` from the full catalog (``--config``'s catalog section):
  R's items are added with their tags and vectors, their id embedding the
  OOV row. Each run writes one such version.

The popularity level of a ``removed`` row is 0 by default
(``--new_item_level=zero``): a new item was seen by nobody in the training
period, which is what ``build_examples`` gives an unseen item;
``--new_item_level=full`` keeps the full build's level (the item's
training-period views in the full log, which the simulated world did not
have). Other rows keep the full build's values.

It prints one JSON line per model, version and part (rows, positives, AUC,
log loss; AUC null for a part with one class) and one per model with the
refresh guarantee: the ``kept`` rows that touch no R item (not as target,
not in the history) must score bit for bit the same in both versions. All
of it goes to ``--output`` (JSON), refused when it exists unless
``--overwrite``.

The full MicroLens-50k run (the trainings on the CPU queue; ``R=/work/runs/s4/refresh/ml50k``)::

    python scripts/refresh_simulation.py prepare --config=configs/logs/microlens50k.json \\
        --fraction=0.1 --seed=0 --output_dir=$R/sim
    python -m pipelines.build_examples --config=$R/sim/logs_config.json \\
        --output_dir=$R/sim/examples --preprocess_dir=$R/sim/data
    python -m pipelines.build_examples --config=configs/logs/microlens50k.json \\
        --output_dir=$R/full_examples           # evaluate reads only this: no --preprocess_dir needed
    python -m qin_tf.train --flagfile=configs/microlens50k.flags --data_dir=$R/sim/data \\
        --model_dir=$R/qin --epochs=12 --patience=3 --monitor_splits=test --log_every_steps=0
    python -m qin_tf.train --flagfile=configs/microlens50k.flags --data_dir=$R/sim/data \\
        --model_dir=$R/qin_no_mm --use_mm_vector=false --epochs=12 --patience=3 --monitor_splits=test \\
        --log_every_steps=0
    python -m export.exporter --model_dir=$R/qin --export_base=$R/export_qin --data_dir=$R/sim/data
    python -m export.exporter --model_dir=$R/qin_no_mm --export_base=$R/export_qin_no_mm \\
        --data_dir=$R/sim/data                  # (or leave it to evaluate: it exports into an empty base)
    python scripts/refresh_simulation.py evaluate --full_examples=$R/full_examples \\
        --removed=$R/sim/removed_items.txt --config=configs/logs/microlens50k.json \\
        --model_dirs=$R/qin,$R/qin_no_mm --export_base=$R/export_qin,$R/export_qin_no_mm \\
        --split=test --output=$R/results.json

Errors (a bad flag, a missing file, an existing output) are one line on
stderr and exit status 1; nothing is left half written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import tempfile
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from pipelines import build_examples as be  # noqa: E402  (imports Beam quietly)
from pipelines import beamio, log_readers, vocabularies  # noqa: E402
from pipelines.logs_config import LogsConfig, LogsConfigError, Source  # noqa: E402
from qin_tf.rows import PreprocessError, one_line  # noqa: E402

COMMANDS = ("prepare", "evaluate")
REMOVED_FILENAME = "removed_items.txt"
CONFIG_FILENAME = "logs_config.json"
SUMMARY_FILENAME = "prepare.json"
RAW_DIR = "raw"
PARTS = ("removed", "kept")
VERSIONS = ("as_trained", "refreshed")


def _define_flags() -> None:
    """Defines the command line flags: only when the script runs as a program, so its functions import
    anywhere (the tests) beside other modules' absl flags of the same names (``--seed``, ``--output_dir``)."""
    global _CONFIG, _FRACTION, _SEED, _OUTPUT_DIR, _FULL, _REMOVED, _MODELS, _EXPORTS  # noqa: PLW0603
    global _SPLIT, _NEW_LEVEL, _BATCH, _OUTPUT, _OVERWRITE  # noqa: PLW0603
    _CONFIG = flags.DEFINE_string("config", None, "The log config (pipelines/logs_config.py): prepare reduces its "
                                  "inputs; evaluate reads its catalog (the full one) and its popularity level name.")
    _FRACTION = flags.DEFINE_float("fraction", 0.1, "prepare: the fraction of the log's catalog items removed, "
                                   "in (0, 1).")
    _SEED = flags.DEFINE_integer("seed", 0, "prepare: the seed of the random choice of removed items.")
    _OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "prepare: where the reduced inputs, removed_items.txt and "
                                      "logs_config.json go (refused when it exists, unless --overwrite).")
    _FULL = flags.DEFINE_string("full_examples", None, "evaluate: the build_examples output of the full (unreduced) "
                                "log config.")
    _REMOVED = flags.DEFINE_string("removed", None, "evaluate: removed_items.txt written by prepare.")
    _MODELS = flags.DEFINE_list("model_dirs", None, "evaluate: training runs (best.keras, feature_spec.json) "
                                "trained on the reduced build.")
    _EXPORTS = flags.DEFINE_list("export_base", None, "evaluate: one export base per model dir (exported here when "
                                 "it has no version); the refreshed version is written there.")
    _SPLIT = flags.DEFINE_string("split", "test", "evaluate: the full build's split to score.")
    _NEW_LEVEL = flags.DEFINE_enum("new_item_level", "zero", ["zero", "full"], "evaluate: the popularity level of "
                                   "rows whose target is removed: zero (unseen in training) or the full build's.")
    _BATCH = flags.DEFINE_integer("batch_size", 8192, "evaluate: rows per scoring batch.", lower_bound=1)
    _OUTPUT = flags.DEFINE_string("output", None, "evaluate: the results JSON (refused when it exists, unless "
                                  "--overwrite).")
    _OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace an existing --output_dir / --output.")


class SimulationError(ValueError):
    """Bad arguments or inputs of the simulation (one line)."""


# --------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------


def _parsed(value, cfg: LogsConfig, column: str):
    """The raw id as build_examples parses it, or None where it would be a bad row (kept: the build reports it)."""
    try:
        return log_readers.parse_id(value, cfg.id_dtype, column)
    except log_readers.BadValue:
        return None


def _sequence_items(line: str, src: Source) -> tuple[str, list[str]]:
    """``(user, item tokens)`` of a ``sequences`` line, split as ``build_examples`` splits it."""
    user, _, rest = line.partition(src.delimiter)
    items = rest.split(src.item_delimiter) if src.item_delimiter.strip() else rest.split()
    return user, [x for x in items if x.strip()]


def _column_values(path: str, src: Source, column: str):
    for _, values in log_readers.read_rows(path, src, [column]):
        if not isinstance(values, log_readers.BadValue):
            yield values[column]


def log_items(cfg: LogsConfig) -> set:
    """The raw items of every event of the log."""
    src, out = cfg.events.source, set()
    for path in log_readers.match_files(src, "the event log"):
        if src.format == "sequences":
            with beamio.open_read(path) as raw:
                for line in io.TextIOWrapper(raw, encoding="utf-8"):
                    out.update(_parsed(x, cfg, cfg.events.item) for x in _sequence_items(line.rstrip("\r\n"), src)[1])
        else:
            out.update(_parsed(v, cfg, cfg.events.item) for v in _column_values(path, src, cfg.events.item))
    out.discard(None)
    return out


def catalog_items(cfg: LogsConfig) -> set:
    """The raw items of the catalog's rows."""
    out = set()
    for path in log_readers.match_files(cfg.catalog.source, "the item catalog"):
        out.update(_parsed(v, cfg, cfg.catalog.item) for v in _column_values(path, cfg.catalog.source,
                                                                              cfg.catalog.item))
    out.discard(None)
    return out


def choose_removed(candidates, fraction: float, seed: int) -> list:
    """``round(fraction * n)`` of the candidates (at least 1), drawn without replacement; sorted by raw id."""
    if not 0.0 < fraction < 1.0:
        raise SimulationError(f"`fraction` must be in (0, 1). Received: fraction={fraction}")
    order = sorted(candidates, key=log_readers.raw_key)
    if len(order) < 2:
        raise SimulationError(f"only {len(order)} candidate item(s) to remove from; need at least 2")
    n = min(len(order) - 1, max(1, round(fraction * len(order))))
    picked = np.random.default_rng(seed).choice(len(order), size=n, replace=False)
    return sorted((order[i] for i in picked), key=log_readers.raw_key)


def _out_paths(files: list[str], directory: str) -> list[str]:
    """One output path per input file in ``directory``: the base name, prefixed by its index when names repeat."""
    names = [os.path.basename(f) for f in files]
    if len(set(names)) < len(names):
        names = [f"{i:03d}_{n}" for i, n in enumerate(names)]
    return [os.path.join(directory, n) for n in names]


def filter_source(src: Source, key: str, cfg: LogsConfig, removed: set, directory: str, what: str) -> dict:
    """Writes each file of ``src`` to ``directory`` without the rows (events) whose ``key`` is in ``removed``.

    Returns ``{"files": output paths, "rows_in", "rows_removed"}`` (for
    ``sequences``: events; a line left without items is dropped and counted
    in ``users_removed``).
    """
    import pyarrow.parquet as pq

    files = log_readers.match_files(src, what)
    outs = _out_paths(files, directory)
    os.makedirs(directory, exist_ok=True)
    stats = {"files": outs, "rows_in": 0, "rows_removed": 0}
    for path, out in zip(files, outs):
        if src.format == "parquet":
            pf = pq.ParquetFile(path if beamio.is_local(path) else beamio.open_read(path))
            with pq.ParquetWriter(out, pf.schema_arrow) as writer:
                for batch in pf.iter_batches(batch_size=65536, use_threads=False):
                    keep = np.asarray([_parsed(v, cfg, key) not in removed
                                       for v in batch.column(key).to_pylist()], dtype=bool)
                    stats["rows_in"] += batch.num_rows
                    stats["rows_removed"] += int((~keep).sum())
                    writer.write_batch(batch.filter(keep))
            continue
        with beamio.open_read(path) as raw, open(out, "w", encoding="utf-8", newline="") as dst:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            if src.format == "sequences":
                stats.setdefault("users_removed", 0)
                joiner = src.item_delimiter or " "
                for line in text:
                    line = line.rstrip("\r\n")
                    if not line.strip():
                        continue
                    user, items = _sequence_items(line, src)
                    kept = [x for x in items if _parsed(x, cfg, key) not in removed]
                    stats["rows_in"] += len(items)
                    stats["rows_removed"] += len(items) - len(kept)
                    if kept or not items:  # a line without items stays a bad row for the build to report
                        dst.write(f"{user}{src.delimiter}{joiner.join(kept)}\n")
                    else:
                        stats["users_removed"] += 1
            elif src.format == "jsonl":
                for line in text:
                    try:
                        obj = json.loads(line) if line.strip() else None
                    except json.JSONDecodeError:
                        obj = None
                    value = obj.get(key) if isinstance(obj, dict) else None
                    stats["rows_in"] += bool(line.strip())
                    if value is not None and _parsed(value, cfg, key) in removed:
                        stats["rows_removed"] += 1
                    else:
                        dst.write(line if line.endswith("\n") else line + "\n")
            else:  # csv
                reader, writer = csv.reader(text, delimiter=src.delimiter), csv.writer(
                    dst, delimiter=src.delimiter, lineterminator="\n")
                index = None if src.header else int(key)  # no header: columns are named by position
                if src.header:
                    header = next(reader, None) or []
                    if key not in header:
                        raise PreprocessError(f"{path}: no column `{key}` (the header has {header})")
                    index = header.index(key)
                    writer.writerow(header)
                for fields in reader:
                    if not fields:
                        continue
                    stats["rows_in"] += 1
                    value = fields[index] if index < len(fields) and fields[index] != "" else None
                    if value is not None and _parsed(value, cfg, key) in removed:
                        stats["rows_removed"] += 1
                    else:
                        writer.writerow(fields)
    return stats


def _absolute(files, base: str):
    files = [files] if isinstance(files, str) else list(files)
    return [f if "://" in f or os.path.isabs(f) else os.path.normpath(os.path.join(base, f)) for f in files]


def reduced_config(config_path: str, paths: dict) -> dict:
    """The log config's JSON with the reduced files (``paths``: events / catalog / vectors) and every other
    path made absolute."""
    with open(config_path) as f:
        d = json.load(f)
    base = os.path.dirname(os.path.abspath(config_path))
    d["name"] = f"{d['name']}_reduced"
    d["events"]["files"] = paths["events"]
    if d.get("catalog") is not None:
        d["catalog"]["files"] = paths["catalog"]
        v = d["catalog"].get("vector")
        if isinstance(v, dict) and "files" in v:
            v["files"] = paths["vectors"]
    if d.get("users") is not None:
        d["users"]["files"] = _absolute(d["users"]["files"], base)
    return d


def _check_new_dir(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise SimulationError(f"{path}: already exists; pass --overwrite to replace it")
    if os.path.exists(path) and not os.path.isdir(path):
        raise SimulationError(f"{path}: exists and is not a directory")


def prepare(config_path: str, output_dir: str, *, fraction: float = 0.1, seed: int = 0,
            overwrite: bool = False) -> dict:
    """Writes the reduced inputs, ``removed_items.txt`` and ``logs_config.json``; see the module docstring.

    Returns the summary written to ``prepare.json``.
    """
    cfg = LogsConfig.load(config_path)
    _check_new_dir(output_dir, overwrite)
    items = log_items(cfg)
    candidates = items & catalog_items(cfg) if cfg.catalog is not None else items
    removed = choose_removed(candidates, fraction, seed)
    removed_set = set(removed)
    output_dir = os.path.abspath(output_dir)
    work = f"{output_dir}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        raw = os.path.join(work, RAW_DIR)
        ev = filter_source(cfg.events.source, cfg.events.item, cfg, removed_set, os.path.join(raw, "events"),
                           "the event log")
        stats = {"config": os.path.abspath(config_path), "fraction": fraction, "seed": seed,
                 "log_items": len(items), "candidates": len(candidates), "removed_items": len(removed),
                 "events": {k: v for k, v in ev.items() if k != "files"}}
        final = {"events": [os.path.join(output_dir, os.path.relpath(f, work)) for f in ev["files"]]}
        if cfg.catalog is not None:
            cat = filter_source(cfg.catalog.source, cfg.catalog.item, cfg, removed_set,
                                os.path.join(raw, "catalog"), "the item catalog")
            stats["catalog"] = {k: v for k, v in cat.items() if k != "files"}
            final["catalog"] = [os.path.join(output_dir, os.path.relpath(f, work)) for f in cat["files"]]
            vec = cfg.catalog.vector
            if vec is not None and vec.source is not None:
                vs = filter_source(vec.source, vec.item, cfg, removed_set, os.path.join(raw, "vectors"),
                                   "the item vectors")
                stats["vectors"] = {k: v for k, v in vs.items() if k != "files"}
                final["vectors"] = [os.path.join(output_dir, os.path.relpath(f, work)) for f in vs["files"]]
        with open(os.path.join(work, REMOVED_FILENAME), "w", encoding="utf-8") as f:
            f.write("".join(f"{x}\n" for x in removed))
        with open(os.path.join(work, CONFIG_FILENAME), "w") as f:
            json.dump(reduced_config(config_path, final), f, indent=2)
            f.write("\n")
        with open(os.path.join(work, SUMMARY_FILENAME), "w") as f:
            json.dump(stats, f, indent=2)
            f.write("\n")
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.rename(work, output_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return stats


def read_removed(path: str, dtype: str) -> set:
    """The raw ids of ``removed_items.txt`` (ints for ``int64`` vocabularies)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")[:-1]
    except FileNotFoundError:
        raise SimulationError(f"{path}: no such file (prepare writes removed_items.txt)") from None
    if dtype != "int64":
        return set(lines)
    out = set()
    for row, x in enumerate(lines):
        try:
            out.add(int(x))
        except ValueError:
            raise SimulationError(f"{path}: row {row}: not an int64 id: {x!r}") from None
    return out


# --------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------


def raw_split_rows(examples_dir: str, split: str, removed: set, *, level_name: str | None = None,
                   new_item_level: str = "zero"):
    """The split's rows of a ``build_examples`` output with raw ids, and their parts.

    Returns ``(rows, masks)``: ``rows`` a list of dicts (the target, the
    history oldest first, the context values, label and meta; dense ids
    mapped through the output's vocabularies, the OOV id to a raw id that no
    vocabulary has), ``masks`` ``{"removed", "kept", "untouched"}`` boolean
    arrays (``untouched``: kept rows with no removed item in the history).
    With ``new_item_level="zero"`` a removed row's ``level_name`` context is 0.
    """
    import pyarrow.parquet as pq

    from qin_tf.spec import DatasetConfig

    cfg_path = os.path.join(examples_dir, be.DATASET_CONFIG_FILENAME)
    if not os.path.exists(cfg_path):
        raise SimulationError(f"{examples_dir}: no {be.DATASET_CONFIG_FILENAME}; --full_examples is the "
                              "output_dir of pipelines.build_examples on the full log config")
    cfg = DatasetConfig.load(cfg_path)
    if split not in cfg.splits:
        raise SimulationError(f"{cfg_path}: no split `{split}`; it has {sorted(cfg.splits)}")
    tables = {}
    for name, v in cfg.vocabularies.items():
        words = vocabularies.read_vocab(os.path.join(examples_dir, v["path"]), v.get("dtype", "string"))
        if v.get("dtype", "string") == "int64":
            unknown = max([*words, *(x for x in removed if isinstance(x, int)), 0]) + 1
        else:
            unknown = "\x00unknown"
        tables[name] = (["", unknown] + words, unknown)
    item_key = cfg.target_item if cfg.target_item in tables else "item_id"
    if item_key not in tables:
        raise SimulationError(f"{cfg_path}: no item vocabulary; the build must be of raw ids (build_examples)")
    items, unknown = tables[item_key]

    def item(d):
        return items[d] if 2 <= d < len(items) else unknown

    table = pq.read_table(os.path.join(examples_dir, cfg.splits[split].file))
    cols = table.to_pydict()
    n = table.num_rows
    rows, removed_mask, touched = [], np.zeros(n, bool), np.zeros(n, bool)
    for i in range(n):
        target = item(cols[cfg.target_item][i])
        history = [item(d) for d in cols[cfg.sequence][i] if d != 0]
        row = {cfg.target_item: target, cfg.sequence: history}
        for c in cfg.context:
            value = cols[c][i]
            if c in tables:
                words, unk = tables[c]
                value = words[value] if 2 <= value < len(words) else unk
            row[c] = value
        row[cfg.label] = cols[cfg.label][i]
        for m in cfg.meta:
            row[m] = cols[m][i]
        removed_mask[i] = target in removed
        touched[i] = removed_mask[i] or any(x in removed for x in history)
        if removed_mask[i] and new_item_level == "zero" and level_name in cfg.context:
            row[level_name] = 0
        rows.append(row)
    masks = {"removed": removed_mask, "kept": ~removed_mask, "untouched": ~touched}
    return rows, masks, cfg


def _training_data_dir(model_dir: str) -> str | None:
    """The run's ``--data_dir`` (its ``config.json``) when it still holds a feature spec: real warmup rows."""
    from qin_tf.spec import SPEC_FILENAME
    from qin_tf.task import CONFIG_FILENAME

    try:
        with open(os.path.join(model_dir, CONFIG_FILENAME)) as f:
            data_dir = json.load(f).get("train", {}).get("data_dir")
    except (OSError, ValueError):
        return None
    return data_dir if data_dir and os.path.exists(os.path.join(data_dir, SPEC_FILENAME)) else None


def _trained_version(model_dir: str, export_base: str, log) -> str:
    """The newest version of ``export_base`` serving the training run's own item vocabulary (exported when
    the base has no version)."""
    from export import exporter, refresh_catalog as rc
    from qin_tf.spec import SPEC_FILENAME, FeatureSpec

    spec = FeatureSpec.load(model_dir)
    key = spec.vocabulary_key(spec.target_item)
    if key is None:
        raise SimulationError(f"{model_dir}: its feature spec has no item vocabulary (not a raw-id build)")
    trained = spec.read_vocabulary(key)
    if not os.path.isdir(export_base) or not exporter.servable_versions(export_base):
        path = exporter.export_from_model_dir(model_dir, export_base, data_dir=_training_data_dir(model_dir))
        log(f"exported {model_dir} -> {path}")
        return path
    for v in reversed(exporter.servable_versions(export_base)):
        version_dir = os.path.join(export_base, str(v))
        served = FeatureSpec.load(os.path.join(version_dir, "assets", SPEC_FILENAME))
        if rc._read_lines(rc.export_vocabulary_path(version_dir, served, key)) == trained:
            return version_dir
    raise SimulationError(f"{export_base}: no version serves {model_dir}'s item vocabulary as trained "
                          "(was it exported from another run?)")


def _part_metrics(result: dict, labels: np.ndarray) -> dict:
    out = {"rows": int(len(labels)), "positives": int(labels.sum())}
    one_class = labels.sum() in (0, len(labels))
    out["auc"] = None if one_class else round(float(result["auc"]), 6)
    out["logloss"] = round(float(result["logloss"]), 6) if "logloss" in result else None
    return out


def evaluate(full_examples: str, removed_path: str, config_path: str, model_dirs, export_bases, *,
             split: str = "test", new_item_level: str = "zero", batch_size: int = 8192, log=None,
             emit=None) -> dict:
    """Scores the full build's rows by part, as trained and refreshed; see the module docstring."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from export import refresh_catalog as rc
    from export import score as scoring

    log = log or (lambda line: None)
    emit = emit or (lambda obj: None)
    if len(model_dirs) != len(export_bases):
        raise SimulationError(f"--model_dirs has {len(model_dirs)} entries, --export_base {len(export_bases)}; "
                              "pass one export base per model dir")
    cfg = LogsConfig.load(config_path)
    if cfg.catalog is None:
        raise SimulationError(f"{config_path}: no `catalog` section to refresh the catalog from")
    removed = read_removed(removed_path, cfg.id_dtype)
    rows, masks, dcfg = raw_split_rows(full_examples, split, removed, level_name=cfg.popularity_level,
                                       new_item_level=new_item_level)
    labels = np.asarray([r[dcfg.label] for r in rows], np.int64)
    catalog = log_readers.read_catalog(cfg)
    missing = sorted((x for x in removed if x not in catalog), key=log_readers.raw_key)
    if missing:
        raise SimulationError(f"{removed_path}: {len(missing)} removed item(s) lack a row in the catalog of "
                              f"{config_path} (first {missing[0]!r}); pass the full log config")
    out = {"full_examples": os.path.abspath(full_examples), "removed": os.path.abspath(removed_path),
           "config": os.path.abspath(config_path), "split": split, "new_item_level": new_item_level,
           "removed_items": len(removed), "rows": {p: {"rows": int(masks[p].sum()),
                                                       "positives": int(labels[masks[p]].sum())}
                                                   for p in PARTS},
           "results": [], "checks": []}
    out["rows"]["kept_without_removed_items"] = {"rows": int(masks["untouched"].sum()),
                                                 "positives": int(labels[masks["untouched"]].sum())}
    scratch = tempfile.mkdtemp(prefix="refresh_sim_")
    try:
        files = {}
        for part in PARTS:
            files[part] = os.path.join(scratch, f"{part}.parquet")
            pq.write_table(pa.Table.from_pylist([r for r, m in zip(rows, masks[part]) if m]), files[part])
        for model_dir, base in zip(model_dirs, export_bases):
            versions = {"as_trained": _trained_version(model_dir, base, log)}
            versions["refreshed"] = rc.refresh_catalog(model_dir, base, catalog, log=log)
            kept_scores = {}
            for version, version_dir in versions.items():
                for part in PARTS:
                    if not masks[part].any():
                        continue
                    result = scoring.score(version_dir, files[part], raw_ids=True, batch_size=batch_size,
                                           log=log)
                    line = {"model_dir": model_dir, "version": version, "version_dir": version_dir,
                            "part": part, **_part_metrics(result, labels[masks[part]])}
                    out["results"].append(line)
                    emit(line)
                    if part == "kept":
                        kept_scores[version] = result["scores"]
            untouched = masks["untouched"][masks["kept"]]
            a, b = kept_scores["as_trained"][untouched], kept_scores["refreshed"][untouched]
            check = {"model_dir": model_dir, "check": "kept_rows_without_removed_items_bitwise_equal",
                     "rows": int(untouched.sum()), "equal": bool(np.array_equal(a, b)),
                     "max_abs_diff": float(np.max(np.abs(a - b))) if len(a) else 0.0}
            out["checks"].append(check)
            emit(check)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _require(**values) -> None:
    missing = [f"--{k}" for k, v in values.items() if not v]
    if missing:
        raise SimulationError(f"{_COMMAND} needs {', '.join(missing)}")


_COMMAND = ""


def main(argv):
    global _COMMAND
    if len(argv) != 2 or argv[1] not in COMMANDS:
        sys.exit(f"refresh_simulation: error: give one command, `prepare` or `evaluate`. Received: {argv[1:]}")
    _COMMAND = argv[1]
    from export.exporter import ExportError
    from qin_tf.spec import SpecError

    try:
        if _COMMAND == "prepare":
            _require(config=_CONFIG.value, output_dir=_OUTPUT_DIR.value)
            stats = prepare(_CONFIG.value, _OUTPUT_DIR.value, fraction=_FRACTION.value, seed=_SEED.value,
                            overwrite=_OVERWRITE.value)
            print(json.dumps({"output_dir": os.path.abspath(_OUTPUT_DIR.value), **stats}))
            return
        _require(full_examples=_FULL.value, removed=_REMOVED.value, config=_CONFIG.value,
                 model_dirs=_MODELS.value, export_base=_EXPORTS.value, output=_OUTPUT.value)
        if os.path.exists(_OUTPUT.value) and not _OVERWRITE.value:
            raise SimulationError(f"{_OUTPUT.value}: already exists; pass --overwrite to replace it")
        from qin_tf.runtime import import_tensorflow

        import_tensorflow()
        result = evaluate(_FULL.value, _REMOVED.value, _CONFIG.value, _MODELS.value, _EXPORTS.value,
                          split=_SPLIT.value, new_item_level=_NEW_LEVEL.value, batch_size=_BATCH.value,
                          emit=lambda obj: print(json.dumps(obj), flush=True))
        _write_json(_OUTPUT.value, result)
    except (SimulationError, PreprocessError, LogsConfigError, SpecError, ExportError, OSError) as e:
        sys.exit(f"refresh_simulation: error: {one_line(e)}")


if __name__ == "__main__":
    from qin_tf.runtime import run_app

    _define_flags()
    run_app(main)
