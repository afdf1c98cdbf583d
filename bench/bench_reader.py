"""Reader throughput: records/s of ``qin_tf.data.make_dataset`` over a preprocessed split.

    python bench/bench_reader.py --data_dir=runs/microlens50k/data [--split=train] \\
        [--batch_size=8192] [--epochs=3] [--training]

Reads the split ``--epochs`` times with the reader training and evaluation
use (``--training``: shuffled, seeded, as ``qin_tf.train`` reads it: in
memory, a fresh permutation per pass, or with ``--cache=false`` streamed
from the files through the shuffle buffer; otherwise in row order, as
evaluation reads it), counts every record, and checks the count against the
spec. ``setup_s`` is the time ``make_dataset`` takes (the in-memory read
loads the split there); the first pass includes the file-cache warm-up; the
best pass is reported, and the first pass with the setup. Prints one JSON
line (``bench/common.py``): records/s per pass, the best, and the peak RSS.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402

_DATA = flags.DEFINE_string("data_dir", None, "Preprocessing output (holds feature_spec.json).", required=True)
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_BATCH = flags.DEFINE_integer("batch_size", 8192, "Global batch size.", lower_bound=1)
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Passes over the split.", lower_bound=1)
_TRAINING = flags.DEFINE_bool("training", False, "Read as for training (shuffled) instead of evaluation.")
_SHUFFLE_BUFFER = flags.DEFINE_integer("shuffle_buffer", None, "Records in the shuffle buffer "
                                       "(default: the reader's).", lower_bound=1)
_CACHE = flags.DEFINE_enum("cache", "auto", ["auto", "true", "false"], "make_dataset's `cache`: auto = the "
                           "reader's default (training: in memory when it fits); false = training streams "
                           "from the files through the shuffle buffer.")


def main(argv):
    del argv
    from qin_tf.runtime import import_tensorflow

    import_tensorflow()
    from qin_tf.data import DEFAULT_SHUFFLE_BUFFER, make_dataset
    from qin_tf.spec import FeatureSpec

    spec = FeatureSpec.load(_DATA.value)
    expected = spec.splits[_SPLIT.value].num_rows
    buffer = _SHUFFLE_BUFFER.value or DEFAULT_SHUFFLE_BUFFER
    cache = {"auto": None, "true": True, "false": False}[_CACHE.value]
    t0 = time.perf_counter()
    ds = make_dataset(spec, _SPLIT.value, _BATCH.value, training=_TRAINING.value, seed=0, shuffle_buffer=buffer,
                      cache=cache)
    setup = time.perf_counter() - t0
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
        common.log(f"pass {len(rates)}: {n / dt:,.0f} records/s")
    common.emit({
        "bench": "reader", "split": _SPLIT.value, "records": expected, "batch_size": _BATCH.value,
        "training": _TRAINING.value, "cache": _CACHE.value,
        "shuffle_buffer": buffer if _TRAINING.value and _CACHE.value == "false" else None,
        "setup_s": round(setup, 3), "records_per_s": [round(r) for r in rates],
        "first_pass_with_setup_records_per_s": round(expected / (setup + expected / rates[0])),
        "best_records_per_s": round(max(rates)),
    })


if __name__ == "__main__":
    app.run(main)
