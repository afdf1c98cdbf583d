"""Latency of the exported ``serving_default`` signature, QNN rows folded or not.

    python -m export.bench_latency --data_dir=runs/sample/data [--model_dir=runs/sample/model]

Exports the model twice into a temporary directory (``fold_qnn=True`` and
``False``), loads both with ``tf.saved_model.load`` and times one call per
batch size, alternating the two exports; each figure is the best of
``--repeats`` runs of ``--calls`` calls, which is robust to other load on the
machine. Without ``--model_dir`` it builds an untrained QIN with the released
hyperparameters (latency does not depend on the weights' values). Inputs are
the first rows of the spec's test split.
"""

from __future__ import annotations

import tempfile
import time


def bench(data_dir: str, model_dir: str | None, batch_sizes, repeats: int, calls: int) -> list[dict]:
    import tensorflow as tf

    from export import exporter
    from qin_tf.config import ModelConfig
    from qin_tf.model import build_model
    from qin_tf.spec import FeatureSpec

    spec = FeatureSpec.load(data_dir)
    model = exporter.load_keras_model(model_dir) if model_dir else build_model(spec, ModelConfig())
    rows = exporter.read_examples(spec, max(batch_sizes))
    features = exporter.parse_examples(spec, rows)
    signatures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fold in (True, False):
            path = exporter.export_model(model, spec, f"{tmp}/{fold}", fold_qnn=fold, warmup_examples=rows[:8])
            signatures[fold] = tf.saved_model.load(path).signatures[exporter.SERVING_SIGNATURE]
        out = []
        for n in batch_sizes:
            x = {k: tf.constant(v[:n]) for k, v in features.items()}
            best = {True: float("inf"), False: float("inf")}
            for _ in range(repeats):
                for fold, sig in signatures.items():
                    sig(**x)
                    start = time.perf_counter()
                    for _ in range(calls):
                        sig(**x)
                    best[fold] = min(best[fold], (time.perf_counter() - start) / calls)
            out.append({"batch": min(n, len(rows)), "folded_ms": best[True] * 1e3, "unfolded_ms": best[False] * 1e3})
    return out


def main(argv):
    del argv
    import os

    from absl import flags

    FLAGS = flags.FLAGS
    sizes = [int(s) for s in FLAGS.batch_sizes]
    results = bench(FLAGS.data_dir, FLAGS.model_dir, sizes, FLAGS.repeats, FLAGS.calls)
    print(f"serving_default latency, best of {FLAGS.repeats} x {FLAGS.calls} calls, {os.cpu_count()} CPUs")
    print(f"{'batch':>6} {'folded ms':>10} {'unfolded ms':>12}")
    for r in results:
        print(f"{r['batch']:>6} {r['folded_ms']:>10.2f} {r['unfolded_ms']:>12.2f}")


if __name__ == "__main__":
    from qin_tf.runtime import import_tensorflow

    import_tensorflow()
    from absl import app, flags

    flags.DEFINE_string("data_dir", None, "Output directory of pipelines.preprocess.", required=True)
    flags.DEFINE_string("model_dir", None, "Training run directory (best.keras); default: an untrained QIN.")
    flags.DEFINE_list("batch_sizes", ["1", "16", "256"], "Rows per call.")
    flags.DEFINE_integer("repeats", 15, "Timed runs per batch size and export; the best counts.", lower_bound=1)
    flags.DEFINE_integer("calls", 10, "Calls per timed run.", lower_bound=1)
    app.run(main)
