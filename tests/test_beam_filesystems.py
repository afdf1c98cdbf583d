"""The pipelines read and write through Beam's ``FileSystems``: an object store works as a local disk does.

``memfs://`` is an object store in memory with the semantics of Beam's
``gs://`` and ``s3://`` filesystems: flat keys, no directories (a "directory"
is the objects under a prefix; ``exists`` is true of objects only; a rename
copies one object), ``*`` matching within one path segment. A path that
``os`` or ``open`` handled would land on the local disk instead (a directory
``memfs:``) or find nothing. The filesystem is registered with Beam by
defining it (Beam finds ``FileSystem`` subclasses by their scheme), and the
``memfs`` fixture empties it around each test.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time

import pytest
from apache_beam.io.filesystem import BeamIOError, CompressedFile, CompressionTypes, FileMetadata, FileSystem

from pipelines.build_examples import build_examples
from pipelines.preprocess import preprocess
from qin_tf.spec import DatasetConfig

from tests.conftest import REPO, SAMPLE_DATASET_CONFIG, SAMPLE_DIR, SAMPLE_LOGS_CONFIG, SAMPLE_MAX_LEN, files_under

BUCKET = "memfs://bucket"


class _Upload(io.BytesIO):
    """A write stream that becomes the object when closed (as a GCS upload does)."""

    def __init__(self, store, path):
        super().__init__()
        self._store, self._path = store, path

    def close(self):
        if not self.closed:
            self._store.put(self._path, self.getvalue())
        super().close()


class MemFileSystem(FileSystem):
    """An in-memory object store for ``memfs://`` paths (Beam's GCS filesystem's semantics)."""

    objects: dict[str, tuple[bytes, float]] = {}
    lock = threading.Lock()

    @classmethod
    def scheme(cls):
        return "memfs"

    @classmethod
    def put(cls, path, data):
        with cls.lock:
            cls.objects[path] = (bytes(data), time.time())

    @classmethod
    def under(cls, prefix):
        """``{path relative to prefix: bytes}`` of the objects under ``prefix/``."""
        prefix = prefix.rstrip("/") + "/"
        with cls.lock:
            return {p[len(prefix):]: d for p, (d, _) in cls.objects.items() if p.startswith(prefix)}

    def _get(self, path):
        with self.lock:
            if path not in self.objects:
                raise BeamIOError(f"{path}: no such object", {path: FileNotFoundError(path)})
            return self.objects[path]

    def join(self, basepath, *paths):
        path = basepath
        for p in paths:
            path += p if path.endswith("/") else "/" + p
        return path

    def split(self, path):
        head, _, tail = path.rstrip("/").rpartition("/")
        return head, tail

    def mkdirs(self, path):
        pass  # no directories

    def has_dirs(self):
        return False

    def _list(self, dir_or_prefix):
        with self.lock:
            found = [(p, len(d), t) for p, (d, t) in self.objects.items() if p.startswith(dir_or_prefix)]
        for p, size, t in sorted(found):
            yield FileMetadata(p, size, t)

    def create(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        f = _Upload(self, path)
        kind = self._get_compression_type(path, compression_type)
        return f if kind == CompressionTypes.UNCOMPRESSED else CompressedFile(f, kind)

    def open(self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
        f = io.BytesIO(self._get(path)[0])
        kind = self._get_compression_type(path, compression_type)
        return f if kind == CompressionTypes.UNCOMPRESSED else CompressedFile(f, kind)

    def copy(self, source_file_names, destination_file_names):
        for src, dst in zip(source_file_names, destination_file_names):
            self.put(dst, self._get(src)[0])

    def rename(self, source_file_names, destination_file_names):
        self.copy(source_file_names, destination_file_names)
        with self.lock:
            for src in source_file_names:
                del self.objects[src]

    def exists(self, path):
        with self.lock:
            return path in self.objects

    def size(self, path):
        return len(self._get(path)[0])

    def last_updated(self, path):
        return self._get(path)[1]

    def checksum(self, path):
        return str(hash(self._get(path)[0]))

    def metadata(self, path):
        data, t = self._get(path)
        return FileMetadata(path, len(data), t)

    def delete(self, paths):
        for path in paths:
            if path.endswith("/"):  # a "directory": everything under it
                names = list(self.under(path))
                if not names:
                    raise BeamIOError(f"{path}: no such objects", {path: FileNotFoundError(path)})
                with self.lock:
                    for name in names:
                        del self.objects[path + name]
                continue
            matched = self.match([path])[0].metadata_list
            if not matched:
                raise BeamIOError(f"{path}: no such object", {path: FileNotFoundError(path)})
            with self.lock:
                for m in matched:
                    del self.objects[m.path]


@pytest.fixture
def memfs():
    MemFileSystem.objects.clear()
    yield MemFileSystem
    MemFileSystem.objects.clear()
    assert not os.path.exists("memfs:")  # nothing went to the local disk under the URL's name


def _upload(local, url):
    with open(local, "rb") as f:
        MemFileSystem.put(url, f.read())


def _local_files(root):
    out = {}
    for name in files_under(root):
        with open(os.path.join(root, name), "rb") as f:
            out[name] = f.read()
    return out


def test_memfs_is_an_object_store(memfs):
    """The stand-in has what makes object stores differ from a disk."""
    MemFileSystem.put(f"{BUCKET}/d/sub/x", b"1")
    fs = MemFileSystem(None)
    assert fs.exists(f"{BUCKET}/d/sub/x") and not fs.exists(f"{BUCKET}/d") and not fs.exists(f"{BUCKET}/d/")
    assert [m.path for m in fs.match([f"{BUCKET}/d/*"])[0].metadata_list] == []
    assert [m.path for m in fs.match([f"{BUCKET}/d/**"])[0].metadata_list] == [f"{BUCKET}/d/sub/x"]
    with pytest.raises(BeamIOError):
        fs.rename([f"{BUCKET}/d"], [f"{BUCKET}/e"])


def test_preprocess_from_and_to_an_object_store_writes_what_the_local_run_writes(sample_spec, memfs):
    for name in ("train", "valid", "test", "item_info"):
        _upload(os.path.join(SAMPLE_DIR, f"{name}.parquet"), f"{BUCKET}/in/{name}.parquet")
    inp, out = f"{BUCKET}/in", f"{BUCKET}/out"
    want = _local_files(sample_spec.base_dir)
    # the statistics name the input files
    want["stats.json"] = want["stats.json"].replace(SAMPLE_DIR.encode(), inp.encode())
    assert {"feature_spec.json", "item_table.npz", "stats.json", "train-00001-of-00002.tfrecord.gz"} <= set(want)
    for run in range(2):  # the second run replaces the first one's output (a "directory" move on the store)
        spec = preprocess(inp, out, DatasetConfig.load(SAMPLE_DATASET_CONFIG), max_len=SAMPLE_MAX_LEN,
                          num_shards=2)
        assert spec.splits["train"].num_rows == 2622
        assert memfs.under(out) == want, run
        # nothing else was written: no temporary or old copies left next to the output
        assert sorted(memfs.under(BUCKET)) == sorted([f"in/{n}.parquet" for n in ("train", "valid", "test",
                                                                                  "item_info")]
                                                     + [f"out/{n}" for n in want])


def test_build_examples_from_and_to_an_object_store_writes_what_the_local_run_writes(sample_logs_built, memfs):
    # the config and the files it names, at the same relative places as in the repository
    for rel in ("configs/logs/microlens_sample.json", "data/microlens_sample/raw/events.tsv",
                "data/microlens_sample/raw/titles.csv", "data/microlens_sample/item_info.parquet"):
        _upload(os.path.join(REPO, rel), f"{BUCKET}/{rel}")
    out = f"{BUCKET}/built"
    stats = build_examples(f"{BUCKET}/configs/logs/microlens_sample.json", out)
    assert stats["files"]["events"] == [f"{BUCKET}/data/microlens_sample/raw/events.tsv"]
    want = _local_files(sample_logs_built)
    # the statistics name the config and the input files
    want["stats.json"] = want["stats.json"].replace(REPO.encode(), BUCKET.encode())
    assert {"train.parquet", "item_info.parquet", "vocab/tags.txt", "dataset_config.json", "stats.json"} <= set(want)
    assert memfs.under(out) == want
    assert not [n for n in memfs.under(BUCKET) if n.startswith("built.")]  # no temporary left

    # and preprocessing reads that output where it is
    spec = preprocess(out, f"{BUCKET}/preprocessed", f"{out}/dataset_config.json", max_len=SAMPLE_MAX_LEN)
    assert spec.splits["train"].num_rows == json.loads(want["stats.json"])["splits"]["train"]["rows"]
    assert "feature_spec.json" in memfs.under(f"{BUCKET}/preprocessed")


def test_make_sample_from_and_to_an_object_store_writes_what_the_local_run_writes(memfs, tmp_path):
    from pipelines.make_sample import make_sample

    for name in ("train", "valid", "test", "item_info"):
        _upload(os.path.join(SAMPLE_DIR, f"{name}.parquet"), f"{BUCKET}/in/{name}.parquet")
    want = make_sample(SAMPLE_DIR, str(tmp_path / "cut"), num_users=20, seed=0)
    assert make_sample(f"{BUCKET}/in", f"{BUCKET}/cut", num_users=20, seed=0) == want
    assert 0 < want["train"] < 2622
    assert memfs.under(f"{BUCKET}/cut") == _local_files(str(tmp_path / "cut"))


def test_missing_configs_on_an_object_store_are_named(memfs):
    from pipelines.logs_config import LogsConfig, LogsConfigError
    from qin_tf.rows import PreprocessError

    with pytest.raises(LogsConfigError, match=f"^{BUCKET}/logs.json: log config not found$"):
        LogsConfig.load(f"{BUCKET}/logs.json")
    with pytest.raises(PreprocessError, match=f"^{BUCKET}/dataset.json: dataset config not found$"):
        preprocess(f"{BUCKET}/in", f"{BUCKET}/out", f"{BUCKET}/dataset.json")
    assert memfs.under(BUCKET) == {}
