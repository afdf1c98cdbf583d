"""The machine's matrix-product rate: the bound on QIN's throughput here.

    python bench/bench_gemm.py [--m=8192] [--k=896] [--n=3584] [--repeats=10]

Times ``[m, k] x [k, n]`` in a ``tf.function`` (oneDNN on x86, all cores),
float32 and bfloat16, best of ``--repeats``; the default shape is one QNN
quadratic layer of the released QIN at batch 8192 (``D = 896``, ``R D =
3584``), the product that dominates training. Prints one JSON line
(``bench/common.py``) with GFLOP/s (2 m k n per product).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from bench import common  # noqa: E402

_M = flags.DEFINE_integer("m", 8192, "Rows of the left operand (the batch).", lower_bound=1)
_K = flags.DEFINE_integer("k", 896, "Inner dimension.", lower_bound=1)
_N = flags.DEFINE_integer("n", 3584, "Columns of the right operand.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed products per dtype; the best counts.", lower_bound=1)


def main(argv):
    del argv
    from qin_tf.runtime import import_tensorflow

    tf = import_tensorflow()
    m, k, n = _M.value, _K.value, _N.value
    a, b = tf.random.normal([m, k]), tf.random.normal([k, n])
    product = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)))
    record = {"bench": "gemm", "m": m, "k": k, "n": n}
    for dtype in ("float32", "bfloat16"):
        x, y = tf.cast(a, dtype), tf.cast(b, dtype)
        product(x, y).numpy()
        best = float("inf")
        for _ in range(_REPEATS.value):
            t0 = time.perf_counter()
            product(x, y).numpy()
            best = min(best, time.perf_counter() - t0)
        record[f"{dtype}_ms"] = round(best * 1e3, 2)
        record[f"{dtype}_gflops"] = round(2 * m * k * n / best / 1e9, 1)
        common.log(f"{dtype}: {best * 1e3:.1f} ms, {record[f'{dtype}_gflops']} GFLOP/s")
    common.emit(record)


if __name__ == "__main__":
    app.run(main)
