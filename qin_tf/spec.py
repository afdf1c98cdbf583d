"""The feature spec: the single source of truth for every feature of qin-tf.

Two documents, two stages:

* A **dataset configuration** (``configs/datasets/*.json``, :class:`DatasetConfig`)
  written by a person. It names the *roles* of the columns of the raw logs
  (label, meta, target item, behaviour sequence, context features, the item
  table and its columns) and ``max_len``. It knows nothing about the data's
  contents.
* A **feature spec** (``feature_spec.json``, :class:`FeatureSpec`) written by
  ``pipelines.preprocess``. It is the configuration resolved against the data:
  vocabulary sizes, the item table's size and dims, the TFRecord files of
  each split. The TFRecord writer, the ``tf.data`` reader, the model's
  ``keras.Input``s and the serving signatures are all derived from it.

No other module spells a feature name: they ask the spec.

Conventions every stage shares (and tests check):

* Ids are int64. Id ``0`` is padding everywhere: in the behaviour sequence,
  in the item table (row 0 is all zeros) and in the tag lists.
* **The id rule** (:func:`negative_ids`): an id is ``>= 0``. Every boundary
  rejects a negative id, in the same words: preprocessing and scoring (a bad
  row), the serving client (before it sends), the local server
  (``INVALID_ARGUMENT``) and the exported graph itself (an assertion, so TF
  Serving refuses it too).
* **The sequence rule** (:func:`left_pad_recent`, :func:`pad_sequence`): the
  behaviour sequence holds the most recent ``max_len`` non-zero items, oldest
  first, **left**-padded with 0 to exactly ``max_len``. A history given
  unpadded (a JSON line, a raw-id request) is padded or cut by this rule.
* Context features are categorical ids in ``[0, vocab_size)``, used as they
  are (no vocabulary file): ``vocab_size`` is ``1 +`` the largest train value
  seen at least ``min_count`` times, at most ``max_size``
  (:class:`ContextVocabConfig`; defaults 1 and 100,000), so one outlier
  value cannot size the table. A value at or beyond ``vocab_size`` (a value
  past the bound, or one seen in valid/test or at serving time only) maps to
  one extra out-of-vocabulary row, index ``vocab_size``, inside the model.
* Item ids (target and sequence) index the item table: ``[0, num_items)``.
  Preprocessing rejects ids beyond the table; at serving time the model maps
  them to the padding row 0.

This module imports neither TensorFlow nor Beam, so it is cheap to import in
pipeline workers and tools.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Mapping

from qin_tf import fileio

SPEC_FILENAME = "feature_spec.json"
STATS_FILENAME = "stats.json"
ITEM_TABLE_FILENAME = "item_table.npz"
SPEC_VERSION = 1
DEFAULT_MAX_LEN = 64
PADDING_ID = 0
#: Default bound of a context feature's vocabulary (:class:`ContextVocabConfig`).
DEFAULT_CONTEXT_MAX_VOCAB_SIZE = 100_000
#: The key of the item vocabulary in ``vocabularies`` (the target item and the history share it).
ITEM_VOCABULARY = "item_id"
#: Where preprocessing puts the vocabulary files, relative to the data directory.
VOCAB_DIR = "vocab"
#: Dense id of an unknown raw id (dense id n + 1 is line n of a vocabulary file).
OOV_ID = 1
#: Keys of the arrays inside ``item_table.npz``.
ITEM_TABLE_TAGS_KEY = "tags"
ITEM_TABLE_EMBEDDING_KEY = "embedding"


class SpecError(ValueError):
    """A dataset configuration or feature spec is malformed."""


# --------------------------------------------------------------------------
# The id rule and the sequence rule (one place for every boundary)
# --------------------------------------------------------------------------

#: What :func:`negative_ids` enforces, in the words every boundary uses.
ID_RULE = "ids must be >= 0 (0 is padding)"


def negative_ids(values):
    """The id rule: a boolean mask of the ids of ``values`` (any shape) that break it (``< 0``)."""
    import numpy as np

    return np.asarray(values) < PADDING_ID


def first_negative_id(values) -> tuple[tuple[int, ...], int] | None:
    """``(index, value)`` of the first id of ``values`` breaking the id rule, or None.

    >>> first_negative_id([[1, 2], [3, -4]])
    ((1, 1), -4)
    """
    import numpy as np

    bad = negative_ids(values)
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return index, int(np.asarray(values)[index])


#: The raw-id rule: which ids as production logs them (user, item, tag and context ids before any
#: vocabulary) the pipelines accept, the vocabularies hold and serving maps. Every boundary (the log
#: builder, preprocessing, batch scoring, the gRPC client, the local server and the exported graph)
#: applies :func:`raw_id_problem` or its vectorised form, and no other rule.
RAW_ID_RULE = ("raw ids are int64 values >= 1 or non-empty strings without control characters or line "
               "breaks (0 and \"\" are padding in a history)")
INT64_MAX = 2 ** 63 - 1
#: Characters a vocabulary file (one raw id a line) cannot hold: every C0/C1 control character
#: (\t, \n, \r, \x0b, \x0c, \x1c-\x1e and \x85 among them) and the Unicode line and paragraph
#: separators that ``str.splitlines`` breaks on.
_RAW_ID_FORBIDDEN = frozenset([chr(c) for c in range(0x20)] + [chr(c) for c in range(0x7F, 0xA0)]
                              + ["\u2028", "\u2029"])


def raw_id_problem(value) -> str | None:
    """Why ``value`` breaks :data:`RAW_ID_RULE`, in a few words, or None when it is a valid raw id.

    Ints (Python or numpy) must lie in ``[1, 2**63 - 1]``; strings must be non-empty, valid
    UTF-8 (no lone surrogates) and free of control characters and line breaks, so that a
    vocabulary file round-trips every id it holds. Anything else (None, floats, bools, bytes)
    is not a raw id.

    >>> raw_id_problem(7) is None, raw_id_problem("a7") is None
    (True, True)
    >>> raw_id_problem(0), raw_id_problem("x\\r")
    ('0 is padding, not an id', "'x\\\\r' holds a control character or line break")
    """
    import numbers

    if isinstance(value, bool) or value is None:
        return f"{value!r} is not an id"
    if isinstance(value, numbers.Integral):
        v = int(value)
        if v == 0:
            return "0 is padding, not an id"
        if v < 0:
            return f"{v} is negative"
        if v > INT64_MAX:
            return f"{v} is beyond int64"
        return None
    if isinstance(value, str):
        if value == "":
            return "the empty string is padding, not an id"
        if any(ch in _RAW_ID_FORBIDDEN for ch in value):
            return f"{value!r} holds a control character or line break"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{value!r} is not valid UTF-8"
        return None
    return f"{value!r} is not an id (an int64 or a string)"


def first_bad_raw_id(values) -> tuple[int, str] | None:
    """``(position, reason)`` of the first id of the flat sequence ``values`` breaking the raw-id rule.

    Vectorised for int arrays (the common case); strings go one by one.

    >>> first_bad_raw_id([3, 1, -2])
    (2, '-2 is negative')
    """
    import numpy as np

    arr = np.asarray(values) if not isinstance(values, np.ndarray) else values
    if arr.dtype.kind in "iu":
        bad = np.flatnonzero(arr < 1) if arr.dtype.kind == "i" else np.flatnonzero(arr == 0)
        if arr.dtype.kind == "u":
            bad = np.union1d(bad, np.flatnonzero(arr > INT64_MAX))
        if bad.size == 0:
            return None
        i = int(bad[0])
        return i, raw_id_problem(int(arr.reshape(-1)[i]))
    for i, v in enumerate(list(values)):
        why = raw_id_problem(v)
        if why is not None:
            return i, why
    return None


def left_pad_recent(values, parent, n: int, max_len: int):
    """The sequence rule, vectorised: the ``[n, max_len]`` history matrix from flattened lists.

    ``values[i]`` belongs to row ``parent[i]`` (rows in order, each row's
    items oldest first). Zeros are padding and dropped first; each row keeps
    its most recent ``max_len`` non-zero items (the last ones of its list),
    oldest first, left-padded with 0. Returns the int64 matrix and each row's
    non-zero count (its length before truncation).

    >>> import numpy as np
    >>> m, c = left_pad_recent(np.array([0, 0, 7, 8, 9]), np.array([0, 0, 0, 0, 0]), 1, 2)
    >>> m.tolist(), c.tolist()
    ([[8, 9]], [3])
    """
    import numpy as np

    values, parent = np.asarray(values), np.asarray(parent, dtype=np.int64)
    keep = values != PADDING_ID
    v, r = values[keep], parent[keep]
    counts = np.bincount(r, minlength=n).astype(np.int64)
    starts = np.cumsum(counts) - counts
    pos = np.arange(v.size, dtype=np.int64) - starts[r]  # position among the row's non-zeros
    col = max_len - counts[r] + pos
    ok = col >= 0
    out = np.zeros((n, max_len), dtype=np.int64)
    out[r[ok], col[ok]] = v[ok]
    return out, counts


def pad_sequence(items, max_len: int):
    """The sequence rule for one history (oldest first, any length): int64 ``[max_len]``.

    >>> pad_sequence([5, 0, 7, 8], 3).tolist(), pad_sequence([4], 3).tolist()
    ([5, 7, 8], [0, 0, 4])
    """
    import numpy as np

    items = np.asarray(items, dtype=np.int64).reshape(-1)
    return left_pad_recent(items, np.zeros(items.size, np.int64), 1, max_len)[0][0]


def _require(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in mapping:
        raise SpecError(f"{where}: missing required key `{key}`.")
    return mapping[key]


def _check_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where} must be a non-empty string. Received: {value!r}")
    return value


# --------------------------------------------------------------------------
# Dataset configuration (written by a person)
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """One split of the raw logs: its parquet file and whether it has labels."""

    file: str
    labelled: bool = True


@dataclasses.dataclass(frozen=True)
class ItemTableConfig:
    """The item table file and the roles of its columns."""

    file: str = "item_info.parquet"
    id: str = "item_id"
    tags: str = "item_tags"
    embedding: str = "item_emb_d128"


@dataclasses.dataclass(frozen=True)
class ContextVocabConfig:
    """How preprocessing bounds a context feature's vocabulary ``[0, vocab_size)``.

    ``vocab_size = min(max_size, 1 + max{v : count_train(v) >= min_count})``
    (1 if no value qualifies). Every other value, in train as at serving time,
    uses the out-of-vocabulary row; ``stats.json`` lists the train values sent
    there. Values are ids used as they are, so a rare value *below* the bound
    keeps its own row: ``min_count`` trims the top of the range, which is where
    outliers (``views_level = 10**12``) land.

    Example (``context_vocab`` in a dataset configuration)::

        "context_vocab": {"views_level": {"max_size": 1000, "min_count": 5}}
    """

    max_size: int = DEFAULT_CONTEXT_MAX_VOCAB_SIZE
    min_count: int = 1

    def __post_init__(self):
        for name in ("max_size", "min_count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")

    def vocab_size(self, counts: Mapping[int, int]) -> int:
        """The vocabulary size from ``{value: train rows}``."""
        kept = [v for v, n in counts.items() if n >= self.min_count and 0 <= v < self.max_size]
        return max(kept) + 1 if kept else 1


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """The roles of the columns of a dataset in the MMCTR layout.

    Example::

        cfg = DatasetConfig.load("configs/datasets/microlens50k.json")
        cfg.context  # ("views_level",)
    """

    name: str
    splits: Mapping[str, SplitConfig]
    label: str = "label"
    meta: tuple[str, ...] = ("user_id",)
    target_item: str = "item_id"
    sequence: str = "item_seq"
    context: tuple[str, ...] = ()
    item_table: ItemTableConfig = ItemTableConfig()
    max_len: int = DEFAULT_MAX_LEN
    #: Context feature -> its vocabulary bound; a feature not named gets the defaults.
    context_vocab: Mapping[str, ContextVocabConfig] = dataclasses.field(default_factory=dict)
    #: Optional, written by ``pipelines.build_examples``: feature name -> ``{"path": vocabulary file
    #: (one raw id a line, line n = dense id n + 1; relative to the config file), "dtype": "string" |
    #: "int64", "oov_id": 1}``. Preprocessing ignores it; later stages map raw ids with it.
    vocabularies: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.max_len, int) or self.max_len < 1:
            raise SpecError(f"`max_len` must be an integer >= 1. Received: max_len={self.max_len!r}")
        if not self.splits:
            raise SpecError("`splits` must name at least one split.")
        names = [self.label, *self.meta, self.target_item, self.sequence, *self.context]
        for n in names:
            _check_name(n, "every column name")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SpecError(f"a column may play one role only; repeated: {dup}")
        stray = sorted(set(self.context_vocab) - set(self.context))
        if stray:
            raise SpecError(f"`context_vocab` names {stray}, which are not context features {list(self.context)}.")

    def context_vocab_config(self, name: str) -> ContextVocabConfig:
        """The vocabulary bound of context feature ``name`` (the defaults unless configured)."""
        return self.context_vocab.get(name, ContextVocabConfig())

    @property
    def example_columns(self) -> tuple[str, ...]:
        """The columns every labelled split must have, in spec order."""
        return (self.label, *self.meta, self.target_item, self.sequence, *self.context)

    def with_max_len(self, max_len: int | None) -> "DatasetConfig":
        return self if max_len is None else dataclasses.replace(self, max_len=max_len)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "dataset config") -> "DatasetConfig":
        if not isinstance(d, Mapping):
            raise SpecError(f"{where}: expected a JSON object.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}.")
        splits_raw = _require(d, "splits", where)
        if not isinstance(splits_raw, Mapping):
            raise SpecError(f"{where}: `splits` must map split names to {{file, labelled}}.")
        splits = {}
        for split, s in splits_raw.items():
            if isinstance(s, str):
                s = {"file": s}
            splits[split] = SplitConfig(file=_check_name(_require(s, "file", f"{where}: splits.{split}"),
                                                         f"{where}: splits.{split}.file"),
                                        labelled=bool(s.get("labelled", True)))
        table = ItemTableConfig(**d.get("item_table", {}))
        vocab_raw = d.get("context_vocab", {})
        if not isinstance(vocab_raw, Mapping):
            raise SpecError(f"{where}: `context_vocab` must map context features to {{max_size, min_count}}.")
        context_vocab = {}
        for feature, v in vocab_raw.items():
            known_v = {f.name for f in dataclasses.fields(ContextVocabConfig)}
            if not isinstance(v, Mapping) or set(v) - known_v:
                raise SpecError(f"{where}: context_vocab.{feature} must be an object with keys "
                                f"{sorted(known_v)}. Received: {v!r}")
            try:
                context_vocab[feature] = ContextVocabConfig(**v)
            except SpecError as e:
                raise SpecError(f"{where}: context_vocab.{feature}: {e}") from None
        vocabs = d.get("vocabularies", {}) or {}
        if not isinstance(vocabs, Mapping):
            raise SpecError(f"{where}: `vocabularies` must map feature names to {{path, dtype, oov_id}}.")
        for name, v in vocabs.items():
            if not isinstance(v, Mapping):
                raise SpecError(f"{where}: vocabularies.{name} must be an object {{path, dtype, oov_id}}.")
            _check_name(v.get("path"), f"{where}: vocabularies.{name}.path")
            if v.get("dtype", "string") not in ("string", "int64"):
                raise SpecError(f"{where}: vocabularies.{name}.dtype must be `string` or `int64`. "
                                f"Received: {v.get('dtype')!r}")
            if not isinstance(v.get("oov_id", 1), int):
                raise SpecError(f"{where}: vocabularies.{name}.oov_id must be an integer.")
        kwargs = dict(d)
        kwargs.update(
            splits=splits,
            meta=tuple(d.get("meta", ("user_id",))),
            context=tuple(d.get("context", ())),
            item_table=table,
            vocabularies={k: dict(v) for k, v in vocabs.items()},
            name=_check_name(_require(d, "name", where), f"{where}: name"),
            context_vocab=context_vocab,
        )
        try:
            return cls(**kwargs)
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str) -> "DatasetConfig":
        try:
            d = fileio.read_json(path)
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}: not valid JSON: {e}") from None
        return cls.from_dict(d, where=path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------
# Feature spec (written by the pipeline, read by everything else)
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Feature:
    """One model input as it appears in a ``tf.train.Example`` and a request.

    ``shape`` excludes the batch dimension: ``()`` for a scalar id,
    ``(max_len,)`` for the behaviour sequence.
    """

    name: str
    role: str  # "target_item" | "sequence" | "context"
    dtype: str = "int64"
    shape: tuple[int, ...] = ()
    vocab_size: int = 0


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """The TFRecord shards of one split, relative to the spec's directory."""

    files: tuple[str, ...]
    num_rows: int
    labelled: bool = True


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """The dataset configuration resolved against the data.

    Attributes:
        dataset: the dataset's name.
        label: name of the 0/1 label feature (int64 scalar).
        meta: names of pass-through id columns (e.g. ``user_id``) stored in
            every example, used for gAUC, never fed to the model.
        target_item: name of the target item id (int64 scalar).
        sequence: name of the behaviour sequence (int64 ``[max_len]``).
        context: names of the categorical context features (int64 scalars).
        context_vocab_sizes: vocabulary size of each context feature.
        max_len: length of the behaviour sequence.
        num_items: rows of the item table (ids ``0..num_items-1``).
        num_tags: tags per item (the width of the tag lists).
        tag_vocab_size: tag ids are in ``[0, tag_vocab_size)``.
        mm_dim: width of the frozen multimodal vector.
        item_table_file: the ``.npz`` with ``tags`` int32 ``[num_items,
            num_tags]`` and ``embedding`` float32 ``[num_items, mm_dim]``.
        item_tags_name, item_embedding_name: the item table's column names,
            kept for naming the model's frozen weights.
        splits: split name -> :class:`SplitInfo`.
        compression: the TFRecord compression (``"GZIP"``).
    """

    dataset: str
    label: str
    meta: tuple[str, ...]
    target_item: str
    sequence: str
    context: tuple[str, ...]
    context_vocab_sizes: tuple[int, ...]
    max_len: int
    num_items: int
    num_tags: int
    tag_vocab_size: int
    mm_dim: int
    item_table_file: str = ITEM_TABLE_FILENAME
    item_tags_name: str = "item_tags"
    item_embedding_name: str = "item_emb_d128"
    splits: Mapping[str, SplitInfo] = dataclasses.field(default_factory=dict)
    compression: str = "GZIP"
    #: Raw-id vocabularies carried from the dataset config by preprocessing: key (``item_id``
    #: for the items, a context feature's name, ``tags``) -> ``{"path": file relative to the
    #: spec's directory (one raw id a line; line n is dense id n + 1), "dtype": "string" |
    #: "int64", "oov_id": 1, "size": dense ids incl. padding and OOV}``. Empty: dense ids only.
    vocabularies: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    version: int = SPEC_VERSION
    #: Directory the spec was loaded from; relative file names resolve here.
    base_dir: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        if len(self.context) != len(self.context_vocab_sizes):
            raise SpecError("`context` and `context_vocab_sizes` must have the same length.")
        for n, v in zip(self.context, self.context_vocab_sizes):
            if v < 1:
                raise SpecError(f"context feature `{n}` has vocab_size {v}; must be >= 1.")
        if self.max_len < 1:
            raise SpecError(f"`max_len` must be >= 1. Received: max_len={self.max_len}")
        if self.num_items < 2:
            raise SpecError(f"the item table needs padding row 0 and at least one item. num_items={self.num_items}")

    # ---- the model's inputs -------------------------------------------------

    @property
    def model_features(self) -> tuple[Feature, ...]:
        """The model's inputs (ids only), in a fixed order: target, sequence, context."""
        feats = [
            Feature(self.target_item, "target_item", "int64", (), self.num_items),
            Feature(self.sequence, "sequence", "int64", (self.max_len,), self.num_items),
        ]
        feats += [Feature(n, "context", "int64", (), v)
                  for n, v in zip(self.context, self.context_vocab_sizes)]
        return tuple(feats)

    @property
    def model_feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.model_features)

    def example_features(self, labelled: bool = True) -> tuple[Feature, ...]:
        """Everything a ``tf.train.Example`` of a split holds: label, meta, model inputs."""
        extra = [Feature(self.label, "label")] if labelled else []
        extra += [Feature(n, "meta") for n in self.meta]
        return (*extra, *self.model_features)

    def context_vocab_size(self, name: str) -> int:
        return self.context_vocab_sizes[self.context.index(name)]

    # ---- raw ids ------------------------------------------------------------

    def vocabulary_key(self, name: str) -> str | None:
        """The key in :attr:`vocabularies` of model feature ``name`` (items share one), or None."""
        if name in (self.target_item, self.sequence):
            for key in (self.target_item, ITEM_VOCABULARY):
                if key in self.vocabularies:
                    return key
            return None
        return name if name in self.vocabularies else None

    def read_vocabulary(self, key: str) -> list[str]:
        """The raw ids of vocabulary ``key``, as text, in file order (line n is dense id n + 1)."""
        return fileio.read_text(self.path(self.vocabularies[key]["path"])).split("\n")[:-1]

    # ---- files --------------------------------------------------------------

    def path(self, relative: str) -> str:
        """Resolves a file name of the spec against the spec's directory (a URL stays as it is)."""
        absolute = os.path.isabs(relative) or not fileio.is_local(relative)
        return relative if absolute else os.path.join(self.base_dir, relative)

    def split_files(self, split: str) -> list[str]:
        if split not in self.splits:
            raise SpecError(f"split `{split}` is not in the feature spec; it has {sorted(self.splits)}.")
        return [self.path(f) for f in self.splits[split].files]

    def load_item_table(self):
        """Returns ``(tags int32 [N, T], embedding float32 [N, D])`` as numpy arrays."""
        import numpy as np

        with np.load(io.BytesIO(fileio.read_bytes(self.path(self.item_table_file)))) as z:
            tags = z[ITEM_TABLE_TAGS_KEY].astype("int32")
            emb = z[ITEM_TABLE_EMBEDDING_KEY].astype("float32")
        if tags.shape != (self.num_items, self.num_tags) or emb.shape != (self.num_items, self.mm_dim):
            raise SpecError(
                f"{self.path(self.item_table_file)}: item table shapes tags={tags.shape}, "
                f"embedding={emb.shape} do not match the spec "
                f"({self.num_items}, {self.num_tags}) and ({self.num_items}, {self.mm_dim}).")
        return tags, emb

    # ---- (de)serialisation -------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, directory: str) -> str:
        """Writes ``feature_spec.json`` to ``directory``, with copies of the vocabulary files it names."""
        g = fileio.gfile()
        path = os.path.join(directory, SPEC_FILENAME)
        for v in self.vocabularies.values():
            src, dst = self.path(v["path"]), os.path.join(directory, v["path"])
            if fileio.absolute(src) != fileio.absolute(dst):
                g.makedirs(os.path.dirname(dst))
                g.copy(src, dst, overwrite=True)
        g.makedirs(directory)
        fileio.write_text(path, self.to_json())
        return path

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base_dir: str = "") -> "FeatureSpec":
        d = dict(d)
        if d.get("version") != SPEC_VERSION:
            raise SpecError(f"feature spec version {d.get('version')!r} is not supported; expected {SPEC_VERSION}.")
        d["splits"] = {k: SplitInfo(files=tuple(v["files"]), num_rows=int(v["num_rows"]),
                                    labelled=bool(v.get("labelled", True)))
                       for k, v in d.get("splits", {}).items()}
        for k in ("meta", "context", "context_vocab_sizes"):
            d[k] = tuple(d.get(k, ()))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(f"feature spec: unknown keys {unknown}.")
        return cls(**d, base_dir=base_dir)

    @classmethod
    def load(cls, path: str) -> "FeatureSpec":
        """Loads ``feature_spec.json`` from a file or from the directory holding it."""
        g = fileio.gfile()
        if not g.exists(path):
            raise SpecError(f"{path}: no such file or directory.")
        if g.isdir(path):
            path = os.path.join(path, SPEC_FILENAME)
        try:
            d = fileio.read_json(path)
        except FileNotFoundError:
            raise SpecError(f"{path}: no feature spec here; run `python -m pipelines.preprocess` first.") from None
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}: not valid JSON: {e}") from None
        return cls.from_dict(d, base_dir=os.path.dirname(fileio.absolute(path)))

    @classmethod
    def from_json(cls, text: str, base_dir: str = "") -> "FeatureSpec":
        return cls.from_dict(json.loads(text), base_dir=base_dir)
