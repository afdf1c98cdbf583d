"""Vectorised encoding of int64 ``tf.train.Example`` records and TFRecord framing.

The pipeline writes millions of small Examples whose features are all
``Int64List`` s. Building a ``tf.train.Example`` proto per row in Python costs
tens of microseconds a row; this module builds the serialized bytes of a whole
batch of rows at once with numpy, straight from the protobuf wire format:

.. code-block:: text

    Example    = 0x0A len(Features) Features               # field 1: features
    Features   = { 0x0A len(Entry) Entry }                  # field 1: map<string, Feature>
    Entry      = 0x0A len(key) key  0x12 len(Feature) Feature
    Feature    = 0x1A len(Int64List) Int64List              # field 3: int64_list
    Int64List  = 0x0A len(values) varint(v_1) ... varint(v_k)   # field 1, packed

A varint stores 7 bits a byte, low bits first, with the high bit set on every
byte but the last; a negative int64 takes 10 bytes (its two's complement as
uint64). Each piece of a row (a constant, or the varint of a per-row number)
becomes a block of columns of a ``[rows, bytes]`` matrix together with a mask
of the bytes in use; ``matrix[mask]`` is then every row's bytes, concatenated
in row order. ``tests/test_preprocess.py`` proves the bytes parse with
``tf.io.parse_example`` and equal ``tf.train.Example.FromString``.

TFRecord framing (the format of ``tf.io.TFRecordWriter``) per record::

    uint64 length (little endian) | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

with ``masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xA282EAD8 (mod 2**32)``
and ``c`` the CRC-32C (Castagnoli) of ``x``. GZIP files are one standard gzip
stream (``zlib`` with ``wbits=31``), which ``tf.data.TFRecordDataset(...,
compression_type="GZIP")`` reads.

This module imports neither TensorFlow nor Beam.
"""

from __future__ import annotations

import zlib
from typing import BinaryIO, Sequence

import numpy as np


def _load_crc32c():
    """google-crc32c's C ``value`` function; an ImportError says what to install otherwise.

    The record checksums need a compiled CRC-32C: google-crc32c (a declared
    dependency) hashes a record in well under a microsecond, while the numpy
    byte loop (:func:`crc32c_rows`) is vectorised across rows, not along a
    row, and made preprocessing about 60 times slower when it was the
    fallback. So there is no fallback: a missing or pure-Python google-crc32c
    stops the import.
    """
    try:
        import google_crc32c
    except ImportError as e:
        raise ImportError(
            "pipelines.example_codec needs google-crc32c (a dependency of qin-tf) for the TFRecord "
            "checksums; install it with `pip install 'google-crc32c>=1.5,<2'` or reinstall qin-tf "
            f"(`pip install -e .`). ({e})") from None
    if getattr(google_crc32c, "implementation", "c") != "c":
        where = getattr(google_crc32c, "__file__", "google_crc32c")
        raise ImportError(
            f"pipelines.example_codec needs google-crc32c's C extension, but {where} is its pure-Python "
            "fallback (about 60 times slower); reinstall it from a binary wheel: "
            "`pip install --force-reinstall 'google-crc32c>=1.5,<2'`.")
    return google_crc32c.value


_crc32c_bytes = _load_crc32c()

_FRAME_HEADER = 12  # uint64 length + uint32 crc
_FRAME_FOOTER = 4  # uint32 crc
_CRC32C_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_MASK_DELTA = 0xA282EAD8
#: zlib level of the GZIP shards (6 = zlib's and TensorFlow's default).
DEFAULT_GZIP_LEVEL = 6


def _crc32c_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC32C_POLY), table >> 1).astype(np.uint32)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c_rows(rows: np.ndarray) -> np.ndarray:
    """CRC-32C of every row of a ``uint8 [n, k]`` matrix, as ``uint32 [n]``.

    One numpy step per column: fast for the 8-byte length headers of many
    records, slow for long rows (the record bodies go to google-crc32c).
    """
    crc = np.full(rows.shape[0], 0xFFFFFFFF, dtype=np.uint32)
    for j in range(rows.shape[1]):
        crc = _CRC_TABLE[(crc ^ rows[:, j]) & 0xFF] ^ (crc >> 8)
    return crc ^ np.uint32(0xFFFFFFFF)


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (google-crc32c's C implementation)."""
    return _crc32c_bytes(data)


def masked_crc32c(crc: np.ndarray | int):
    """TFRecord's checksum mask, elementwise on ``uint32`` arrays or on an int."""
    if isinstance(crc, np.ndarray):
        crc = crc.astype(np.uint64)
        return ((((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF).astype(np.uint32)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _varint_size(x: np.ndarray) -> np.ndarray:
    """Bytes of the varint of each ``uint64`` in ``x`` (1..10), as uint8."""
    size = np.ones(x.shape, dtype=np.uint8)
    if x.size == 0:
        return size
    top = int(x.max())
    k = 1
    while k < 10 and top >= (1 << (7 * k)):
        size += x >= np.uint64(1 << (7 * k))
        k += 1
    return size


def _size64(x: np.ndarray) -> np.ndarray:
    """Varint sizes of non-negative int64 lengths, as int64 (safe to add to lengths)."""
    return _varint_size(x.view(np.uint64)).astype(np.int64)


class _Rows:
    """Accumulates byte blocks (``uint8 [n, w]`` + mask) of a batch of rows."""

    def __init__(self, n: int):
        self.n = n
        self.bytes: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []

    def const(self, b: bytes):
        arr = np.frombuffer(b, dtype=np.uint8)
        self.bytes.append(np.broadcast_to(arr, (self.n, len(b))))
        self.masks.append(np.broadcast_to(np.True_, (self.n, len(b))))

    def varints(self, x: np.ndarray, size: np.ndarray):
        """Appends the varints of ``x`` (``uint64 [n]`` or ``[n, w]``) whose sizes are ``size``."""
        if x.ndim == 1:
            x, size = x[:, None], size[:, None]
        width = int(size.max()) if size.size else 1
        if width <= 4:  # values < 2**28: 32-bit arithmetic is enough and faster
            x = x.astype(np.uint32)
        block = np.empty(x.shape + (width,), dtype=np.uint8)
        mask = np.empty(x.shape + (width,), dtype=bool)
        for k in range(width):
            group = ((x >> x.dtype.type(7 * k)) & x.dtype.type(0x7F)).astype(np.uint8)
            if k + 1 < width:
                group |= (size > k + 1).view(np.uint8) << np.uint8(7)
            block[:, :, k] = group
            np.greater(size, k, out=mask[:, :, k])
        self.bytes.append(block.reshape(self.n, -1))
        self.masks.append(mask.reshape(self.n, -1))

    def concat(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns the rows' bytes concatenated (``uint8``) and each row's length."""
        mat = np.concatenate(self.bytes, axis=1)
        mask = np.concatenate(self.masks, axis=1)
        return mat[mask], mask.sum(axis=1, dtype=np.int64)


def _encode(keys: Sequence[str], values: Sequence[np.ndarray], framed: bool):
    if len(keys) != len(values) or not keys:
        raise ValueError("`keys` and `values` must be non-empty and of the same length.")
    n = None
    cols = []
    for key, v in zip(keys, values):
        v = np.asarray(v)
        if v.dtype.kind not in "iu":
            raise ValueError(f"feature `{key}` must be an integer array. Received dtype {v.dtype}")
        if v.ndim == 1:
            v = v[:, None]
        elif v.ndim != 2:
            raise ValueError(f"feature `{key}` must be [n] or [n, w]. Received shape {v.shape}")
        if v.shape[1] < 1:
            raise ValueError(f"feature `{key}` has no values; every Int64List needs at least one.")
        if n is None:
            n = v.shape[0]
        elif v.shape[0] != n:
            raise ValueError(f"feature `{key}` has {v.shape[0]} rows, expected {n}.")
        cols.append(v.astype(np.int64, copy=False).view(np.uint64))
    if n == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)

    # Sizes, innermost first.
    parts = []
    features_len = np.zeros(n, dtype=np.int64)
    for key, v in zip(keys, cols):
        kb = key.encode("utf-8")
        vsize = _varint_size(v)
        packed = vsize.sum(axis=1, dtype=np.int64)                     # P
        packed_size = _size64(packed)
        list_len = 1 + packed_size + packed                            # Int64List
        list_size = _size64(list_len)
        feat_len = 1 + list_size + list_len                            # Feature
        feat_size = _size64(feat_len)
        entry_prefix = b"\x0a" + _varint(len(kb)) + kb + b"\x12"
        entry_len = len(entry_prefix) + feat_size + feat_len           # map entry
        entry_size = _size64(entry_len)
        features_len += 1 + entry_size + entry_len
        parts.append((entry_prefix, v, vsize, packed, packed_size, list_len, list_size,
                      feat_len, feat_size, entry_len, entry_size))
    features_size = _size64(features_len)
    record_len = 1 + features_size + features_len

    rows = _Rows(n)
    if framed:
        rows.const(bytes(_FRAME_HEADER))
    rows.const(b"\x0a")
    rows.varints(features_len.view(np.uint64), features_size)
    for (entry_prefix, v, vsize, packed, packed_size, list_len, list_size,
         feat_len, feat_size, entry_len, entry_size) in parts:
        rows.const(b"\x0a")
        rows.varints(entry_len.view(np.uint64), entry_size)
        rows.const(entry_prefix)
        rows.varints(feat_len.view(np.uint64), feat_size)
        rows.const(b"\x1a")
        rows.varints(list_len.view(np.uint64), list_size)
        rows.const(b"\x0a")
        rows.varints(packed.view(np.uint64), packed_size)
        rows.varints(v, vsize)
    if framed:
        rows.const(bytes(_FRAME_FOOTER))
    flat, lengths = rows.concat()
    return flat, lengths, record_len


def serialize_int64_examples(keys: Sequence[str], values: Sequence[np.ndarray]) -> list[bytes]:
    """Serializes one ``tf.train.Example`` per row.

    Args:
        keys: feature names.
        values: one integer array per key, ``[n]`` (one value a row) or
            ``[n, w]`` (``w`` values a row); every feature becomes an
            ``Int64List``.

    Returns:
        ``n`` serialized ``tf.train.Example`` s, byte-compatible with
        ``tf.train.Example.SerializeToString`` up to the order of map entries
        (which is ``keys``' order here).

    Example::

        serialize_int64_examples(["label", "seq"], [np.array([1]), np.array([[0, 5]])])
    """
    flat, lengths, _ = _encode(keys, values, framed=False)
    data = flat.tobytes()
    ends = np.cumsum(lengths).tolist()
    starts = [0] + ends[:-1]
    return [data[s:e] for s, e in zip(starts, ends)]


def encode_tfrecords(keys: Sequence[str], values: Sequence[np.ndarray]) -> bytes:
    """Returns the TFRecord-framed Examples of all rows, concatenated (uncompressed)."""
    flat, lengths, record_len = _encode(keys, values, framed=True)
    n = lengths.shape[0]
    if n == 0:
        return b""
    starts = np.cumsum(lengths) - lengths
    header = np.empty((n, _FRAME_HEADER), dtype=np.uint8)
    header[:, :8] = record_len.astype("<u8").view(np.uint8).reshape(n, 8)
    header[:, 8:] = masked_crc32c(crc32c_rows(header[:, :8])).astype("<u4").view(np.uint8).reshape(n, 4)
    flat[starts[:, None] + np.arange(_FRAME_HEADER)] = header
    data = flat.tobytes()
    data_starts = (starts + _FRAME_HEADER).tolist()
    data_ends = (starts + _FRAME_HEADER + record_len).tolist()
    crc = np.fromiter((_crc32c_bytes(data[s:e]) for s, e in zip(data_starts, data_ends)),
                      dtype=np.uint32, count=n)
    footer = masked_crc32c(crc).astype("<u4").view(np.uint8).reshape(n, 4)
    flat[np.asarray(data_ends)[:, None] + np.arange(_FRAME_FOOTER)] = footer
    return flat.tobytes()


class GzipTFRecordWriter:
    """Writes TFRecord-framed bytes to a binary file object as one gzip stream.

    Usage::

        with open(path, "wb") as f:
            w = GzipTFRecordWriter(f)
            w.write(encode_tfrecords(keys, values))
            w.close()   # flushes the gzip trailer; does not close ``f``
    """

    def __init__(self, fileobj: BinaryIO, level: int = DEFAULT_GZIP_LEVEL):
        if not -1 <= level <= 9:
            raise ValueError(f"`level` must be in [-1, 9]. Received: level={level}")
        self.fileobj = fileobj
        self.level = level
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip header + trailer

    def write(self, framed: bytes):
        if framed:
            self.fileobj.write(self._z.compress(framed))

    def close(self):
        self.fileobj.write(self._z.flush(zlib.Z_FINISH))
