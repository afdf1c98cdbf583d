"""Checks a MicroLens build (pipelines.build_examples) against the shared MMCTR set, row for row.

    python -m pipelines.build_examples --config=configs/logs/microlens50k.json --output_dir=/tmp/ml_built
    python scripts/check_microlens_build.py --built=/tmp/ml_built \\
        --reference=../shared/data/microlens50k_mmctr

The positive rows, mapped back to raw ids through the build's vocabularies,
must equal the reference's positive rows exactly, as multisets of
(user_id, item_id, item_seq), split by split; the row counts must match too.
Negatives and views_level are compared and reported, not required to match
(the negatives are another uniform draw; views_level's deciles may cut the
counts differently). Exit status 0 when the positives and counts match.
The same check runs in tests/test_build_examples.py on the bundled sample.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.build_examples import DATASET_CONFIG_FILENAME  # noqa: E402
from pipelines.user_examples import SPLITS  # noqa: E402
from pipelines.vocabularies import read_vocab  # noqa: E402


def raw_rows(built: str, split: str, item_map=None):
    """The split's rows with raw item ids: [(user, item, seq tuple, label, views_level)]."""
    with open(os.path.join(built, DATASET_CONFIG_FILENAME)) as f:
        v = json.load(f)["vocabularies"]["item_id"]
    order = read_vocab(os.path.join(built, v["path"]), v["dtype"])
    raw = lambda d: order[d - 2] if d >= 2 else None  # noqa: E731
    t = pq.read_table(os.path.join(built, f"{split}.parquet")).to_pydict()
    out = []
    for u, i, s, y, lv in zip(t["user_id"], t["item_id"], t["item_seq"], t["label"], t["views_level"]):
        i, s = raw(i), tuple(raw(x) for x in s)
        if item_map is not None:
            i, s = item_map.get(i), tuple(item_map.get(x) for x in s)
        out.append((u, i, s, y, lv))
    return out


def reference_rows(reference: str, split: str):
    t = pq.read_table(os.path.join(reference, f"{split}.parquet")).to_pydict()
    return [(u, i, tuple(x for x in s if x), y, lv)
            for u, i, s, y, lv in zip(t["user_id"], t["item_id"], t["item_seq"], t["label"], t["views_level"])]


def compare(built_rows, ref_rows) -> dict:
    pos_b = collections.Counter(r[:3] for r in built_rows if r[3] == 1)
    pos_r = collections.Counter(r[:3] for r in ref_rows if r[3] == 1)
    lv_r = {r[:3]: r[4] for r in ref_rows if r[3] == 1}
    same_level = sum(1 for r in built_rows if r[3] == 1 and lv_r.get(r[:3]) == r[4])
    neg_b = {(r[0], r[2], r[1]) for r in built_rows if r[3] == 0}
    neg_r = {(r[0], r[2], r[1]) for r in ref_rows if r[3] == 0}
    return {"rows": len(built_rows), "reference_rows": len(ref_rows),
            "positives": sum(pos_b.values()), "reference_positives": sum(pos_r.values()),
            "positives_equal": pos_b == pos_r,
            "positives_only_built": sum((pos_b - pos_r).values()),
            "positives_only_reference": sum((pos_r - pos_b).values()),
            "positive_views_level_equal": same_level,
            "negatives_equal": len(neg_b & neg_r)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--built", required=True)
    ap.add_argument("--reference", default="../shared/data/microlens50k_mmctr")
    args = ap.parse_args(argv)
    ok = True
    for split in SPLITS:
        r = compare(raw_rows(args.built, split), reference_rows(args.reference, split))
        ok &= r["positives_equal"] and r["rows"] == r["reference_rows"]
        print(split, json.dumps(r))
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
