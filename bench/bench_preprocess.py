"""Benchmark: the preprocessing pipeline end to end on a whole dataset.

    python bench/bench_preprocess.py --input_dir=../shared/data/microlens50k_mmctr \\
        [--output_dir=/tmp/bench_pp] [--dataset_config=microlens50k|PATH.json] \\
        [--max_len=64] [--num_shards=N] [Beam options, e.g. --direct_running_mode=multi_processing]

Runs ``pipelines.preprocess.preprocess`` once, in this process, and prints one
JSON line (``bench/common.py``): the wall time of the call, rows per second
and the peak resident set size (this process and, for ``multi_processing``,
its worker processes; a worker's figure is at least this process's size when
it started the worker, as Linux carries the high-water mark across fork).
Then it checks,
outside the timed part, that every split's rows in (parquet metadata) equal
its rows out, counted in the TFRecord files themselves (gzip stream walked
record by record, without TensorFlow) and in the feature spec. Without
``--output_dir`` the output goes to a temporary directory that is removed.
"""

from __future__ import annotations

import gzip
import os
import resource
import shutil
import struct
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

_INPUT = flags.DEFINE_string("input_dir", None, "Dataset directory in the MMCTR layout.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where to write (default: a temporary directory, removed).")
_CONFIG = flags.DEFINE_string("dataset_config", "microlens50k", "Dataset config: a JSON path or a bundled name.")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "History length (default: the config's).")
_SHARDS = flags.DEFINE_integer("num_shards", None, "Shards per split (default: automatic).")
flags.mark_flag_as_required("input_dir")


def count_records(path: str) -> int:
    """Records in a GZIP TFRecord file (walks the length headers)."""
    n = 0
    with gzip.open(path, "rb") as f:
        while True:
            header = f.read(12)
            if not header:
                return n
            if len(header) < 12:
                raise ValueError(f"{path}: truncated record header")
            (length,) = struct.unpack("<Q", header[:8])
            f.seek(length + 4, os.SEEK_CUR)
            n += 1


def _peak_rss_mb() -> tuple[float, float]:
    kb = 1024.0  # ru_maxrss is in KiB on Linux
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kb)


def main(argv):
    import logging

    import pyarrow.parquet as pq
    from absl import logging as absl_logging

    from pipelines import preprocess as pp

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)

    beam_args = argv[1:]
    cfg = pp.resolve_dataset_config(_CONFIG.value).with_max_len(_MAX_LEN.value)
    rows_in = {s: pq.ParquetFile(os.path.join(_INPUT.value, sc.file)).metadata.num_rows
               for s, sc in cfg.splits.items()}
    out = _OUTPUT.value or tempfile.mkdtemp(prefix="bench_preprocess_")
    if not _OUTPUT.value:
        os.rmdir(out)
    try:
        t0 = time.perf_counter()
        spec = pp.preprocess(_INPUT.value, out, cfg, num_shards=_SHARDS.value, beam_options=beam_args)
        wall = time.perf_counter() - t0
        rss_self, rss_children = _peak_rss_mb()

        total = sum(rows_in.values())
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                   if os.path.isfile(os.path.join(out, f)))
        splits = {}
        for split in cfg.splits:
            in_files = sum(count_records(p) for p in spec.split_files(split))
            assert in_files == spec.splits[split].num_rows == rows_in[split], (
                f"{split}: rows in {rows_in[split]}, spec {spec.splits[split].num_rows}, records {in_files}")
            splits[split] = {"rows_in": rows_in[split], "records_out": in_files,
                             "shards": len(spec.splits[split].files)}
        common.emit({"bench": "preprocess", "input_dir": _INPUT.value, "max_len": spec.max_len,
                     "beam_args": beam_args, "rows": total, "seconds": round(wall, 2),
                     "rows_per_s": round(total / wall), "splits": splits,
                     "output_mb": round(size / 2**20, 1), "peak_rss_mb": round(rss_self, 1),
                     "workers_peak_rss_mb": round(rss_children, 1)})
    finally:
        if not _OUTPUT.value:
            shutil.rmtree(out, ignore_errors=True)


def _parse(argv):
    return flags.FLAGS(argv, known_only=True)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
