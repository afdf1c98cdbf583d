"""Issue 23 (parts 3 and 4): the low-rank cross layers (--cross_projection_dim) and export.ensemble."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from export import ensemble, exporter
from export.client import ServingClient
from qin_tf import metrics, train
from qin_tf.config import ModelConfig
from qin_tf.fingerprint import read_fingerprint
from qin_tf.model import build_model
from qin_tf.spec import FeatureSpec
from tests.cli_in_process import run_main
from tests.test_export import (REPO, SAMPLE_DIR, TINY_DIN, TINY_QIN, TINY_TRANSFORMER_DCN, make_model_dir,
                               make_raw_spec, read_signature_defs, split_rows)

#: The batch-scoring command (it moves to export.score: change it here only).
SCORE_CLI = [sys.executable, "-m", "export.score"]
ENSEMBLE_CLI = [sys.executable, "-m", "export.ensemble"]
SAMPLE_FLAGS = os.path.join(REPO, "configs", "sample.flags")
TEST_PARQUET = os.path.join(SAMPLE_DIR, "test.parquet")


def _env():
    return {**os.environ, "PYTHONPATH": REPO}


def run(cmd, **kwargs):
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600, **kwargs)


def scores_of(version_dir_or_loaded, features, signature="serving_default"):
    loaded = (tf.saved_model.load(version_dir_or_loaded) if isinstance(version_dir_or_loaded, str)
              else version_dir_or_loaded)
    return loaded.signatures[signature](**{k: tf.constant(v) for k, v in features.items()})["ctr"].numpy()


# --------------------------------------------------------------------------
# --cross_projection_dim
# --------------------------------------------------------------------------


def _cross_kernels(model):
    cross = model.get_layer("cross_network")
    return {w.path.split("cross_network/")[1]: tuple(w.shape) for w in cross.weights if w.path.endswith("kernel")}


def test_cross_projection_dim_flag_reaches_the_cross_layers_and_the_default_is_full_rank(sample_spec):
    fv = flags.FlagValues()
    train.define_flags(fv)
    fv(["prog", "--model=transformer_dcn", "--embedding_dim=4", "--transformer_heads=2", "--transformer_ff_units=8",
        "--transformer_last_k=4", "--cross_layers=2", "--din_dnn_units=16", "--head_mlp_units=8",
        "--cross_projection_dim=3"])
    config = train.config_from_flags(fv).model
    assert config.cross_projection_dim == 3
    assert "deviation from the release" in fv["cross_projection_dim"].help
    model = build_model(sample_spec, config)
    d = model.get_layer("dcn_v2_input").output.shape[-1]
    assert _cross_kernels(model) == {f"cross_{i}/{name}": shape for i in range(2) for name, shape in
                                     (("down_projection/kernel", (d, 3)), ("dense/kernel", (3, d)))}
    # the default, as released: one full-rank [D, D] kernel per layer, no projection
    assert ModelConfig().cross_projection_dim is None and TINY_TRANSFORMER_DCN.cross_projection_dim is None
    full = build_model(sample_spec, TINY_TRANSFORMER_DCN)
    assert _cross_kernels(full) == {f"cross_{i}/dense/kernel": (d, d) for i in range(2)}


def test_low_rank_transformer_dcn_trains_and_exports_on_the_sample(sample_spec, tmp_path):
    model_dir, export_base = str(tmp_path / "tdcn"), str(tmp_path / "serving")
    proc = run([sys.executable, "-m", "qin_tf.train", f"--flagfile={SAMPLE_FLAGS}",
                f"--data_dir={sample_spec.base_dir}",
                f"--model_dir={model_dir}", "--model=transformer_dcn", "--embedding_dim=4", "--transformer_heads=2",
                "--transformer_ff_units=8", "--transformer_last_k=4", "--cross_layers=2", "--cross_projection_dim=2",
                "--din_dnn_units=16", "--head_mlp_units=8", "--epochs=2", f"--export_base={export_base}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["model"]["cross_projection_dim"] == 2
    with open(os.path.join(model_dir, "metrics.json")) as f:
        m = json.load(f)
    assert m["export"] == os.path.join(export_base, "1") and np.isfinite(m["splits"]["valid"]["auc"])
    model = exporter.load_keras_model(model_dir)
    d = model.get_layer("dcn_v2_input").output.shape[-1]
    assert _cross_kernels(model)["cross_0/down_projection/kernel"] == (d, 2)
    assert _cross_kernels(model)["cross_1/dense/kernel"] == (2, d)
    features, _, _ = split_rows(sample_spec, "test")
    want = np.asarray(model({k: tf.constant(v) for k, v in features.items()}, training=False)).reshape(-1)
    np.testing.assert_allclose(scores_of(os.path.join(export_base, "1"), features), want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# export.ensemble
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def members(sample_spec, tmp_path_factory):
    """(data dir with vocabularies, [member version dirs]): a tiny QIN and a tiny DIN on the raw-id spec."""
    tmp = tmp_path_factory.mktemp("ensemble_members")
    spec = make_raw_spec(sample_spec, str(tmp / "data"))
    out = []
    for name, config, seed in (("qin", TINY_QIN, 1), ("din", TINY_DIN, 2)):
        model = make_model_dir(sample_spec, str(tmp / f"model_{name}"), config, seed=seed)
        out.append(exporter.export_model(model, spec, str(tmp / f"export_{name}")))
    return spec.base_dir, out


@pytest.fixture(scope="module")
def blended(members, tmp_path_factory):
    """The CLI's ensemble of both members, fitted on valid: (export base, stdout)."""
    data, (a, b) = members
    base = str(tmp_path_factory.mktemp("ensemble") / "ensemble")
    proc = run([*ENSEMBLE_CLI, f"--member={os.path.dirname(a)}", f"--member={b}", f"--data={data}",
                f"--export_base={base}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base, proc.stdout


def test_ensemble_has_a_members_signatures_and_blends_their_logits(sample_spec, members, blended):
    data, paths = members
    base, stdout = blended
    version = os.path.join(base, "1")
    assert stdout.splitlines()[-1] == version
    defs, _ = read_signature_defs(version)
    member_defs, _ = read_signature_defs(paths[0])
    assert set(defs) == set(member_defs) == {"serving_default", "predict_examples", "serving_raw",
                                             "predict_raw_examples", "__saved_model_init_op"}
    for name in ("serving_default", "predict_examples", "serving_raw", "predict_raw_examples"):
        assert {k: (v.name, v.dtype, str(v.tensor_shape)) for k, v in defs[name].inputs.items()} == {
            k: (v.name, v.dtype, str(v.tensor_shape)) for k, v in member_defs[name].inputs.items()}, name
        assert list(defs[name].outputs) == ["ctr"] and defs[name].outputs["ctr"].dtype == tf.float32.as_datatype_enum
        assert str(defs[name].outputs["ctr"].tensor_shape) == str(member_defs[name].outputs["ctr"].tensor_shape)
    # the weights: logistic regression on the members' logits over the valid rows only
    with open(os.path.join(version, ensemble.ENSEMBLE_PATH)) as f:
        record = json.load(f)
    valid, labels, _ = split_rows(sample_spec, "valid")
    member_valid = [scores_of(p, valid) for p in paths]
    w, b = ensemble.fit_weights(member_valid, labels)
    assert (record["split"], record["method"], record["num_rows"]) == ("valid", "fit", len(labels))
    np.testing.assert_allclose(record["weights"] + [record["bias"]], w + [b], rtol=1e-9, atol=1e-12)
    blended_valid = ensemble.blend(member_valid, w, b)
    assert record["metrics"]["ensemble"]["auc"] == pytest.approx(metrics.auc(labels, blended_valid))
    assert record["metrics"]["members"][1]["auc"] == pytest.approx(metrics.auc(labels, member_valid[1]))
    # the ensemble's scores: numpy's sigmoid(sum w_i logit(p_i) + b) of the members' own scores
    features, _, serialized = split_rows(sample_spec, "test")
    loaded = tf.saved_model.load(version)
    want = ensemble.blend([scores_of(p, features) for p in paths], record["weights"], record["bias"])
    got = scores_of(loaded, features)
    assert got.dtype == np.float32 and len(np.unique(got)) > 100
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    got_ex = loaded.signatures["predict_examples"](examples=tf.constant(serialized))["ctr"].numpy()
    np.testing.assert_allclose(got_ex, want, rtol=0, atol=1e-6)
    spec = FeatureSpec.load(data)
    raw, dense = exporter.raw_rows(spec, features)
    np.testing.assert_array_equal(scores_of(loaded, raw, "serving_raw"), scores_of(loaded, dense))
    # what the consumers read: the spec asset, the vocabularies, warm-up requests, the fingerprint
    with open(os.path.join(version, exporter.SPEC_ASSET_PATH), "rb") as f, \
            open(os.path.join(paths[0], exporter.SPEC_ASSET_PATH), "rb") as g:
        assert f.read() == g.read()
    with open(os.path.join(version, "assets", "item_id.txt")) as f:
        assert f.read().splitlines() == spec.read_vocabulary("item_id")
    warmup = list(tf.data.TFRecordDataset(os.path.join(version, exporter.WARMUP_PATH)))
    assert len(warmup) == 8                                        # 4 signatures, batches of 1 and 8
    assert set(read_fingerprint(version)) == {"source", "weights"}  # no model_dir: not one training run's


def test_ensemble_loads_with_tensorflow_alone(blended, members, sample_spec, tmp_path):
    """No qin_tf, no export, no Keras: plain tf.saved_model.load in a fresh process."""
    features, _, _ = split_rows(sample_spec, "test")
    np.savez(tmp_path / "rows.npz", **{k: v[:20] for k, v in features.items()})
    want = scores_of(os.path.join(blended[0], "1"), {k: v[:20] for k, v in features.items()})
    script = textwrap.dedent(f"""
        import sys
        for name in ("qin_tf", "export", "keras", "keras_rs"):
            sys.modules[name] = None                    # importing any of them fails
        import numpy as np, tensorflow as tf
        rows = dict(np.load({str(tmp_path / "rows.npz")!r}))
        loaded = tf.saved_model.load({os.path.join(blended[0], "1")!r})
        out = loaded.signatures["serving_default"](**{{k: tf.constant(v) for k, v in rows.items()}})["ctr"]
        np.save({str(tmp_path / "out.npy")!r}, out.numpy())
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)


def test_one_member_with_weight_one_is_that_member_bitwise(sample_spec, members, tmp_path):
    data, (a, _) = members
    version, record = ensemble.export_ensemble([a], data, str(tmp_path / "one"), weights="1")
    assert (record["weights"], record["bias"], record["pass_through"]) == ([1.0], 0.0, True)
    features, _, serialized = split_rows(sample_spec, "test")
    ens, member = tf.saved_model.load(version), tf.saved_model.load(a)
    np.testing.assert_array_equal(scores_of(ens, features), scores_of(member, features))
    examples = tf.constant(serialized)
    np.testing.assert_array_equal(ens.signatures["predict_examples"](examples=examples)["ctr"].numpy(),
                                  member.signatures["predict_examples"](examples=examples)["ctr"].numpy())
    raw, _ = exporter.raw_rows(FeatureSpec.load(data), features)
    np.testing.assert_array_equal(scores_of(ens, raw, "serving_raw"), scores_of(member, raw, "serving_raw"))
    # the next ensemble into the same base is the next version; equal weights of one member are 1 too
    version2, record2 = ensemble.export_ensemble([a], data, str(tmp_path / "one"), weights="equal")
    assert version2 == str(tmp_path / "one" / "2") and record2["pass_through"]
    np.testing.assert_array_equal(scores_of(version2, features), scores_of(member, features))


@pytest.mark.parametrize("weights, want", [("equal", [0.5, 0.5]), ("0.25,-1.5", [0.25, -1.5])])
def test_equal_and_given_weights_have_no_bias(sample_spec, members, tmp_path, weights, want):
    data, paths = members
    version, record = ensemble.export_ensemble(paths, data, str(tmp_path / "ens"), weights=weights)
    assert (record["weights"], record["bias"], record["method"]) == (want, 0.0, "given" if "," in weights else weights)
    features, _, _ = split_rows(sample_spec, "test")
    np.testing.assert_allclose(scores_of(version, features),
                               ensemble.blend([scores_of(p, features) for p in paths], want, 0.0), rtol=0, atol=1e-6)


def test_fit_weights_recovers_a_known_blend():
    """Labels drawn from sigmoid(1.5 logit(p1) - 0.5 logit(p2) + 0.3): the fit finds those weights."""
    rng = np.random.default_rng(0)
    p = [1.0 / (1.0 + np.exp(-rng.normal(0, 1.5, 200_000))) for _ in range(2)]
    y = rng.random(200_000) < ensemble.blend(p, [1.5, -0.5], 0.3)
    w, b = ensemble.fit_weights(p, y)
    np.testing.assert_allclose(w + [b], [1.5, -0.5, 0.3], atol=0.03)


def test_bad_ensembles_are_one_line_and_write_nothing(sample_spec, members, tmp_path):
    data, (a, b) = members
    other = exporter.export_model(make_model_dir(sample_spec, str(tmp_path / "m"), TINY_QIN, seed=3), sample_spec,
                                  str(tmp_path / "other"))                 # the sample's spec: no vocabularies
    out = str(tmp_path / "ens")
    cases = {
        "split": ([f"--member={a}", f"--member={b}", "--split=test"], "--split=test: the blend weights are fitted on "
                                                                      "valid rows only"),
        "spec": ([f"--member={a}", f"--member={other}"], f"{other}: its feature spec differs from {a}'s: vocabularies"),
        "weights": ([f"--member={a}", f"--member={b}", "--weights=1,2,3"], "--weights=1,2,3: 3 weight(s) for 2"),
        "inside": ([f"--member={a}", f"--member={b}", f"--export_base={os.path.dirname(a)}"],
                   f"--export_base={os.path.dirname(a)}: overlaps the input"),
        "no_member": ([f"--member={a}", f"--member={tmp_path / 'typo'}"], f"{tmp_path / 'typo'}: no such directory"),
        "no_data": ([f"--member={a}", f"--member={b}", f"--data={tmp_path / 'nodata'}"], f"{tmp_path / 'nodata'}"),
    }
    for name, (args, message) in cases.items():
        if not any(x.startswith("--export_base") for x in args):
            args = args + [f"--export_base={out}"]
        if not any(x.startswith("--data") for x in args):
            args = args + [f"--data={data}"]
        # Launched once; the other cases run the same main with the same flags in process.
        proc = run([*ENSEMBLE_CLI, *args]) if name == "spec" else run_main("export.ensemble", *args)
        assert proc.returncode == 1, (name, proc.stderr)
        assert proc.stderr.startswith("ensemble: error: " + message), (name, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert proc.stdout == "" and not os.path.exists(out), name
    assert exporter.list_versions(os.path.dirname(a)) == [1]


def test_local_server_serves_the_ensemble(sample_spec, blended):
    features, _, _ = split_rows(sample_spec, "test")
    rows = {k: np.ascontiguousarray(v[:50]) for k, v in features.items()}
    want = scores_of(os.path.join(blended[0], "1"), rows)
    proc = subprocess.Popen([sys.executable, "-m", "export.local_server", f"--model_base_path={blended[0]}",
                             "--port=0"], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert "development server" in line, line + (proc.stderr.read()[-3000:] if proc.poll() is not None else "")
        address = line.split(" on ")[1].split(" ")[0]
        with ServingClient(address, "qin") as client:
            got = client.predict(rows)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_batch_scoring_scores_the_ensemble(sample_spec, members, blended, tmp_path):
    out = tmp_path / "scores.csv"
    proc = run([*SCORE_CLI, f"--saved_model={blended[0]}", f"--input={TEST_PARQUET}", f"--output={out}",
                "--format=challenge"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        rows = list(csv.reader(f))
    got = np.array([float(r[1]) for r in rows[1:]])
    features, labels, _ = split_rows(sample_spec, "test")
    with open(os.path.join(blended[0], "1", ensemble.ENSEMBLE_PATH)) as f:
        record = json.load(f)
    want = ensemble.blend([scores_of(p, features) for p in members[1]], record["weights"], record["bias"])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert f"AUC {metrics.auc(labels, want):.4f}" in proc.stdout


def test_a_failed_ensemble_leaves_nothing(members, tmp_path, monkeypatch):
    """A version that fails its check is removed, and so is the export base the run created."""
    data, paths = members

    def disagree(*args, **kwargs):
        raise exporter.ExportError("the exported ensemble disagrees with the members' blended scores.")

    monkeypatch.setattr(ensemble, "_verify", disagree)
    with pytest.raises(exporter.ExportError, match="disagrees"):
        ensemble.export_ensemble(paths, data, str(tmp_path / "ens"), weights="equal")
    assert os.listdir(tmp_path) == []


def test_evaluate_exports_reports_each_versions_metrics_on_each_split(sample_spec, members, blended, tmp_path, capsys):
    """scripts/evaluate_exports.py (RESULTS.md's ensemble table): the exact AUC and log loss of each
    version's scores on every row of each split; a missing version is one line and exit 1."""
    from tests.conftest import load_script

    data, paths = members
    base, _ = blended
    ev = load_script("evaluate_exports")
    out = tmp_path / "metrics.jsonl"
    assert ev.main([f"QIN={paths[0]}", f"ens={base}", f"--data={data}", "--splits=valid,test", f"--out={out}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["name"], r["split"]) for r in records] == [("QIN", "valid"), ("QIN", "test"), ("ens", "valid"),
                                                          ("ens", "test")]
    assert records[2]["version_dir"] == os.path.join(base, "1")
    for r in records:
        features, labels, _ = split_rows(sample_spec, r["split"])
        scores = scores_of(r["version_dir"], features)
        assert r["rows"] == len(labels)
        assert r["auc"] == pytest.approx(metrics.auc(labels, scores), abs=1e-12)
        assert r["logloss"] == pytest.approx(metrics.evaluate(labels, scores)["logloss"], rel=1e-6)
    assert lines[-2:-1] == [f"| QIN | {records[0]['auc']:.4f} | {records[0]['logloss']:.4f} | "
                            f"{records[1]['auc']:.4f} | {records[1]['logloss']:.4f} |"]
    assert ev.main([f"x={tmp_path / 'none'}", f"--data={data}"]) == 1
    assert capsys.readouterr().err == (f"evaluate_exports: error: {tmp_path / 'none'}: no such directory; "
                                       "x is an export base or one of its version directories.\n")
    with pytest.raises(SystemExit):                   # an existing --out is refused before anything runs
        ev.main([f"QIN={paths[0]}", f"--data={data}", f"--out={out}"])
