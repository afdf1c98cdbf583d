"""Serves items that appeared after training: a new export version from a newer catalog, nothing retrained.

    python -m export.refresh_catalog --model_dir=runs/logs/model --export_base=runs/logs/export \
        --config=configs/logs/microlens_sample.json [--catalog=new/titles.csv] [--vectors=new/item_info.parquet]

reads the item catalog the way ``pipelines.build_examples`` reads it (the
log config's ``catalog`` section, parsed by
:func:`pipelines.log_readers.read_catalog`; ``--catalog`` / ``--vectors``
replace the files that section names) and writes a NEW numbered version next
to the newest one in ``--export_base`` (TF Serving, and ``export.local_server``,
pick it up without a restart). The model is the training run's
``best.keras`` in ``--model_dir``, its trained weights frozen:

* **New items** (raw ids the newest version's item vocabulary lacks) are
  appended to the raw-id item vocabulary, in raw-id order, so every existing
  raw id keeps its dense id. A new item's vector is ``[E_id[1] | tags |
  multimodal]``: its id part is the OOV item's (dense 1, what an unknown item
  got before), its tags and frozen multimodal vector are the catalog's.
* **Tags** map through the training run's tag vocabulary; a tag it lacks has
  no trained embedding and is dropped (as ``build_examples`` drops tags below
  ``tag_min_count``); the first ``num_tags`` known tags are kept, in order,
  left-padded with 0. An item without a known tag has a zero tag part.
* **Items already served** take the catalog's tags and vector (a changed
  vector is served from now on); an item the catalog no longer lists keeps
  the row it has (the training table's, or for an item added by an earlier
  refresh and since dropped, no tags and a zero vector).
* Every weight of the model is unchanged, so a request that touches only
  items whose catalog row is unchanged scores bit for bit as before.

Before anything is written, the newest version must be one exported (or
refreshed) from ``--model_dir``'s model: its
``assets.extra/model_fingerprint.json`` (:func:`qin_tf.fingerprint.model_fingerprint`
of the training run) must match ``--model_dir``'s, else the refresh is refused
(a model retrained since, even on the same data, would change every score).
An empty catalog, or one that changes nothing the newest version serves,
writes no version.

The version goes through the exporter's own path
(:func:`export.exporter.export_model`): written to a hidden temporary
directory, checked against the Keras model and renamed into place, so a
failure leaves no new version. Its warmup rows are the newest version's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile

import numpy as np

from export import exporter
from export.exporter import ExportError
from qin_tf import fileio
from qin_tf.cli import exit_error
from qin_tf.fingerprint import model_fingerprint, weights_digest
from qin_tf.signatures import EXAMPLES_INPUT, EXAMPLES_SIGNATURE, FINGERPRINT_PATH, SPEC_ASSET_PATH
from qin_tf.spec import FeatureSpec, SpecError

#: The key of the tag vocabulary among a spec's vocabularies (``pipelines.build_examples``).
TAG_VOCABULARY = "tags"


def export_vocabulary_path(version_dir: str, spec: FeatureSpec, key: str) -> str:
    """Where vocabulary ``key`` of an export's spec lies in its version directory (``assets/<file name>``)."""
    path = os.path.join(version_dir, "assets", os.path.basename(spec.vocabularies[key]["path"]))
    if not fileio.gfile().exists(path):
        raise ExportError(f"{path}: the export's `{key}` vocabulary is missing.")
    return path


def _read_lines(path: str) -> list[str]:
    return fileio.read_text(path).split("\n")[:-1]


def warmup_examples(version_dir: str) -> list[bytes]:
    """The serialized examples of a version's largest ``predict_examples`` warmup request."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    best: list[bytes] = []
    path = os.path.join(version_dir, exporter.WARMUP_PATH)
    for record in tf.data.TFRecordDataset(path):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        req = log.predict_log.request
        if req.model_spec.signature_name == EXAMPLES_SIGNATURE:
            rows = list(tf.make_ndarray(req.inputs[EXAMPLES_INPUT]).reshape(-1))
            if len(rows) > len(best):
                best = rows
    if not best:
        raise ExportError(f"{path}: no `{EXAMPLES_SIGNATURE}` warmup request to reuse.")
    return best


def catalog_rows(catalog: dict, tag_dense: dict, num_tags: int, mm_dim: int) -> dict:
    """``{raw id (text): (tags int [num_tags], vector float32 [mm_dim])}`` of the catalog's items.

    Tags the vocabulary lacks are dropped, the first ``num_tags`` known ones
    kept, left-padded with 0; an item without a vector gets zeros.
    """
    out = {}
    for item, (tags, vec) in catalog.items():
        known = [tag_dense[t] for t in tags if t in tag_dense][:num_tags]
        row_tags = np.zeros(num_tags, np.int64)
        if known:
            row_tags[num_tags - len(known):] = known
        if vec is None:
            vec = np.zeros(mm_dim, np.float32)
        elif vec.shape != (mm_dim,):
            raise ExportError(f"catalog item {item!r}: its vector has width {vec.shape[0]}; the model's "
                              f"multimodal vectors have width {mm_dim}.")
        out[str(item)] = (row_tags, np.asarray(vec, np.float32))
    return out


def enlarged_model(model, num_items: int, rows: dict, n_model: int):
    """A copy of ``model`` whose item table has ``num_items`` rows, every weight otherwise the same.

    ``rows``: ``{dense id: (tags, vector)}`` to set. Id-embedding rows beyond
    the trained ``n_model`` are the OOV row (1).
    """
    import keras

    from qin_tf.layers.embedding import ItemEmbedding

    layers = [layer for layer in model.layers if isinstance(layer, ItemEmbedding)]
    if not layers or any(layer.precomputed for layer in layers):
        raise ExportError("the model has no trainable-form ItemEmbedding to refresh (is it an export's?).")
    names = {layer.name for layer in layers}
    config = model.get_config()
    for layer_config in config["layers"]:
        if layer_config["name"] in names:
            layer_config["config"]["num_items"] = num_items
    clone = keras.Model.from_config(config)
    source = {v.path: np.asarray(v) for v in model.weights}
    grown = {}
    for layer in layers:
        ids = np.asarray(layer.id_embeddings)
        tags = np.asarray(layer.item_tags)
        mm = np.asarray(layer.item_multimodal)
        ids = np.concatenate([ids, np.repeat(ids[1:2], num_items - n_model, axis=0)])
        tags = np.concatenate([tags, np.zeros((num_items - n_model, tags.shape[1]), tags.dtype)])
        mm = np.concatenate([mm, np.zeros((num_items - n_model, mm.shape[1]), mm.dtype)])
        for dense, (t, v) in rows.items():
            tags[dense], mm[dense] = t, v
        grown.update({layer.id_embeddings.path: ids, layer.item_tags.path: tags, layer.item_multimodal.path: mm})
    if sorted(source) != sorted(v.path for v in clone.weights):
        raise ExportError("enlarging the item table changed the model's variables unexpectedly.")
    for v in clone.weights:
        v.assign(grown.get(v.path, source[v.path]).astype(v.dtype))
    return clone


def _served_version(model_dir: str, export_base: str, spec: FeatureSpec, key: str):
    """``(newest version dir, its spec, its fingerprints, model_dir's model, that model's fingerprint)``.

    Raises:
        ExportError: the newest version serves no raw item ids, predates
            fingerprints, or was not exported from ``model_dir``'s model.
    """
    latest = exporter.latest_version_dir(export_base)
    served_spec = FeatureSpec.load(os.path.join(latest, SPEC_ASSET_PATH))
    if served_spec.vocabulary_key(served_spec.target_item) != key:
        raise ExportError(f"{latest}: this version serves no raw item ids (its feature spec has no item "
                          f"vocabulary), so it was not exported from {model_dir}; pass the export base of "
                          "that training run.")
    fingerprint = exporter.read_version_fingerprint(latest)
    if fingerprint is None:
        raise ExportError(f"{latest}: exported before versions carried a fingerprint "
                          f"({FINGERPRINT_PATH}), so nothing proves it serves {model_dir}'s weights; "
                          f"export {model_dir} again (python -m export.exporter) and refresh that version.")
    model = exporter.load_keras_model(model_dir)
    source = model_fingerprint(model, spec)
    if source != fingerprint["source"]:
        raise ExportError(f"{model_dir}: its model (fingerprint {source[:16]}) is not the one {latest} serves "
                          f"(fingerprint {fingerprint['source'][:16]}); was it retrained since that export? "
                          "Refresh from the training run the export came from, or export this one first.")
    return latest, served_spec, fingerprint, model, source


def _grown_spec(spec: FeatureSpec, key: str, vocab: list[str], scratch: str) -> FeatureSpec:
    """``spec`` with the item vocabulary ``vocab`` (and its other vocabularies) written under ``scratch``."""
    num_items = len(vocab) + 2
    vocabularies = {}
    for k, v in spec.vocabularies.items():
        dst = os.path.join(scratch, v["path"])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if k == key:
            with open(dst, "w", encoding="utf-8") as f:
                f.write("".join(f"{x}\n" for x in vocab))
            v = {**v, "size": num_items}
        else:
            fileio.gfile().copy(spec.path(v["path"]), dst, overwrite=True)
        vocabularies[k] = dict(v)
    return dataclasses.replace(spec, num_items=num_items, vocabularies=vocabularies, base_dir=scratch)


def refresh_catalog(model_dir: str, export_base: str, catalog: dict, *, version: int | None = None,
                    model_name: str = "qin", log=None) -> str:
    """Writes a new version of ``export_base`` serving ``catalog``; see the module docstring.

    Args:
        model_dir: the training run (``best.keras``, ``feature_spec.json`` with vocabularies).
        export_base: the TF Serving model base path holding the versions exported from it.
        catalog: ``{raw item id: (raw tags, vector or None)}``, as
            :func:`pipelines.log_readers.read_catalog` returns it.
        version: the new version's number; default: one more than the newest.
        model_name: ``model_spec.name`` of the warmup requests.
        log: a callable taking one line (what was added and changed).

    Returns:
        The new version's directory, or None when the catalog is empty or
        changes nothing the newest version serves (no version is written).

    Raises:
        ExportError: ``model_dir``'s model is not the one the newest version
            was exported from (:func:`qin_tf.fingerprint.model_fingerprint`
            differs, or the version predates fingerprints), or the export
            serves no raw ids.
    """
    log = log or (lambda line: None)
    spec = FeatureSpec.load(model_dir) if fileio.gfile().isdir(model_dir) else None
    if spec is None:
        raise ExportError(f"{model_dir}: no such directory; --model_dir is the training run's directory.")
    key = spec.vocabulary_key(spec.target_item)
    if key is None:
        raise ExportError(f"{model_dir}: its feature spec has no item vocabulary; only exports built from raw "
                          "ids (pipelines.build_examples) can take new items.")
    latest, served_spec, fingerprint, model, source = _served_version(model_dir, export_base, spec, key)
    served_vocab = _read_lines(export_vocabulary_path(latest, served_spec, key))
    trained_vocab = spec.read_vocabulary(key)
    if served_vocab[:len(trained_vocab)] != trained_vocab or served_spec.num_items != len(served_vocab) + 2:
        raise ExportError(f"{latest}: its item vocabulary does not extend {model_dir}'s; was it exported "
                          "from another training run?")
    tag_dense = ({t: i + 2 for i, t in enumerate(spec.read_vocabulary(TAG_VOCABULARY))}
                 if TAG_VOCABULARY in spec.vocabularies else {})
    rows = catalog_rows(catalog, tag_dense, spec.num_tags, spec.mm_dim)
    dense = {raw: i + 2 for i, raw in enumerate(served_vocab)}
    new = [raw for raw in rows if raw not in dense]
    if spec.vocabularies[key].get("dtype", "string") == "int64":
        new.sort(key=int)
    else:
        new.sort()
    for raw in new:
        dense[raw] = len(dense) + 2
    vocab = served_vocab + new
    num_items = len(vocab) + 2

    if not rows:
        log(f"{latest}: the catalog is empty; nothing changed, no new version written.")
        return None
    clone = enlarged_model(model, num_items, {dense[raw]: r for raw, r in rows.items()}, spec.num_items)
    if not new and weights_digest(clone) == fingerprint["weights"]:
        log(f"{latest}: nothing changed ({len(rows)} catalog items, all served with these tags and vectors "
            "already); no new version written.")
        return None
    scratch = tempfile.mkdtemp(prefix="qin_refresh_")  # local: the new spec's vocabularies, for the export
    try:
        new_spec = _grown_spec(spec, key, vocab, scratch)
        path = exporter.export_model(clone, new_spec, export_base, version, source_fingerprint=source,
                                     model_dir=model_dir, warmup_examples=warmup_examples(latest),
                                     model_name=model_name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"{path}: {len(new)} new items (dense ids {num_items - len(new)}..{num_items - 1}), "
        f"{len(rows) - len(new)} catalog items already served, from {latest}")
    return path


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv):
    del argv
    from absl import flags

    from pipelines.log_readers import read_catalog
    from pipelines.logs_config import LogsConfig, LogsConfigError
    from qin_tf.rows import PreprocessError

    FLAGS = flags.FLAGS
    try:
        cfg = LogsConfig.load(FLAGS.config)
        if cfg.catalog is None:
            raise LogsConfigError(f"{FLAGS.config}: no `catalog` section to read the catalog with.")
        cat = cfg.catalog
        if FLAGS.catalog:
            cat = dataclasses.replace(cat, source=dataclasses.replace(cat.source, files=(FLAGS.catalog,)))
        if FLAGS.vectors:
            if cat.vector is None or cat.vector.source is None:
                raise LogsConfigError(f"{FLAGS.config}: --vectors needs catalog.vector.files in the config.")
            cat = dataclasses.replace(cat, vector=dataclasses.replace(
                cat.vector, source=dataclasses.replace(cat.vector.source, files=(FLAGS.vectors,))))
        catalog = read_catalog(dataclasses.replace(cfg, catalog=cat))
        path = refresh_catalog(FLAGS.model_dir, FLAGS.export_base, catalog, version=FLAGS.version,
                               model_name=FLAGS.model_name, log=lambda line: print(line, file=sys.stderr))
    except (ExportError, SpecError, PreprocessError, LogsConfigError, OSError) as e:
        exit_error("refresh_catalog", str(e))
    except Exception as e:  # a TensorFlow filesystem's error (gs://: permission, network): one line too
        import tensorflow as tf

        if not isinstance(e, tf.errors.OpError):
            raise
        exit_error("refresh_catalog", e)
    if path is not None:
        print(path)


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model_dir", None, "Training run directory (best.keras, feature_spec.json with "
                        "vocabularies).", required=True)
    flags.DEFINE_string("export_base", None, "TF Serving model base path; the new version goes next to the "
                        "newest one.", required=True)
    flags.DEFINE_string("config", None, "Log config (pipelines.build_examples) whose `catalog` section "
                        "reads the catalog.", required=True)
    flags.DEFINE_string("catalog", None, "Catalog file (glob) replacing the one the config names.")
    flags.DEFINE_string("vectors", None, "Vector file (glob) replacing catalog.vector.files of the config.")
    flags.DEFINE_integer("version", None, "Version number; default: one more than the newest there.",
                         lower_bound=1)
    flags.DEFINE_string("model_name", "qin", "model_spec.name of the warmup requests.")


if __name__ == "__main__":
    from qin_tf.runtime import import_tensorflow

    import_tensorflow()
    import pipelines.build_examples  # noqa: F401  (imports Beam quietly, before absl logs to stderr)
    from absl import app

    _define_flags()
    app.run(main)
