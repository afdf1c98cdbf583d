r"""Blends several exports into one SavedModel, a version TF Serving, the local server and batch scoring take as is.

    python -m export.ensemble --member=runs/a/export --member=runs/b/export \
        --data=runs/sample/data --export_base=runs/sample/ensemble [--split=valid] [--weights=fit]

Each ``--member`` is an export base (its newest version) or one version
directory written by ``export.exporter``. The ensemble's score is the
members' logits blended:

    ctr = sigmoid(sum_i w_i * logit(ctr_i) + b)

computed in float64 from the members' own ``ctr`` (clipped to
``[1e-12, 1 - 1e-12]`` before the logit) and returned as float32. The blend
weights (``--weights``):

* ``fit`` (the default): logistic regression of the label on the members'
  logits, with a bias, fitted by Newton's method in numpy on the rows of
  ``--split`` (default ``valid``; ``test`` is refused, it stays for
  measuring) of the preprocessed data ``--data``;
* ``equal``: ``w_i = 1 / n``, ``b = 0``;
* ``w1,w2,...``: one weight per member, ``b = 0``.

One member with weight 1 and bias 0 is served as a pass-through of that
member's ``ctr``, bit for bit (no logit/sigmoid round trip).

The version (``export_base/<next version>/``) has the signatures of a member,
with the same named inputs, dtypes and the one output ``ctr`` float32
``[batch]``: ``serving_default``, ``predict_examples`` and, when every member
has them, ``serving_raw`` and ``predict_raw_examples``. The members'
SavedModels are embedded in it (loaded with ``tf.saved_model.load`` inside a
``tf.Module`` whose signature functions call theirs), so it loads with plain
``tf.saved_model.load``: no qin_tf, no Keras. Beside the graph, as the
exporter writes them:

    assets/feature_spec.json and the vocabularies   the members' (shared) feature spec
    assets.extra/tf_serving_warmup_requests         warm-up requests for every signature
    assets.extra/model_fingerprint.json             the members' fingerprints and the weights, hashed
    assets.extra/ensemble.json                      the members, the weights, how they were
                                                    fitted and the fit's metrics on --split

The members must share their feature spec: the same model features (name,
role, dtype, shape, vocabulary size), the same vocabularies (key, dtype, OOV
id and the same lines) and the same signatures; otherwise one line names what
differs and nothing is written. The version is written into a hidden
directory of ``export_base``, checked against the members' scores and renamed
into place (on a URL, copied with ``saved_model.pb`` last), as
``export.exporter`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Sequence

import numpy as np

from export.exporter import (DEFAULT_WARMUP_ROWS, WARMUP_PATH, ExportError, latest_version_dir, list_versions,
                             publish_version, quiet_tf_logging, read_examples, read_version_fingerprint,
                             warmup_requests, write_warmup)
from qin_tf import fileio
from qin_tf.cli import error_line, exit_error
from qin_tf.fingerprint import write_fingerprint
from qin_tf.signatures import (EXAMPLES_SIGNATURE, OUTPUT, RAW_EXAMPLES_SIGNATURE, RAW_SIGNATURE,
                               SERVE_TAG, SERVING_SIGNATURE, SPEC_ASSET_PATH)
from qin_tf.spec import FeatureSpec, SpecError

#: The record of the blend, relative to the version directory.
ENSEMBLE_PATH = os.path.join("assets.extra", "ensemble.json")
#: The signatures every member has; the raw-id ones join when every member has them.
BASE_SIGNATURES = (SERVING_SIGNATURE, EXAMPLES_SIGNATURE)
RAW_SIGNATURES = (RAW_SIGNATURE, RAW_EXAMPLES_SIGNATURE)
#: Probabilities are clipped to [CLIP, 1 - CLIP] before the logit (float64).
CLIP = 1e-12
#: Values of --weights besides a list of numbers.
WEIGHT_METHODS = ("fit", "equal")
#: The L2 weight on the blend weights (not the bias) in the fit: keeps it well posed when members agree.
FIT_L2 = 1e-4
#: Rows per batch when the members score --split.
SCORE_BATCH = 4096


# --------------------------------------------------------------------------
# Blending (numpy): the reference the graph is checked against
# --------------------------------------------------------------------------


def logit(p) -> np.ndarray:
    """``log(p / (1 - p))`` in float64, ``p`` clipped to ``[CLIP, 1 - CLIP]``."""
    p = np.clip(np.asarray(p, dtype=np.float64), CLIP, 1.0 - CLIP)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    """``1 / (1 + exp(-z))`` without overflow (float64)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def blend(scores: Sequence, weights: Sequence[float], bias: float) -> np.ndarray:
    """``sigmoid(sum_i w_i logit(scores_i) + b)`` in float64 (``scores``: one ``[n]`` array per member)."""
    return sigmoid(sum(w * logit(s) for w, s in zip(weights, scores)) + bias)


def fit_weights(scores: Sequence, labels, *, l2: float = FIT_L2, max_steps: int = 200) -> tuple[list[float], float]:
    """Logistic regression of ``labels`` on the members' logits, with a bias: ``(weights, bias)``.

    Minimises the mean log loss plus ``l2 / 2 * ||w||^2`` (the bias is not
    penalised) by Newton's method with a backtracking line search, from
    ``w = 1 / n, b = 0``, until a step moves no parameter by more than 1e-10.
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    x = np.stack([logit(s) for s in scores], axis=1)
    x = np.concatenate([x, np.ones((len(y), 1))], axis=1)
    k = x.shape[1] - 1
    reg = np.concatenate([np.full(k, l2), [0.0]])

    def loss(theta):
        z = x @ theta
        return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(reg * theta * theta))

    theta = np.concatenate([np.full(k, 1.0 / k), [0.0]])
    current = loss(theta)
    for _ in range(max_steps):
        p = sigmoid(x @ theta)
        grad = x.T @ (p - y) / len(y) + reg * theta
        hess = (x * (p * (1.0 - p))[:, None]).T @ x / len(y) + np.diag(reg) + 1e-12 * np.eye(k + 1)
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        t = 1.0
        while t > 1e-8 and loss(theta - t * step) > current:
            t *= 0.5
        if t <= 1e-8:
            break
        theta = theta - t * step
        current = loss(theta)
        if np.max(np.abs(t * step)) < 1e-10:
            break
    if not np.all(np.isfinite(theta)):
        raise ExportError("the blend weights' fit diverged; pass --weights=equal or explicit weights.")
    return [float(w) for w in theta[:k]], float(theta[k])


def parse_weights(text: str, num_members: int) -> tuple[str, list[float] | None]:
    """``--weights`` -> (method, weights): ``("fit", None)``, ``("equal", [1/n...])`` or ``("given", [...])``."""
    text = text.strip()
    if text in ("fit", "equal"):
        return text, (None if text == "fit" else [1.0 / num_members] * num_members)
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ExportError(f"--weights={text}: expected fit, equal or one number per member "
                          f"({num_members}), comma-separated.") from None
    if len(weights) != num_members or not all(np.isfinite(weights)):
        raise ExportError(f"--weights={text}: {len(weights)} weight(s) for {num_members} member(s); "
                          "give one finite number per member.")
    return "given", weights


def valid_metrics(labels, scores) -> dict:
    from qin_tf.metrics import auc, logloss

    return {"auc": float(auc(labels, scores)), "logloss": float(logloss(labels, scores))}


# --------------------------------------------------------------------------
# Members
# --------------------------------------------------------------------------


def export_spec(version_dir: str, spec: FeatureSpec) -> FeatureSpec:
    """An export's spec asset with its vocabularies where the export holds them (``assets/<file name>``)."""
    import dataclasses

    vocabularies = {key: {**v, "path": os.path.join("assets", os.path.basename(v["path"]))}
                    for key, v in spec.vocabularies.items()}
    return dataclasses.replace(spec, base_dir=version_dir, vocabularies=vocabularies)


class Member:
    """One export: its version directory, feature spec (the spec asset) and loaded SavedModel."""

    def __init__(self, path: str):
        import tensorflow as tf

        g = fileio.gfile()
        if g.exists(os.path.join(path, "saved_model.pb")):
            self.path = path
        else:
            self.path = latest_version_dir(path)
        spec_file = os.path.join(self.path, SPEC_ASSET_PATH)
        if not g.exists(spec_file):
            raise ExportError(f"{self.path}: no {SPEC_ASSET_PATH}; not a version written by export.exporter.")
        self.spec_bytes = fileio.read_bytes(spec_file)
        self.spec = export_spec(self.path, FeatureSpec.load(spec_file))
        try:
            self.loaded = tf.saved_model.load(self.path, tags=[SERVE_TAG])
        except (tf.errors.OpError, ValueError, OSError) as e:
            why = error_line(e)
            raise ExportError(f"{self.path}: cannot load the SavedModel: {why}") from None
        self.signatures = set(self.loaded.signatures.keys())
        missing = [s for s in BASE_SIGNATURES if s not in self.signatures]
        if missing:
            raise ExportError(f"{self.path}: no `{missing[0]}` signature; not a version written by export.exporter.")

    def base(self) -> str:
        """The export base this version lies in."""
        return os.path.dirname(self.path.rstrip("/"))


def spec_difference(a: FeatureSpec, b: FeatureSpec) -> str | None:
    """What differs between two members' specs, as the model and the raw-id signatures see them, or None."""
    names_a, names_b = [f.name for f in a.model_features], [f.name for f in b.model_features]
    if names_a != names_b:
        return f"model features {names_a} vs {names_b}"
    for fa, fb in zip(a.model_features, b.model_features):
        for field in ("role", "dtype", "shape", "vocab_size"):
            if getattr(fa, field) != getattr(fb, field):
                return f"feature `{fa.name}` {field} {getattr(fa, field)!r} vs {getattr(fb, field)!r}"
    if sorted(a.vocabularies) != sorted(b.vocabularies):
        return f"vocabularies {sorted(a.vocabularies)} vs {sorted(b.vocabularies)}"
    for key in sorted(a.vocabularies):
        va, vb = a.vocabularies[key], b.vocabularies[key]
        for field in ("dtype", "oov_id"):
            if va.get(field) != vb.get(field):
                return f"vocabulary `{key}` {field} {va.get(field)!r} vs {vb.get(field)!r}"
        if a.read_vocabulary(key) != b.read_vocabulary(key):
            return f"vocabulary `{key}` holds other raw ids (or another order)"
    return None


def check_members(members: Sequence[Member]) -> None:
    """Refuses members whose feature specs or signatures differ from the first's, in one line."""
    first = members[0]
    for m in members[1:]:
        if m.path == first.path:
            raise ExportError(f"{m.path}: given twice as a --member.")
        diff = spec_difference(first.spec, m.spec)
        if diff is None and m.signatures != first.signatures:
            diff = f"signatures {sorted(first.signatures)} vs {sorted(m.signatures)}"
        if diff is None:
            for name in sorted(first.signatures & set(BASE_SIGNATURES + RAW_SIGNATURES)):
                if _input_specs(first, name) != _input_specs(m, name):
                    diff = f"the inputs of `{name}`"
                    break
        if diff is not None:
            raise ExportError(f"{m.path}: its feature spec differs from {first.path}'s: {diff}; "
                              "an ensemble's members share one feature spec.")


def _input_specs(member: Member, name: str) -> dict:
    kwargs = member.loaded.signatures[name].structured_input_signature[1]
    return {k: (tuple(s.shape.as_list()), s.dtype.name) for k, s in kwargs.items()}


def served_signatures(members: Sequence[Member]) -> list[str]:
    """The base signatures, plus the raw-id ones when every member has them."""
    raw = all(all(s in m.signatures for s in RAW_SIGNATURES) for m in members)
    return list(BASE_SIGNATURES) + (list(RAW_SIGNATURES) if raw else [])


def member_scores(members: Sequence[Member], spec: FeatureSpec, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Each member's ``ctr`` on every row of ``split`` of the data ``spec`` (``serving_default``), and the labels."""
    import tensorflow as tf

    from qin_tf.data import make_dataset

    scores, labels = [[] for _ in members], []
    for features, label in make_dataset(spec, split, SCORE_BATCH, training=False):
        for out, m in zip(scores, members):
            out.append(m.loaded.signatures[SERVING_SIGNATURE](**features)[OUTPUT].numpy())
        labels.append(tf.reshape(label, [-1]).numpy())
    if not labels:
        raise ExportError(f"{spec.base_dir}: split `{split}` has no rows to fit the blend weights on.")
    return [np.concatenate(s) for s in scores], np.concatenate(labels)


# --------------------------------------------------------------------------
# The ensemble SavedModel
# --------------------------------------------------------------------------


def ensemble_module(members: Sequence[Member], weights: Sequence[float], bias: float,
                    signatures: Sequence[str], spec_asset_file: str):
    """A ``tf.Module`` embedding the members' SavedModels: ``{signature name: tf.function}`` and the module."""
    import tensorflow as tf

    module = tf.Module(name="qin_ensemble")
    # The spec asset first (depth 1): it keeps the name assets/feature_spec.json in the export.
    module.feature_spec = tf.saved_model.Asset(spec_asset_file)
    module.members = [m.loaded for m in members]
    identity = len(members) == 1 and float(weights[0]) == 1.0 and float(bias) == 0.0

    def combine(outputs):
        if identity:  # the member's own ctr, bit for bit
            return outputs[0]
        z = tf.constant(float(bias), tf.float64)
        for w, p in zip(weights, outputs):
            p = tf.clip_by_value(tf.cast(p, tf.float64), CLIP, 1.0 - CLIP)
            z += tf.constant(float(w), tf.float64) * (tf.math.log(p) - tf.math.log1p(-p))
        return tf.cast(tf.sigmoid(z), tf.float32)

    def make(name):
        fns = [m.signatures[name] for m in module.members]
        kwargs = fns[0].structured_input_signature[1]
        input_signature = {k: tf.TensorSpec(s.shape, s.dtype, name=k) for k, s in kwargs.items()}

        @tf.function(input_signature=[input_signature])
        def serve(features):
            return {OUTPUT: combine([fn(**features)[OUTPUT] for fn in fns])}

        return serve

    functions = {name: make(name) for name in signatures}
    module.signature_functions = list(functions.values())
    return functions, module


def _sha256(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def _fingerprint(members: Sequence[Member], weights, bias) -> dict:
    prints = [read_version_fingerprint(m.path) or {} for m in members]
    blend_text = json.dumps({"weights": list(weights), "bias": bias})
    return {"source": _sha256("ensemble", *(p.get("source", m.path) for p, m in zip(prints, members)), blend_text),
            "weights": _sha256("ensemble", *(p.get("weights", m.path) for p, m in zip(prints, members)), blend_text)}


def _verify(export_dir: str, members: Sequence[Member], spec: FeatureSpec, examples: Sequence[bytes],
            weights, bias, identity: bool) -> None:
    """Reloads the version and checks its scores against the members' blended in numpy."""
    import tensorflow as tf

    from export.exporter import parse_examples

    features = {k: tf.constant(v) for k, v in parse_examples(spec, examples).items()}
    loaded = tf.saved_model.load(export_dir, tags=[SERVE_TAG])
    got = loaded.signatures[SERVING_SIGNATURE](**features)[OUTPUT].numpy()
    outs = [m.loaded.signatures[SERVING_SIGNATURE](**features)[OUTPUT].numpy() for m in members]
    if identity:
        if not np.array_equal(got, outs[0]):
            raise ExportError("the ensemble of one member with weight 1 does not serve that member's scores.")
    elif not np.allclose(got, blend(outs, weights, bias), rtol=0, atol=1e-6):
        raise ExportError("the exported ensemble disagrees with the members' blended scores.")
    got_ex = loaded.signatures[EXAMPLES_SIGNATURE](examples=tf.constant(list(examples), tf.string))[OUTPUT].numpy()
    if not np.allclose(got_ex, got, rtol=0, atol=1e-6):
        raise ExportError(f"the exported `{EXAMPLES_SIGNATURE}` disagrees with `{SERVING_SIGNATURE}`.")


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies under it (local paths made absolute; URLs as written)."""
    if fileio.is_local(path) and fileio.is_local(root):
        path, root = os.path.abspath(path), os.path.abspath(root)
    path, root = path.rstrip("/"), root.rstrip("/")
    return path == root or path.startswith(root + "/")


def _inputs(member_paths: Sequence[str], data_dir: str, export_base: str, split: str):
    """The members and the data spec, once every path and the split are checked (one line each, else)."""
    if not member_paths:
        raise ExportError("no --member given; pass one --member per export to blend.")
    if split == "test":
        raise ExportError("--split=test: the blend weights are fitted on valid rows only; the test split "
                          "stays for measuring the ensemble.")
    for p in list(member_paths) + [data_dir]:
        if _inside(export_base, p) or _inside(p, export_base):
            raise ExportError(f"--export_base={export_base}: overlaps the input {p}; write the ensemble to "
                              "its own export base.")
    members = [Member(p) for p in member_paths]
    for m in members:
        if _inside(export_base, m.base()):
            raise ExportError(f"--export_base={export_base}: lies in {m.base()}, {m.path}'s export base; write "
                              "the ensemble to its own export base.")
    check_members(members)
    data_spec = FeatureSpec.load(data_dir)
    if data_spec.model_features != members[0].spec.model_features:
        raise ExportError(f"{data_dir}: its feature spec's model features differ from the members' "
                          f"({members[0].path}).")
    if split not in data_spec.splits:
        raise ExportError(f"--split={split}: {data_dir} has the splits {sorted(data_spec.splits)}.")
    if not data_spec.splits[split].labelled:
        raise ExportError(f"--split={split}: the split of {data_dir} has no labels to fit the weights on.")
    return members, data_spec


def _blend_record(members: Sequence[Member], data_spec: FeatureSpec, data_dir: str, split: str,
                  weights: str) -> dict:
    """The weights (fitted on ``split``, or as given) and the record ``ensemble.json`` holds."""
    method, given = parse_weights(weights, len(members))
    scores, labels = member_scores(members, data_spec, split)
    w, b = fit_weights(scores, labels) if method == "fit" else (given, 0.0)
    identity = len(members) == 1 and w[0] == 1.0 and b == 0.0
    blended = scores[0] if identity else blend(scores, w, b)
    return {"members": [m.path for m in members], "weights": w, "bias": b, "method": method,
            "formula": "ctr = sigmoid(sum_i weights[i] * logit(ctr_i) + bias)",
            "pass_through": identity, "clip": CLIP, "split": split, "data": data_dir,
            "num_rows": int(len(labels)),
            "metrics": {"members": [valid_metrics(labels, s) for s in scores],
                        "ensemble": valid_metrics(labels, blended)}}


def _write(members: Sequence[Member], record: dict, tmp: str, scratch: str, warmup_examples, model_name: str):
    """Saves the ensemble, its assets and records into ``tmp`` and checks it against the members."""
    import tensorflow as tf

    w, b = record["weights"], record["bias"]
    spec_file = os.path.join(scratch, os.path.basename(SPEC_ASSET_PATH))
    with open(spec_file, "wb") as f:
        f.write(members[0].spec_bytes)
    functions, module = ensemble_module(members, w, b, served_signatures(members), spec_file)
    with quiet_tf_logging():
        tf.saved_model.save(module, tmp, signatures=functions)
    if fileio.read_bytes(os.path.join(tmp, SPEC_ASSET_PATH)) != members[0].spec_bytes:
        raise ExportError(f"the ensemble's {SPEC_ASSET_PATH} is not the members' feature spec.")
    write_warmup(os.path.join(tmp, WARMUP_PATH), warmup_requests(members[0].spec, warmup_examples, model_name))
    write_fingerprint(tmp, **_fingerprint(members, w, b))
    fileio.write_text(os.path.join(tmp, ENSEMBLE_PATH), json.dumps(record, indent=2) + "\n")
    _verify(tmp, members, members[0].spec, warmup_examples, w, b, record["pass_through"])


def export_ensemble(member_paths: Sequence[str], data_dir: str, export_base: str, *, split: str = "valid",
                    weights: str = "fit", model_name: str = "qin") -> tuple[str, dict]:
    """Writes the ensemble of ``member_paths`` as the next version of ``export_base``: (version dir, record).

    ``weights``: ``fit``, ``equal`` or one number per member, comma-separated
    (see the module docstring). Nothing is left behind on failure, not even
    an ``export_base`` this call created.
    """
    import tensorflow as tf

    members, data_spec = _inputs(member_paths, data_dir, export_base, split)
    record = _blend_record(members, data_spec, data_dir, split, weights)
    warmup_examples = read_examples(data_spec, DEFAULT_WARMUP_ROWS, [split])
    g = fileio.gfile()
    created = not g.exists(export_base)
    tf.io.gfile.makedirs(export_base)
    existing = list_versions(export_base)
    final = os.path.join(export_base, str((existing[-1] + 1) if existing else 1))
    scratch = tempfile.mkdtemp(prefix="qin_ensemble_")
    local = fileio.is_local(export_base)
    tmp = os.path.join(export_base if local else scratch, f".tmp-{os.path.basename(final)}-{uuid.uuid4().hex[:8]}")
    try:
        _write(members, record, tmp, scratch, warmup_examples, model_name)
        publish_version(tmp, final, local)
    except BaseException:
        if local:
            shutil.rmtree(tmp, ignore_errors=True)
            if created and not os.listdir(export_base):
                os.rmdir(export_base)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final, record


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv):
    del argv
    import tensorflow as tf
    from absl import flags

    FLAGS = flags.FLAGS
    try:
        path, record = export_ensemble(FLAGS.member or [], FLAGS.data, FLAGS.export_base, split=FLAGS.split,
                                       weights=FLAGS.weights, model_name=FLAGS.model_name)
    except (ExportError, SpecError, OSError, ValueError, tf.errors.OpError) as e:  # one line, no traceback
        exit_error("ensemble", e)
    m = record["metrics"]["ensemble"]
    print(f"{split_line(record)}: AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}  weights "
          + ",".join(f"{w:.4g}" for w in record["weights"]) + f"  bias {record['bias']:.4g}")
    print(path)


def split_line(record: dict) -> str:
    return f"{record['split']} ({record['num_rows']:,} rows)"


def _define_flags():
    from absl import flags

    flags.DEFINE_multi_string("member", None, "An export base (its newest version) or a version directory "
                              "written by export.exporter; repeat once per member.")
    flags.DEFINE_string("data", None, "The preprocessed data directory (feature_spec.json and the TFRecords) "
                        "whose --split rows fit the blend weights.", required=True)
    flags.DEFINE_string("split", "valid", "The split to fit the weights on (never test).")
    flags.DEFINE_string("export_base", None, "TF Serving model base path of the ensemble; the version goes in "
                        "the next numbered subdirectory.", required=True)
    flags.DEFINE_string("weights", "fit", "fit (logistic regression on the members' logits over --split), "
                        "equal (1/n each, bias 0), or one weight per member, comma-separated (bias 0).")
    flags.DEFINE_string("model_name", "qin", "The model name (model_spec.name) that the warmup requests address.")


if __name__ == "__main__":
    from qin_tf.runtime import run_app

    _define_flags()
    run_app(main, tensorflow=True)
