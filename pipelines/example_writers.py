"""Writing a build's outputs in workers: the split parquet files and the item table (:mod:`pipelines.build_examples`).

* :class:`WriteShard`: one shard's rows -> a part file under ``_parts/``.
* :class:`ConcatSplit`: a split's parts -> ``{split}.parquet``, in order.
* :func:`write_item_info`: ``item_info.parquet`` (row ``i`` = dense item ``i``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import beamio
from pipelines.beamio import beam  # imported quietly
from pipelines.logs_config import LogsConfig
from qin_tf.rows import PreprocessError

#: The item table's vector column (the MMCTR layout's name).
EMBEDDING_COLUMN = "item_emb_d128"
#: Where the workers write their parts inside the temporary directory.
PARTS_DIR = "_parts"

# --------------------------------------------------------------------------
# Writers (in workers)
# --------------------------------------------------------------------------


def examples_schema(cfg: LogsConfig) -> pa.Schema:
    fields = [pa.field("user_id", pa.int64()), pa.field("item_seq", pa.list_(pa.int64()))]
    fields += [pa.field(n, pa.int64()) for n in cfg.context_names]
    fields += [pa.field("item_id", pa.int64()), pa.field("label", pa.int64())]
    return pa.schema(fields)


class WriteShard(beam.DoFn):
    """((split, shard), rows) -> (split, (shard, part path)): the shard's rows sorted by user, time."""

    def __init__(self, cfg: LogsConfig, work_dir: str):
        self.cfg, self.work_dir = cfg, work_dir

    def process(self, element):
        (split, shard), rows = element
        rows = sorted(rows, key=lambda r: r[:3])
        schema = examples_schema(self.cfg)
        table = pa.Table.from_pylist([r[3] for r in rows], schema=schema)
        path = beamio.join(self.work_dir, PARTS_DIR, f"{split}-{shard:05d}.parquet")
        with beamio.create(path) as f:
            pq.write_table(table, f, compression="zstd")
        yield split, (shard, path)


class ConcatSplit(beam.DoFn):
    """(split, parts) -> the split's one parquet file, the parts streamed in shard order."""

    def __init__(self, cfg: LogsConfig, work_dir: str):
        self.cfg, self.work_dir = cfg, work_dir

    def process(self, element):
        split, parts = element
        schema = examples_schema(self.cfg)
        with beamio.create(beamio.join(self.work_dir, f"{split}.parquet")) as f:
            with pq.ParquetWriter(f, schema, compression="zstd") as w:
                for _, path in sorted(parts):
                    with beamio.open_read(path) as src:
                        for batch in pq.ParquetFile(src).iter_batches(batch_size=65536):
                            w.write_batch(batch)
        for _, path in parts:
            beamio.delete(path)
        yield split


def write_item_info(path: str, n_ids: int, rows: list, tag_width: int):
    """Item table: row i = dense item i; rows not given (padding, OOV, no catalog row) are empty.

    ``rows``: ``(dense id, tag ids, vector or None[, where])``; ``where`` (the
    vector's file, row and column) names both vectors when widths differ: the
    width is that of the lowest dense id's vector.
    """
    rows = sorted(rows, key=lambda r: r[0])
    first = next((r for r in rows if r[2] is not None and r[0] >= 2), None)
    dim = len(first[2]) if first is not None else 1
    tags = np.zeros((n_ids, tag_width), np.int64)
    emb = np.zeros((n_ids, dim), np.float32)
    for r in rows:
        i, t, v = r[:3]
        if i < 2:
            continue  # OOV / unmapped items carry nothing
        if t:
            tags[i, tag_width - len(t):] = t
        if v is not None:
            if len(v) != dim:
                at = r[3] if len(r) > 3 and r[3] else None
                ref = first[3] if len(first) > 3 and first[3] else None
                raise PreprocessError(f"{at + ': ' if at else ''}the item vector has width {len(v)}, but "
                                      f"{'the one at ' + ref if ref else 'another'} has width {dim}; every vector "
                                      "must have the same width")
            emb[i] = v
    table = pa.table({
        "item_id": pa.array(np.arange(n_ids, dtype=np.int64)),
        "item_tags": pa.FixedSizeListArray.from_arrays(pa.array(tags.ravel()), tag_width).cast(pa.list_(pa.int64())),
        EMBEDDING_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim).cast(pa.list_(pa.float32())),
    })
    with beamio.create(path) as f:
        pq.write_table(table, f, compression="zstd")
