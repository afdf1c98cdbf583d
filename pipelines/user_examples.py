"""Per user, in workers: a user's events -> its examples (:mod:`pipelines.build_examples`' rules).

* :class:`UserEvents`: after the group-by-user, one user's events sorted by
  (time, file, row, position), duplicates and unknown items dropped, split
  (leave-last-out or by time) and given their histories; the training
  period's item and context counts and the user's state for the next build
  go to side outputs.
* :class:`MakeExamples`: a user's record -> dense rows (vocabularies applied,
  negatives sampled), keyed by output shard (:func:`shard_of`).

The rules (equal timestamps, duplicates, splits, history, negatives) are
documented in :mod:`pipelines.build_examples` and tested in
``tests/test_build_examples.py``.
"""

from __future__ import annotations

import bisect
import hashlib
import sys
import time
from collections import Counter

import numpy as np

from pipelines import incremental
from pipelines.beamio import beam  # imported quietly
from pipelines.log_readers import BadValue, bad_record, context_value, raw_key
from pipelines.logs_config import LogsConfig
from pipelines.vocabularies import OOV_ID, PADDING_ID, popularity_levels

#: The splits of a build, in output order.
SPLITS = ("train", "valid", "test")

# --------------------------------------------------------------------------
# Per user (in workers)
# --------------------------------------------------------------------------


class UserEvents(beam.DoFn):
    """(user, {events: [[event...]...], user: [values]}) -> (user, record) after sorting, deduplication,
    the split and the histories; training-period counts on side outputs.

    A record is ``{"examples": [(split, t, item, label, history, context)], "items": set of raw items}``.
    """

    def __init__(self, cfg: LogsConfig, files: dict[int, str], resume: dict | None = None):
        self.cfg, self._files = cfg, files
        self.end = resume.get("end_time") if resume else None  # incremental: the previous build's end

    def process(self, element, catalog_ids=None):
        yield from self._process(element, catalog_ids)

    def _process(self, element, catalog_ids):
        user, groups = element
        cfg = self.cfg
        events = [e for part in groups["events"] for e in part]
        prev = incremental.previous_of(groups)  # incremental: the user's state from --previous
        if not events:
            if prev is not None:
                yield beam.pvalue.TaggedOutput("state", (user, prev))
            return  # a user-table row without events
        stats = Counter()
        drops = Counter()
        events.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
        late = incremental.late_event(events, self.end, self._files, cfg.events.time)
        if late is not None:
            yield beam.pvalue.TaggedOutput("late", late)
            return
        if cfg.events.time:
            events = self._without_duplicates(events, prev, drops)
        bad = []
        if catalog_ids is not None:
            events = self._known_items(events, catalog_ids, drops, bad)
        user_ctx = self._user_context(groups["user"], stats, bad)
        for b in bad:
            yield beam.pvalue.TaggedOutput("bad", b)
        if not events:
            yield beam.pvalue.TaggedOutput("stats", {"events_dropped": dict(drops), **stats})
            if prev is not None:
                yield beam.pvalue.TaggedOutput("state", (user, prev))
            return
        in_history = [e for e in events if e[5] == 1 or cfg.history_events == "all"]
        examples, train_items, train_ctx = self._examples(events, in_history, user_ctx, prev, drops)
        stats["events_out"] += len(examples)
        stats["users_in"] += 1
        stats["users_out"] += int(bool(examples))
        yield beam.pvalue.TaggedOutput("stats", {"events_dropped": dict(drops), **stats})
        yield beam.pvalue.TaggedOutput("item_counts", list(train_items.items()))
        yield beam.pvalue.TaggedOutput("ctx_counts", list(train_ctx.items()))
        yield beam.pvalue.TaggedOutput("state", (user, incremental.next_state(cfg, prev, in_history, events)))
        if examples:
            yield user, {"examples": examples, "items": sorted(incremental.all_items(prev, events), key=raw_key)}

    @staticmethod
    def _without_duplicates(events: list, prev, drops: Counter) -> list:
        """The events but a second one with the same item and time (``duplicate_event``), the previous
        build's last events included (incremental)."""
        seen, kept = incremental.seen_at_end(prev), []
        for e in events:
            if (e[4], e[0]) in seen:
                drops["duplicate_event"] += 1
                continue
            seen.add((e[4], e[0]))
            kept.append(e)
        return kept

    def _known_items(self, events: list, catalog_ids, drops: Counter, bad: list) -> list:
        """The events whose item has a catalog row; the others are dropped (``unknown_item``) or bad rows."""
        cfg, kept = self.cfg, []
        for e in events:
            if e[4] in catalog_ids:
                kept.append(e)
            elif cfg.unknown_items == "drop":
                drops["unknown_item"] += 1
            else:  # fail
                bad.append(bad_record(self._files[e[1]], e[1], e[2], cfg.events.item, "unknown_item",
                                      f"item {e[4]!r} has no catalog row (\"unknown_items\": \"fail\")"))
        return kept

    def _user_context(self, user_rows: list, stats: Counter, bad: list) -> tuple:
        """The user's context values from the first of its user-table rows (all None without one)."""
        cfg = self.cfg
        if cfg.users is None:
            return ()
        rows = sorted(user_rows, key=lambda r: (r[1], r[2]))
        if not rows:
            stats["users_without_user_row"] += 1
            return (None,) * len(cfg.users.context)
        try:
            return tuple(context_value(rows[0][3].get(c.column), c) for c in cfg.users.context)
        except BadValue as b:
            bad.append(bad_record(rows[0][0], rows[0][1], rows[0][2], b.column, b.reason, b.text))
            return (None,) * len(cfg.users.context)

    def _split_of(self, keys: list, events: list):
        """``key -> split`` for this user's events (leave-last-out: by its last two positives; else by time)."""
        cfg = self.cfg
        if cfg.split != "leave_last_out":
            return lambda k: "test" if k[0] >= cfg.test_from else "valid" if k[0] >= cfg.valid_from else "train"
        pos_keys = [k for k, e in zip(keys, events) if e[5] == 1]
        test_from = pos_keys[-1] if pos_keys else None
        valid_from = pos_keys[-2] if len(pos_keys) > 1 else None

        def split_of(k):
            if test_from is not None and k >= test_from:
                return "test"
            if valid_from is not None and k >= valid_from:
                return "valid"
            return "train"
        return split_of

    def _examples(self, events: list, in_history: list, user_ctx: tuple, prev, drops: Counter):
        """``(examples, training item counts, training context counts)`` of the user's sorted events."""
        cfg = self.cfg
        keys = [(e[0], e[1], e[2], e[3]) for e in events]
        split_of = self._split_of(keys, events)
        # Strictly earlier: by time when the log has one (equal timestamps never see each other), else by order.
        hkeys = [e[0] for e in in_history] if cfg.events.time else [(e[0], e[1], e[2], e[3]) for e in in_history]
        examples = []
        train_items = Counter()
        train_ctx = Counter()
        for k, e in zip(keys, events):
            split = split_of(k)
            ctx = e[6] + user_ctx
            if split == "train":
                train_items[e[4]] += 1
                for name, v in zip(cfg.categorical_context, ctx):
                    if v is not None:
                        train_ctx[(name, v)] += 1
            n = bisect.bisect_left(hkeys, e[0] if cfg.events.time else k)
            hist = incremental.earlier(prev, e[0], bool(cfg.events.time)) + [h[4] for h in in_history[:n]]
            if cfg.history_duplicates == "last":
                hist = list(reversed(list(dict.fromkeys(reversed(hist)))))
            hist = hist[-cfg.history_max_len:]
            if len(hist) < cfg.history_min_len:
                drops["empty_history"] += 1
                continue
            examples.append((split, e[0], e[4], e[5], hist, ctx))
        return examples, train_items, train_ctx


def _stable_seed(seed: int, user) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\x00{user!r}".encode(), digest_size=8).digest(), "little")


def shard_of(user, shards: int) -> int:
    return _stable_seed(0, user) % shards


class MakeExamples(beam.DoFn):
    """(user, record) -> ((split, shard), (sort key, row)) with dense ids, levels and sampled negatives.

    Work that runs long (many negatives per positive) says how far it got on
    stderr every :attr:`PROGRESS_S` seconds.
    """

    PROGRESS_S = 30.0

    def __init__(self, cfg: LogsConfig):
        self.cfg = cfg
        self._users, self._said = 0, None

    def _progress(self):
        self._users += 1
        now = time.monotonic()
        if self._said is None:
            self._said = now
        elif now - self._said >= self.PROGRESS_S:
            self._said = now
            # sys.__stderr__: the launcher keeps the runner's own printing off sys.stderr while it runs
            print(f"build_examples: making examples: {self._users:,} users done by this worker "
                  f"({self.cfg.negatives_per_positive:,} negatives per positive)", file=sys.__stderr__, flush=True)

    def process(self, element, items, contexts, users):
        # An impossible negatives.per_positive: nothing is made, the launcher reports it.
        yield from () if items.get("refused") else self._process(element, items, contexts, users)

    def _process(self, element, items, contexts, users):
        self._progress()
        user, rec = element
        cfg = self.cfg
        dense = items["dense"]
        level = items["level"]
        uid = user if users is None else users["dense"].get(user, OOV_ID)
        n_ids = len(items["order"]) + 2
        stats = {s: Counter() for s in SPLITS}
        hist_len = {s: Counter() for s in SPLITS}
        own = {dense.get(x, OOV_ID) for x in rec["items"]}
        rng = np.random.default_rng(_stable_seed(cfg.seed, user)) if cfg.sample_negatives else None
        shard = shard_of(user, cfg.shards)
        for i, (split, t, item, label, hist, ctx) in enumerate(rec["examples"]):
            target = dense.get(item, OOV_ID)
            seq = [dense.get(h, OOV_ID) for h in hist]
            cvals = [contexts[name]["dense"].get(v, OOV_ID) if v is not None else PADDING_ID
                     for name, v in zip(cfg.categorical_context, ctx)]
            rows = [(target, label)]
            if rng is not None and label == 1:
                for neg in self._negatives(rng, own, n_ids, items):
                    rows.append((neg, 0))
                if len(rows) - 1 < cfg.negatives_per_positive:
                    stats[split]["negatives_unavailable"] += cfg.negatives_per_positive - (len(rows) - 1)
            for j, (tgt, lab) in enumerate(rows):
                row = {"user_id": uid, "item_seq": seq}
                if cfg.popularity_level:
                    if split == "train" and j == 0 and tgt != OOV_ID:
                        # The row's own event is one of the training-period counts: leave it out, so a
                        # train target's level does not reveal that the row is an interaction.
                        row[cfg.popularity_level] = int(popularity_levels(
                            [items["counts"][tgt] - 1], items["edges"])[0])
                    else:
                        row[cfg.popularity_level] = int(level[tgt])
                row.update(zip(cfg.categorical_context, cvals))
                row["item_id"] = tgt
                row["label"] = lab
                stats[split]["rows"] += 1
                stats[split]["positives"] += lab
                stats[split]["sampled_negatives"] += int(j > 0)
                stats[split]["target_oov"] += int(tgt == OOV_ID)
                hist_len[split][str(len(seq))] += 1
                yield (split, shard), (raw_key(user), i, j, row)
        yield beam.pvalue.TaggedOutput("stats", {"splits": {s: {**dict(stats[s]), "history_lengths": dict(hist_len[s])}
                                                            for s in SPLITS}})

    def _negatives(self, rng, own, n_ids, items):
        """``min(per_positive, candidates)`` distinct dense ids in ``[2, n_ids)`` outside ``own``.

        Draws one at a time and rejects what the user has or what was drawn, for at
        most ``4 * k + 64`` draws; whatever is still missing then (a user who has
        touched almost every item, or ``k`` near the vocabulary's size) is drawn
        without replacement from the exact complement, vectorised. So it always ends,
        in ``O(k + n_ids)``.
        """
        k = self.cfg.negatives_per_positive
        candidates = n_ids - 2 - len([x for x in own if x >= 2])
        want = min(k, candidates)
        if want <= 0:
            return []
        out: list[int] = []
        picked: set[int] = set()
        popularity = self.cfg.negative_sampling == "popularity"
        p = items["weights"] if popularity else None
        for _ in range(4 * want + 64):
            if len(out) == want:
                return out
            x = int(rng.choice(len(p), p=p)) + 2 if popularity else int(rng.integers(2, n_ids))
            if x not in own and x not in picked:
                out.append(x)
                picked.add(x)
        if len(out) < want:
            rest = np.setdiff1d(np.arange(2, n_ids, dtype=np.int64),
                                np.fromiter(own | picked, np.int64, len(own | picked)), assume_unique=True)
            w = None
            if popularity:
                w = np.asarray(p, np.float64)[rest - 2]
                w = w / w.sum()
            out += [int(x) for x in rng.choice(rest, size=want - len(out), replace=False, p=w)]
        return out
