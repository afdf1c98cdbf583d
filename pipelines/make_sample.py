r"""Cuts the bundled sample out of MicroLens-50k in the MMCTR layout.

    python -m pipelines.make_sample --input_dir=../shared/data/microlens50k_mmctr \
        --output_dir=data/microlens_sample --num_users=300 --seed=0

Keeps every row (train, valid, test) of ``num_users`` users drawn at random,
and the item table rows those rows touch (targets and histories). Item ids
are remapped to ``1..K`` in the order of the original ids so that the item
table stays dense (row i = item i, row 0 = padding); nothing else changes.
Each row brings about one new item (its uniformly sampled negative), and an
item carries 512 bytes of embedding, so the sample's size grows by about
0.5 KB per row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from absl import flags

from pipelines import beamio  # Beam's FileSystems: local paths or URLs (gs://...)
from qin_tf.cli import exit_error

SPLITS = ("train", "valid", "test")


def _define_flags() -> None:
    """The command line flags, defined only when the module runs as a program, so :func:`make_sample`
    imports anywhere beside other modules' absl flags of the same names (``--output_dir``, ``--seed``)."""
    flags.DEFINE_string("input_dir", None, "MMCTR-layout directory to cut from.", required=True)
    flags.DEFINE_string("output_dir", None, "Where to write the sample.", required=True)
    flags.DEFINE_integer("num_users", 300, "How many users to keep.")
    flags.DEFINE_integer("seed", 0, "Seed of the user draw.")


def _read(path: str) -> pa.Table:
    with beamio.open_read(path) as f:
        return pq.read_table(f)


def _write(table: pa.Table, path: str):
    with beamio.create(path) as f:
        pq.write_table(table, f, compression="zstd")


def make_sample(input_dir: str, output_dir: str, num_users: int, seed: int) -> dict[str, int]:
    tables = {s: _read(beamio.join(input_dir, f"{s}.parquet")) for s in SPLITS}
    users = np.unique(np.concatenate([t["user_id"].to_numpy() for t in tables.values()]))
    keep = np.sort(np.random.default_rng(seed).choice(users, size=num_users, replace=False))
    tables = {s: t.filter(pc.is_in(t["user_id"], pa.array(keep))) for s, t in tables.items()}

    touched = np.unique(np.concatenate(
        [np.concatenate([t["item_id"].to_numpy(), pc.list_flatten(t["item_seq"]).to_numpy()])
         for t in tables.values()]))
    touched = touched[touched != 0]
    remap = np.zeros(int(touched.max()) + 1, dtype=np.int64)
    remap[touched] = np.arange(1, len(touched) + 1)

    beamio.makedirs(output_dir)
    for split, t in tables.items():
        seq = t["item_seq"].combine_chunks()
        new_seq = pa.ListArray.from_arrays(seq.offsets, pa.array(remap[seq.flatten().to_numpy()]))
        t = t.set_column(t.schema.get_field_index("item_seq"), "item_seq", new_seq)
        t = t.set_column(t.schema.get_field_index("item_id"), "item_id",
                         pa.array(remap[t["item_id"].to_numpy()]))
        _write(t, beamio.join(output_dir, f"{split}.parquet"))

    items = _read(beamio.join(input_dir, "item_info.parquet"))
    rows = np.concatenate([[0], touched])
    items = items.take(pa.array(rows))
    items = items.set_column(items.schema.get_field_index("item_id"), "item_id",
                             pa.array(np.arange(len(rows), dtype=np.int64)))
    _write(items, beamio.join(output_dir, "item_info.parquet"))
    counts = {s: t.num_rows for s, t in tables.items()}
    counts["items"] = len(rows)
    return counts


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        counts = make_sample(f.input_dir, f.output_dir, f.num_users, f.seed)
    except (OSError, ValueError) as e:  # a missing or unreadable split file: one line, no traceback
        exit_error("make_sample", e)
    print(" ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    from qin_tf.runtime import run_app

    _define_flags()
    run_app(main)
