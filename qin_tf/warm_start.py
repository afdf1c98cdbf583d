"""Warm start: a fresh run starts from an earlier run's weights (``--warm_start_from=MODEL_DIR`` or an export).

The daily cycle trains on today's build, starting from yesterday's model.
Keras 3 has no ``warmstart_embedding_matrix``; this module grows the tables:

1. The new model is built fresh from the NEW feature spec, with the run's
   seed (:func:`qin_tf.task.run` seeds, builds, then calls :func:`apply`), so
   a row nothing maps to keeps exactly the initialisation a fresh model gives
   it.
2. Every weight of the source model (``MODEL_DIR/best.keras``) is loaded BY
   NAME (its path, layer path + variable name, e.g.
   ``qnn/quadratic_0/kernel``), never by position.
3. Tables sized by the spec (the item ids' ``item_embedding/id_embeddings``,
   the tags' ``item_embedding/tag_embeddings``, each context feature's block
   of ``context_embedding/embeddings``) are copied row by row, bitwise: new
   row ``r`` takes the old row of the same raw id. When both specs name a
   vocabulary file for the feature (``FeatureSpec.vocabularies``; line ``n``
   is dense id ``n + 2``), the map is new dense id -> raw id -> old dense id,
   right even if the ids were renumbered; padding (0) and OOV (1) map to
   themselves, and a context feature's out-of-vocabulary row (index
   ``vocab_size`` of its block) to the old one. Without vocabulary files (the
   challenge layout: ids used as given) row ``i`` maps to row ``i``. A row
   of a new id keeps its fresh initialisation; an old row whose raw id
   vanished (or beyond a table that shrank) is dropped. Both are counted.
4. The frozen item table (``item_embedding/item_tags``,
   ``item_embedding/item_multimodal``) keeps the NEW catalog's values, which
   the build loaded; the old one is never copied.
5. Every other weight must exist on both sides with the same shape, and the
   two runs' model configs must agree on what shapes weights; otherwise the
   spec or config is incompatible and :class:`WarmStartError` says, in one
   line, what differs. :func:`load_source` checks this before the run writes
   anything, against a model built from the new spec with its tables cut to
   a row or two.
6. The optimizer starts fresh (Adam's moments at zero, its iteration count
   at 0) and the learning-rate schedule starts from the config: only the
   model's weights carry over.

The run records what it started from in ``model_dir/warm_start.json``:
the source directory, the sha256 of its ``best.keras`` bytes, and per table
the rows copied, new and dropped (:func:`write_record`). Warm start applies only to
a run that starts fresh: a run resumed from ``backup/`` already holds the
warm-started (and trained) weights and ignores the flag.

``--warm_start_from`` may also be an export: a SavedModel version directory,
or a TF Serving base (its newest version, the one TF Serving serves, e.g.
``--warm_start_from=SERVING``). The folded inference graph is not the
training model, so the run starts from the training run the version was
exported from: the ``model_dir`` its fingerprint file records
(:mod:`qin_tf.fingerprint`; ``export.refresh_catalog`` records the run it
refreshed from). It is refused, in one line naming the version, when the
version has no fingerprint file or no ``model_dir`` in it (exported before
it was recorded, or an ensemble), when that ``model_dir`` is gone or not a
finished run, or when the fingerprint recomputed from its ``best.keras`` and
feature spec differs from the version's (retrained since the export). The
record then also names the export and its version (``export``,
``export_version``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import keras
import numpy as np

from qin_tf import fileio
from qin_tf.config import ExperimentConfig, ModelConfig
from qin_tf.fingerprint import FingerprintError, model_fingerprint, read_fingerprint
from qin_tf.layers import ContextEmbedding, ItemEmbedding
from qin_tf.model import build_model
from qin_tf.signatures import FINGERPRINT_PATH, MODEL_FILENAME
from qin_tf.spec import OOV_ID, PADDING_ID, RAW_ID_RULE, SPEC_FILENAME, FeatureSpec, SpecError, first_bad_raw_id

#: What a warm-started run writes into its model_dir.
WARM_START_FILENAME = "warm_start.json"
#: The files of a training run's model_dir that a warm start reads (qin_tf.task writes them).
CONFIG_FILENAME = "config.json"
#: The key of the tag vocabulary in ``FeatureSpec.vocabularies`` (pipelines.build_examples writes it;
#: export.refresh_catalog.TAG_VOCABULARY names it too).
TAG_VOCABULARY = "tags"
#: Dense id of a vocabulary file's first line (0 is padding, 1 OOV).
FIRST_VOCAB_ID = 2
#: ModelConfig fields that shape weights; named in the error when the weights do not match.
SHAPING_FIELDS = ("embedding_dim", "num_layers", "num_row", "batch_norm", "attention_dim", "din_attention_units",
                  "din_dnn_units", "transformer_layers", "transformer_heads", "transformer_ff_units",
                  "transformer_last_k", "cross_layers", "cross_projection_dim", "head_mlp_units",
                  "head_input_batch_norm", "asta_form")


class WarmStartError(ValueError):
    """The warm start cannot go on; one line says why (the training CLI exits with status 1)."""


@dataclasses.dataclass(frozen=True)
class Source:
    """An earlier run's model, read into memory: what :func:`apply` copies from."""

    model_dir: str
    spec: FeatureSpec
    config: ModelConfig
    #: Variable path -> value, every weight of ``best.keras``.
    weights: dict
    #: sha256 hex of the ``best.keras`` bytes.
    sha256: str
    #: The export passed as ``--warm_start_from`` (absolute), whose fingerprint named ``model_dir``; "" if none.
    export: str = ""
    #: The export's version that was read (the newest of a base); None if none.
    export_version: int | None = None


@dataclasses.dataclass(frozen=True)
class _Origin:
    """What an export's fingerprint file says about the training run it came from."""

    path: str
    version_dir: str
    version: int | None
    model_dir: str
    source_fingerprint: str


# --------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------


def _versions(path: str) -> list[int]:
    """The numbered version directories of ``path`` holding a ``saved_model.pb``, ascending."""
    g = fileio.gfile()
    try:
        names = [n.rstrip("/") for n in g.listdir(path)]
    except Exception:  # noqa: BLE001  (not a directory: the caller says so)
        return []
    return sorted(int(n) for n in names if n.isdigit() and g.exists(os.path.join(path, n, "saved_model.pb")))


def _is_export(path: str) -> bool:
    """A SavedModel version directory, or a base directory of numbered versions."""
    return fileio.gfile().exists(os.path.join(path, "saved_model.pb")) or bool(_versions(path))


def _origin(path: str) -> _Origin:
    """The training run export ``path`` (a version directory, or a base: its newest version) came from."""
    if fileio.gfile().exists(os.path.join(path, "saved_model.pb")):
        name = os.path.basename(path.rstrip("/"))
        version_dir, version = path, int(name) if name.isdigit() else None
    else:
        version = _versions(path)[-1]  # the one TF Serving serves
        version_dir = os.path.join(path, str(version))
    try:
        record = read_fingerprint(version_dir)
    except FingerprintError as e:
        raise WarmStartError(f"warm start: {e}") from None
    if record is None:
        raise WarmStartError(f"warm start: {version_dir} is an export without {FINGERPRINT_PATH}, so it does not "
                             f"record the training run it came from: pass that run's --model_dir.")
    if not record.get("model_dir"):
        raise WarmStartError(f"warm start: {version_dir} is an export whose {FINGERPRINT_PATH} records no "
                             f"model_dir (exported before it was recorded, or an ensemble): pass the --model_dir "
                             f"of the training run it came from.")
    return _Origin(path=fileio.absolute(path), version_dir=version_dir, version=version,
                   model_dir=record["model_dir"], source_fingerprint=record["source"])


def _inside(path: str, directory: str) -> bool:
    path, directory = fileio.absolute(path).rstrip("/"), fileio.absolute(directory).rstrip("/")
    return path == directory or path.startswith(directory + "/")


def _check_run_dir(path: str, model_dir: str, origin: _Origin | None) -> None:
    """Refuses unless ``path`` (``--warm_start_from``, or with ``origin`` the run that export came from) is a
    finished run's directory; the new ``model_dir`` may not be inside the run an export came from."""
    g = fileio.gfile()
    made = f"{origin.version_dir} was exported from {path}, which" if origin is not None else ""
    if origin is not None and model_dir and _inside(model_dir, path):
        raise WarmStartError(f"warm start: --model_dir={model_dir} is inside {path}, the run {origin.version_dir} "
                             f"was exported from; the new run writes into another directory.")
    if origin is not None and not g.isdir(path):
        raise WarmStartError(f"warm start: {made} is gone; pass the --model_dir of a finished run.")
    for name in (MODEL_FILENAME, CONFIG_FILENAME, SPEC_FILENAME):
        if not g.exists(os.path.join(path, name)):
            lacks = f"{made} holds no {name}" if made else f"{path}: no {name} here"
            raise WarmStartError(f"warm start: {lacks}, so not a finished training run; --warm_start_from is the "
                                 f"--model_dir of a run that finished, or an export of one.")


def load_source(path: str, spec: FeatureSpec, config: ModelConfig, *, model_dir: str = "") -> Source:
    """Reads the run in ``path`` (or the run an export in ``path`` came from) and checks that ``spec``
    and ``config`` can start from it.

    Nothing is written. Call it before the run writes ``model_dir`` (a
    refusal then leaves nothing behind).

    Args:
        path: an earlier run's ``model_dir`` (``best.keras``, ``config.json``,
            ``feature_spec.json``), or an export of one: a version directory,
            or a TF Serving base (its newest version), whose fingerprint file
            names that ``model_dir``.
        spec: the new run's feature spec.
        config: the new run's model config.
        model_dir: the new run's model_dir; it may not be (inside) ``path`` or
            the run ``path`` was exported from.

    Raises:
        WarmStartError: ``path`` is not a finished run, or an export that
            does not name one or whose run changed since (the fingerprint
            differs), or the spec or model config is incompatible (the
            message says what differs).
    """
    g = fileio.gfile()
    if model_dir and _inside(model_dir, path):
        raise WarmStartError(f"warm start: --model_dir={model_dir} is inside --warm_start_from={path}; the new "
                             f"run writes into another directory than the one it starts from.")
    if not g.isdir(path):
        raise WarmStartError(f"warm start: {path}: no such directory; --warm_start_from is the --model_dir of an "
                             f"earlier training run, or an export of one.")
    origin = _origin(path) if _is_export(path) else None
    run_dir = origin.model_dir if origin is not None else path
    _check_run_dir(run_dir, model_dir, origin)
    try:
        old_spec = FeatureSpec.load(run_dir)
        old_config = ExperimentConfig.from_dict(fileio.read_json(os.path.join(run_dir, CONFIG_FILENAME))).model
    except (SpecError, ValueError, TypeError) as e:
        raise WarmStartError(f"warm start: {run_dir}: {e}") from None
    # An export: first whether run_dir still holds the run it came from, then whether it fits.
    loaded = _load_weights(run_dir, old_spec, origin) if origin is not None else None
    _check_spec(spec, old_spec, run_dir)
    _check_vocabularies(spec, old_spec, run_dir)
    _check_config(config, old_config, run_dir)
    weights, sha256 = loaded or _load_weights(run_dir, old_spec, None)
    source = Source(model_dir=fileio.absolute(run_dir), spec=old_spec, config=old_config, weights=weights,
                    sha256=sha256, export=origin.path if origin is not None else "",
                    export_version=origin.version if origin is not None else None)
    _check_weights(_shapes_and_roles(spec, config), source, config)
    return source


def _check_vocabularies(spec: FeatureSpec, old_spec: FeatureSpec, where: str) -> None:
    """Reads both specs' vocabularies (checking them) before anything is written."""
    for _, key_new, key_old in _vocabulary_keys(spec, old_spec):
        if key_new is not None:  # both or neither (_check_spec)
            if (spec.vocabularies[key_new].get("dtype", "string")
                    != old_spec.vocabularies[key_old].get("dtype", "string")):
                raise WarmStartError(f"warm start: vocabulary `{key_new}` holds "
                                     f"{spec.vocabularies[key_new].get('dtype', 'string')} raw ids in the new "
                                     f"spec, {old_spec.vocabularies[key_old].get('dtype', 'string')} in {where}'s.")
            vocabulary(spec, key_new), vocabulary(old_spec, key_old)


def _load_weights(run_dir: str, old_spec: FeatureSpec, origin: _Origin | None) -> tuple[dict, str]:
    """``({path: value}, sha256 of the bytes)`` of ``run_dir/best.keras``; with ``origin``, refused unless
    its :func:`~qin_tf.fingerprint.model_fingerprint` is the one the export recorded."""
    model_path = os.path.join(run_dir, MODEL_FILENAME)
    sha256 = hashlib.sha256(fileio.read_bytes(model_path)).hexdigest()
    try:
        old = keras.saving.load_model(model_path, compile=False)
    except Exception as e:  # noqa: BLE001  (a damaged file: say which, in one line)
        raise WarmStartError(f"warm start: {model_path} does not load: "
                             f"{' '.join(str(e).split())[:300]}") from None
    if origin is not None:
        try:
            now = model_fingerprint(old, old_spec)
        except OSError as e:
            raise WarmStartError(f"warm start: {run_dir}: cannot recompute its fingerprint: {e}") from None
        if now != origin.source_fingerprint:
            raise WarmStartError(f"warm start: {origin.version_dir} was exported from {run_dir}, whose model "
                                 f"(fingerprint {now[:16]}) is not the one exported (fingerprint "
                                 f"{origin.source_fingerprint[:16]}); retrained since that export? Pass the "
                                 f"--model_dir itself to start from its current model.")
    weights = {v.path: keras.ops.convert_to_numpy(v) for v in old.weights}
    if len(weights) != len(old.weights):
        raise WarmStartError(f"warm start: {model_path}: two weights share a path; cannot load by name.")
    return weights, sha256


def _check_spec(new: FeatureSpec, old: FeatureSpec, where: str) -> None:
    for name in new.context:
        if name not in old.context:
            raise WarmStartError(f"warm start: feature `{name}` is in the new spec but not in {where}'s.")
    for name in old.context:
        if name not in new.context:
            raise WarmStartError(f"warm start: feature `{name}` is in {where}'s spec but not in the new one.")
    if tuple(new.context) != tuple(old.context):
        raise WarmStartError(f"warm start: the context features are in another order than in {where}'s spec "
                             f"({', '.join(new.context)} vs {', '.join(old.context)}).")
    if new.mm_dim != old.mm_dim:
        raise WarmStartError(f"warm start: the multimodal vectors are {new.mm_dim} wide in the new spec, "
                             f"{old.mm_dim} in {where}'s.")
    for label, key_new, key_old in _vocabulary_keys(new, old):
        if (key_new is None) != (key_old is None):
            has, lacks = ("the new spec", f"{where}'s") if key_new is not None else (f"{where}'s", "the new spec")
            raise WarmStartError(f"warm start: {label} has a vocabulary file in {has} but not in {lacks}: "
                                 f"its ids cannot be matched.")


def _vocabulary_keys(new: FeatureSpec, old: FeatureSpec):
    """``(label, new key or None, old key or None)`` of every table sized by the spec."""
    yield "the item ids", new.vocabulary_key(new.target_item), old.vocabulary_key(old.target_item)
    yield "the tags", *(TAG_VOCABULARY if TAG_VOCABULARY in s.vocabularies else None for s in (new, old))
    for name in new.context:
        yield f"`{name}`", new.vocabulary_key(name), old.vocabulary_key(name) if name in old.context else None


def _config_differences(new: ModelConfig, old: ModelConfig) -> list[str]:
    out = [f"--{n} {a} vs {b}" for n, a, b in (("extractor", new.resolved_extractor, old.resolved_extractor),
                                              ("head", new.resolved_head, old.resolved_head)) if a != b]
    for name in SHAPING_FIELDS:
        a, b = getattr(new, name), getattr(old, name)
        if a != b:
            out.append(f"--{name} {','.join(map(str, a)) if isinstance(a, tuple) else a} vs "
                       f"{','.join(map(str, b)) if isinstance(b, tuple) else b}")
    return out


def _check_config(new: ModelConfig, old: ModelConfig, where: str) -> None:
    parts = _config_differences(new, old)[:1]
    if parts and (new.resolved_extractor != old.resolved_extractor or new.resolved_head != old.resolved_head
                  or new.embedding_dim != old.embedding_dim):
        raise WarmStartError(f"warm start: model config differs from {where}'s: {parts[0]} (new vs source).")


def _shapes_and_roles(spec: FeatureSpec, config: ModelConfig) -> tuple[dict, dict]:
    """``({path: shape}, roles)`` of the model ``spec`` and ``config`` build, its tables cut to one row."""
    small = dataclasses.replace(spec, num_items=2, tag_vocab_size=1,
                                context_vocab_sizes=(1,) * len(spec.context))
    model = build_model(small, config, load_item_table=False)
    return {v.path: tuple(v.shape) for v in model.weights}, _roles(model)


def _roles(model: keras.Model) -> dict:
    """``{path: "items" | "tags" | "context" | "frozen"}`` of the weights sized by the spec."""
    roles = {}
    for layer in model.layers:  # the embeddings are layers of the functional model itself
        if isinstance(layer, ItemEmbedding) and not layer.precomputed:
            roles.update({layer.id_embeddings.path: "items", layer.tag_embeddings.path: "tags",
                          layer.item_tags.path: "frozen", layer.item_multimodal.path: "frozen"})
        elif isinstance(layer, ContextEmbedding):
            roles[layer.embeddings.path] = "context"
    return roles


def _weight_mismatch(shapes: dict, roles: dict, weights: dict) -> str | None:
    """What first differs between the new model's weights and the source's (tables: their row width)."""
    for path, shape in shapes.items():
        if path not in weights:
            return f"weight {path} of the new model is not in the source"
        old = tuple(weights[path].shape)
        if path in roles:
            if old[1:] != shape[1:]:
                return f"table {path} rows {shape[1:]} vs {old[1:]}"
        elif old != shape:
            return f"weight {path} shape {shape} vs {old}"
    extra = sorted(set(weights) - set(shapes))
    return f"weight {extra[0]} of the source is not in the new model" if extra else None


def _check_weights(shapes_and_roles, source: Source, config: ModelConfig | None = None) -> None:
    """Refuses unless every non-table weight has its name and shape in the source (tables: row width).

    The message leads with the model config fields that differ, if any
    (``config`` given), then names the first weight that does not match.
    """
    mismatch = _weight_mismatch(*shapes_and_roles, source.weights)
    if mismatch is None:
        return
    diff = _config_differences(config, source.config) if config is not None else []
    if diff:
        raise WarmStartError(f"warm start: model config differs from {source.model_dir}'s: {'; '.join(diff)} "
                             f"(new vs source): {mismatch}.")
    raise WarmStartError(f"warm start: the model does not match {source.model_dir}'s: {mismatch}.")


# --------------------------------------------------------------------------
# Row maps
# --------------------------------------------------------------------------


def vocabulary(spec: FeatureSpec, key: str) -> list:
    """The raw ids of vocabulary ``key`` in file order (line n is dense id n + 2): ints for an
    ``int64`` vocabulary, else strings.

    Raises:
        WarmStartError: a line breaks :data:`qin_tf.spec.RAW_ID_RULE` or repeats
            an earlier line (the rows could not be matched); the message names
            the file, the line and the vocabulary.
    """
    path = spec.path(spec.vocabularies[key]["path"])
    lines = spec.read_vocabulary(key)
    where = lambda n: f"warm start: {path}: line {n + 1} (vocabulary `{key}`)"  # noqa: E731
    if spec.vocabularies[key].get("dtype", "string") == "int64":
        values = []
        for n, line in enumerate(lines):
            try:
                values.append(int(line))
            except ValueError:
                raise WarmStartError(f"{where(n)}: {line!r} is not an int64 raw id; {RAW_ID_RULE}.") from None
    else:
        values = lines
    bad = first_bad_raw_id(values)
    if bad is not None:
        raise WarmStartError(f"{where(bad[0])}: {bad[1]}; {RAW_ID_RULE}.")
    first = {}
    for n, value in enumerate(values):
        if first.setdefault(value, n) != n:
            raise WarmStartError(f"{where(n)}: raw id {value!r} is also on line {first[value] + 1}; a raw id "
                                 f"has one row.")
    return values


def row_map(new_spec: FeatureSpec, old_spec: FeatureSpec, key_new: str | None, key_old: str | None,
            new_rows: int, old_rows: int) -> np.ndarray:
    """``src[r]``: the old row that new row ``r`` takes, or -1 (a new id: keep the fresh row).

    With vocabulary files on both sides, rows are matched by raw id (padding
    and OOV to themselves); without, row ``i`` to row ``i``.
    """
    src = np.full(new_rows, -1, dtype=np.int64)
    if key_new is None or key_old is None:
        n = min(new_rows, old_rows)
        src[:n] = np.arange(n)
        return src
    for reserved in (PADDING_ID, OOV_ID):
        if reserved < min(new_rows, old_rows):
            src[reserved] = reserved
    old_index = {raw: i + FIRST_VOCAB_ID for i, raw in enumerate(vocabulary(old_spec, key_old))}
    for i, raw in enumerate(vocabulary(new_spec, key_new)):
        r, o = i + FIRST_VOCAB_ID, old_index.get(raw, -1)
        if r < new_rows and 0 <= o < old_rows:
            src[r] = o
    return src


def _context_map(new: FeatureSpec, old: FeatureSpec) -> list[tuple[str, np.ndarray, int]]:
    """Per context feature: ``(name, src rows in the whole table, old rows of its block)``."""
    out = []
    old_offsets = dict(zip(old.context, np.cumsum([0] + [v + 1 for v in old.context_vocab_sizes])[:-1]))
    for name, v_new in zip(new.context, new.context_vocab_sizes):
        v_old = old.context_vocab_size(name)
        src = row_map(new, old, new.vocabulary_key(name), old.vocabulary_key(name), v_new, v_old)
        src = np.append(src, v_old)  # the layer's out-of-vocabulary row (index vocab_size)
        src = np.where(src >= 0, src + int(old_offsets[name]), -1)
        out.append((name, src, v_old + 1))
    return out


def _counts(src: np.ndarray, old_rows: int) -> dict:
    copied = int(np.sum(src >= 0))
    return {"rows": int(src.size), "source_rows": int(old_rows), "copied": copied, "new": int(src.size) - copied,
            "dropped": int(old_rows) - int(np.unique(src[src >= 0]).size)}


# --------------------------------------------------------------------------
# Applying it
# --------------------------------------------------------------------------


def apply(model: keras.Model, spec: FeatureSpec, source: Source) -> dict:
    """Assigns ``source``'s weights to ``model``, freshly built from ``spec``; returns the record.

    Call it where the model was built (inside the strategy's scope), after
    seeding and building, before the optimizer's first step. The optimizer
    is not touched: it starts fresh.

    Returns:
        ``{"source", "source_model_sha256", "tables": {name: {"rows",
        "source_rows", "copied", "new", "dropped"}}, "frozen", "weights_copied"}``
        (see :func:`write_record`), and ``"export"``, ``"export_version"``
        when ``--warm_start_from`` was an export.
    """
    roles = _roles(model)
    shapes = {v.path: tuple(v.shape) for v in model.weights}
    small = {p: (s if p not in roles else (1,) + s[1:]) for p, s in shapes.items()}
    _check_weights((small, roles), source)
    old_spec = source.spec
    tables, frozen, copied = {}, [], 0
    for v in model.weights:
        path, role = v.path, roles.get(v.path)
        old = source.weights[path]
        if role == "frozen":
            frozen.append(path)
            continue
        if role is None:
            v.assign(old.astype(v.dtype, copy=False))
            copied += 1
            continue
        value = keras.ops.convert_to_numpy(v).copy()
        if role == "context":
            parts = _context_map(spec, old_spec)
            src = np.concatenate([s for _, s, _ in parts])
            for name, s, old_rows in parts:
                tables[f"{path}[{name}]"] = _counts(s, old_rows)
        else:
            if role == "items":
                keys = (spec.vocabulary_key(spec.target_item), old_spec.vocabulary_key(old_spec.target_item))
            else:
                keys = tuple(TAG_VOCABULARY if TAG_VOCABULARY in s.vocabularies else None for s in (spec, old_spec))
            src = row_map(spec, old_spec, *keys, value.shape[0], old.shape[0])
            tables[path] = _counts(src, old.shape[0])
        hit = src >= 0
        value[hit] = old[src[hit]]
        v.assign(value)
        copied += 1
    record = {"source": source.model_dir, "source_model": os.path.join(source.model_dir, MODEL_FILENAME),
              "source_model_sha256": source.sha256, "tables": tables, "frozen": frozen,
              "weights_copied": copied, "optimizer": "fresh"}
    if source.export:
        record.update(export=source.export, export_version=source.export_version)
    return record


def summary(record: dict) -> str:
    """One log line: the source, its fingerprint, per table rows copied / new / dropped."""
    tables = "; ".join(f"{name}: {c['copied']:,} copied, {c['new']:,} new, {c['dropped']:,} dropped"
                       for name, c in record["tables"].items())
    via = (f", the run export {record['export']} (version {record['export_version']}) came from"
           if record.get("export") else "")
    return (f"warm start from {record['source_model']} (sha256 {record['source_model_sha256'][:12]}{via}): "
            f"{record['weights_copied']} weights loaded by name ({tables}); frozen item table from the new "
            f"spec; optimizer fresh")


def write_record(model_dir: str, record: dict) -> str:
    """Writes ``model_dir/warm_start.json``; returns its path."""
    path = os.path.join(model_dir, WARM_START_FILENAME)
    fileio.write_json(path, record)
    return path
