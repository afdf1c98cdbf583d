"""Whole-build statistics -> vocabularies, for :mod:`pipelines.build_examples`.

The combiners that merge the workers' counts (:class:`MergeDicts`,
:class:`FirstError`), the vocabularies built from the training period's
counts (:func:`build_items`, :func:`build_contexts`, :func:`vocabulary`:
frequency descending, ties by raw id; an incremental build appends, never
renumbers), popularity levels, and the vocabulary files
(:func:`write_vocab`, :func:`read_vocab`: one raw id a line, line ``n``
(0-based) is dense id ``n + 2``).
"""

from __future__ import annotations

import numpy as np

from pipelines import beamio, incremental
from pipelines.beamio import beam  # imported quietly
from pipelines.log_readers import raw_key
from pipelines.logs_config import LogsConfig

#: Dense ids: 0 is padding, 1 the out-of-vocabulary id; raw ids start at 2.
PADDING_ID, OOV_ID = 0, 1

# --------------------------------------------------------------------------
# Global statistics (combiners' results -> vocabularies)
# --------------------------------------------------------------------------


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            out[k] = _merge(out.get(k, {}), v)
        else:
            out[k] = out.get(k, 0) + v
    return out


class MergeDicts(beam.CombineFn):
    def create_accumulator(self):
        return {}

    def add_input(self, acc, x):
        return _merge(acc, x)

    def merge_accumulators(self, accs):
        out = {}
        for a in accs:
            out = _merge(out, a)
        return out

    def extract_output(self, acc):
        return acc


class FirstError(beam.CombineFn):
    """The first bad row in file order (schema-level problems, row None, first)."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, x):
        return x if acc is None or x["order"] < acc["order"] else acc

    def merge_accumulators(self, accs):
        out = None
        for a in accs:
            if a is not None:
                out = self.add_input(out, a)
        return out

    def extract_output(self, acc):
        return acc


def vocabulary(counts: dict, min_count: int, always=()) -> list:
    """Raw ids by count descending, ties by raw id: those with ``count >= min_count`` or in ``always``."""
    always = set(always)
    keep = [x for x, n in counts.items() if n >= min_count or x in always]
    keep += [x for x in always if x not in counts]
    return sorted(set(keep), key=lambda x: (-counts.get(x, 0), raw_key(x)))


def indexed(order: list) -> dict:
    """``{"order": raw ids, "dense": raw id -> dense id}`` (line n of the file = dense id n + 1)."""
    return {"order": order, "dense": {x: i + 2 for i, x in enumerate(order)}}


def popularity_edges(counts: np.ndarray) -> np.ndarray:
    """The 9 decile edges of the positive counts (the items' count quantiles); empty when no count is positive."""
    seen = counts[counts > 0]
    return np.quantile(seen, np.linspace(0.1, 0.9, 9)) if len(seen) else np.zeros(0)


def popularity_levels(counts: np.ndarray, edges: np.ndarray | None = None) -> np.ndarray:
    """Decile 1..10 of each count among the positive counts (by the items' count quantiles); 0 where 0."""
    counts = np.asarray(counts)
    edges = popularity_edges(counts) if edges is None else np.asarray(edges)
    out = np.zeros(len(counts), np.int64)
    seen = counts > 0
    if seen.any():
        out[seen] = 1 + np.searchsorted(edges, counts[seen], side="left")
    return out


def build_items(item_counts: list, catalog_ids: list, cfg: LogsConfig, previous: list | None = None) -> dict:
    counts = dict(item_counts)
    order = incremental.appended(previous, vocabulary(counts, cfg.item_min_count, always=catalog_ids))
    dense = {x: i + 2 for i, x in enumerate(order)}
    c = np.zeros(len(order) + 2, np.float64)
    for x, i in dense.items():
        c[i] = counts.get(x, 0)
    k = cfg.negatives_per_positive
    refused = None
    if cfg.sample_negatives and order and k >= len(order):  # (no item at all: no row has a negative)
        refused = (f"{cfg.path}: negatives.per_positive must be below the item vocabulary's size "
                   f"({len(order):,} items; a positive's own item is never its negative). Received: {k:,}")
    weights = c[2:] + 1.0  # popularity sampling: training count + 1 (unseen items stay drawable)
    edges = popularity_edges(c)
    return {"order": order, "dense": dense, "counts": c.astype(np.int64).tolist(), "edges": edges.tolist(),
            "level": popularity_levels(c, edges).tolist(),
            "weights": weights / weights.sum() if len(order) else weights, "refused": refused}


def build_contexts(ctx_counts: list, cfg: LogsConfig, previous: dict | None = None) -> dict:
    per: dict[str, dict] = {n: {} for n in cfg.categorical_context}
    for (name, v), n in ctx_counts:
        per[name][v] = per[name].get(v, 0) + n
    out = {}
    for name, counts in per.items():
        out[name] = indexed(incremental.appended((previous or {}).get(name),
                                                  vocabulary(counts, cfg.context_min_count)))
    return out


def write_vocab(path: str, order):
    beamio.write_text(path, "".join(f"{x}\n" for x in order))


def read_vocab(path: str, dtype: str = "string") -> list:
    """The raw ids of a vocabulary file (line n = dense id n + 1)."""
    lines = beamio.read_text(path).split("\n")[:-1]
    return [int(x) for x in lines] if dtype == "int64" else lines
