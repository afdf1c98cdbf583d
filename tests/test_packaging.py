"""The built wheel: package data (dataset configs, TF Serving configs) found without the repository."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from pipelines import preprocess as pp
from pipelines.validation import PreprocessError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: What a wheel is built from (setup.cfg's packages and metadata).
BUILD_INPUTS = ("setup.cfg", "setup.py", "pyproject.toml", "README.md", "qin_tf", "pipelines", "export")
PACKAGE_DATA = ("pipelines/datasets/microlens50k.json", "pipelines/datasets/mmctr_challenge.json",
                "export/models.config", "export/batching_parameters.txt")


def test_dataset_config_by_bundled_name_path_or_repo_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository
    assert pp.bundled_dataset_configs() == ["microlens50k", "mmctr_challenge"]
    bundled = os.path.join(REPO, "pipelines", "datasets", "microlens50k.json")
    assert pp.dataset_config_path("microlens50k") == bundled
    assert pp.dataset_config_path("microlens50k.json") == bundled
    assert pp.resolve_dataset_config(pp.DEFAULT_DATASET_CONFIG).name == "microlens50k_mmctr"
    # the checkout's path, from any directory (configs/datasets links to the package's copy)
    assert pp.resolve_dataset_config("configs/datasets/mmctr_challenge.json").name == "microlens_1m_mmctr"
    # a file in the working directory wins over a bundled name
    (tmp_path / "microlens50k.json").write_text('{"name": "mine", "splits": {"train": "t.parquet"}}')
    assert pp.resolve_dataset_config("microlens50k.json").name == "mine"
    with pytest.raises(PreprocessError, match="nope: dataset config not found .*bundled config: "
                                              "microlens50k, mmctr_challenge"):
        pp.dataset_config_path("nope")


def test_wheel_ships_the_configs_and_the_default_resolves_without_the_repo(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    dist = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = dist.glob("qin_tf-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert set(PACKAGE_DATA) <= names, sorted(names)

    # the installed packages alone, from a directory that is not the repository
    code = ("import os, export, pipelines.preprocess as pp\n"
            "cfg = pp.resolve_dataset_config(pp.DEFAULT_DATASET_CONFIG)\n"
            "print(pp.__file__)\nprint(cfg.name, cfg.context)\n"
            "print(sorted(os.listdir(export.SERVER_CONFIGS)))\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    module, config, server_configs = run.stdout.splitlines()
    assert module.startswith(str(tmp_path / "site"))
    assert config == "microlens50k_mmctr ('views_level',)"
    assert {"models.config", "batching_parameters.txt"} <= set(ast.literal_eval(server_configs))
