"""Installation: the built wheel's package data (dataset configs, TF Serving configs) found without the
repository, and bench/'s check that it runs in what a fresh ``pip install -e .`` provides."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from pipelines import preprocess as pp
from qin_tf.rows import PreprocessError

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


def _import_bench_common(prelude: str = "", **env) -> subprocess.CompletedProcess:
    code = (f"import sys\n{prelude}\nsys.path.insert(0, {REPO!r})\n"
            "from bench import common\nprint(common.ENVIRONMENT)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_bench_environment_check_names_every_difference():
    sys.path.insert(0, REPO)
    try:
        from bench import common
    finally:
        sys.path.remove(REPO)
    assert "google-crc32c>=1.5,<2" in common.install_requires()
    assert common.environment_problems() == []  # the test environment is a fresh install's
    assert common.environment_problems(["numpy<1", "no-such-package-qin>=1", "absl-py>=2.1,<3"]) == [
        f"numpy {np_version()} is installed; setup.cfg requires numpy<1",
        "no-such-package-qin is not installed; setup.cfg requires no-such-package-qin>=1"]


def np_version() -> str:
    import numpy

    return numpy.__version__


def test_bench_refuses_an_environment_without_the_compiled_crc32c():
    # a missing accelerator module is a failure, not a fallback
    no_crc = "sys.modules['google_crc32c'] = None"
    proc = _import_bench_common(no_crc)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "differs from a fresh install" in proc.stderr
    assert "  - pipelines.example_codec needs google-crc32c (a dependency of qin-tf)" in proc.stderr
    # run anyway on request: loudly, and the record says so
    proc = _import_bench_common(no_crc, QIN_BENCH_ALLOW_ENV_MISMATCH="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("bench: WARNING: QIN_BENCH_ALLOW_ENV_MISMATCH=1")
    record = ast.literal_eval(proc.stdout)
    assert record["fresh_install"] is False and "google-crc32c" in record["problems"][0]


def test_gpu_script_parses_and_runs_every_preset_under_every_policy():
    """bench/run_gpu.sh (run where a GPU is lent, smoke-tested by hand with ALLOW_CPU=1 QUICK=1): valid
    bash, the presets from bench/presets.sh (bench/run_presets.sh's too), every mixed policy of the config."""
    from qin_tf.config import DTYPE_POLICIES

    script = os.path.join(REPO, "bench", "run_gpu.sh")
    for path in (script, os.path.join(REPO, "bench", "presets.sh"), os.path.join(REPO, "bench", "run_presets.sh")):
        subprocess.run(["bash", "-n", path], check=True)
    text = open(script).read()
    assert "source bench/presets.sh" in text and '"${PRESET_NAMES[@]}"' in text
    names = subprocess.run(["bash", "-c", 'source bench/presets.sh; echo "${PRESET_NAMES[@]}"; echo "${!PRESET[@]}"'],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\n")
    assert names[0].split() == ["qin", "din", "qin_qnn_dnn", "transformer_dcn"]
    assert sorted(names[1].split()) == sorted(names[0].split())
    assert "for policy in float32 mixed_bfloat16 mixed_float16; do" in text
    assert set(DTYPE_POLICIES) == {None, "float32", "mixed_bfloat16", "mixed_float16", "auto"}
    assert "bench mirrored" in text and 'CUDA_VISIBLE_DEVICES=""' in text
