"""Reader throughput: records/s of ``qin_tf.data.make_dataset`` over a preprocessed split.

    python bench/bench_reader.py --data_dir=runs/ml50k/data [--split=train] \
        [--batch_size=8192] [--epochs=3] [--training]

Reads the split ``--epochs`` times (the first pass includes file-cache
warm-up; the best pass is reported), counts every record, and checks the
count against the spec. Prints one JSON line: records/s per pass, the best,
and the peak RSS of the process.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from qin_tf.runtime import import_tensorflow  # noqa: E402

_DATA = flags.DEFINE_string("data_dir", None, "Preprocessing output (holds feature_spec.json).", required=True)
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_BATCH = flags.DEFINE_integer("batch_size", 8192, "Global batch size.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Passes over the split.")
_TRAINING = flags.DEFINE_bool("training", False, "Read as for training (shuffled) instead of evaluation.")


def main(argv):
    del argv
    import_tensorflow()
    from qin_tf.data import make_dataset
    from qin_tf.spec import FeatureSpec

    spec = FeatureSpec.load(_DATA.value)
    expected = spec.splits[_SPLIT.value].num_rows
    ds = make_dataset(spec, _SPLIT.value, _BATCH.value, training=_TRAINING.value, seed=0)
    rates = []
    for _ in range(_EPOCHS.value):
        n, t0 = 0, time.perf_counter()
        for batch in ds:
            x = batch[0] if isinstance(batch, tuple) else batch
            n += int(x[spec.target_item].shape[0])
        dt = time.perf_counter() - t0
        if n != expected:
            raise SystemExit(f"read {n} records, the spec says {expected}")
        rates.append(n / dt)
    print(json.dumps({
        "bench": "reader", "split": _SPLIT.value, "records": expected, "batch_size": _BATCH.value,
        "training": _TRAINING.value, "records_per_s": [round(r) for r in rates],
        "best_records_per_s": round(max(rates)),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))


if __name__ == "__main__":
    app.run(main)
