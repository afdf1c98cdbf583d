"""The shape of the house (STYLE.md, README's Layout): imports go one way, and the trainer stays readable.

* ``qin_tf/`` (the library) imports neither ``pipelines/`` nor ``export/``,
  at module level or inside a function, by ``import``, ``from ... import`` or
  ``importlib.import_module("...")``; the one composition root,
  ``qin_tf/train.py``, reaches ``export/`` lazily, inside a function.
* No module imports another module's ``_private`` names (``from a.b import
  _x``, or ``import a.b as m`` then ``m._x``) in ``qin_tf/``, ``pipelines/``
  and ``export/``; today's exceptions are listed, with who removes them.
* No function in ``qin_tf/`` is longer than 80 lines.
* The export after training (``--export_base``) lives in the training
  command: a failed export is one line, keeps the backup, and the same
  command run again resumes the finished run and exports it.

The source checks read the files with :mod:`ast`; nothing is imported.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("qin_tf", "pipelines", "export")
UPPER_LAYERS = ("pipelines", "export")
MAX_FUNCTION_LINES = 80

#: qin_tf/ modules allowed to import pipelines/ or export/ anywhere.
LAYERING_EXCEPTIONS: set[str] = set()
#: qin_tf/ modules allowed to import these top-level packages, but only inside a function.
LAZY_IMPORTS = {"qin_tf/train.py": {"export"}}
#: Functions of these files may exceed MAX_FUNCTION_LINES.
LONG_FUNCTION_EXCEPTIONS: set[str] = set()
#: (importing file, module) -> the private names it still takes from that module.
PRIVATE_IMPORT_ALLOWLIST = {
}


def _python_files(*packages: str):
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text(encoding="utf-8"), str(path))


def _module_name(rel: str) -> str:
    name = rel[: -len(".py")].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _imports(tree: ast.AST):
    """``(imported module, line, inside a function)`` of every import in ``tree``, lazy ones included."""
    found = []

    def visit(node, in_function):
        if isinstance(node, ast.Import):
            found.extend((a.name, node.lineno, in_function) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno, in_function))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.args[0].value, node.lineno, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def _layering_violations(files) -> list[str]:
    out = []
    for rel, tree in files:
        if rel in LAYERING_EXCEPTIONS:
            continue
        lazy_ok = LAZY_IMPORTS.get(rel, set())
        for module, line, in_function in _imports(tree):
            top = module.split(".")[0]
            if top not in UPPER_LAYERS or (top in lazy_ok and in_function):
                continue
            out.append(f"{rel}:{line} imports {module}" + ("" if in_function else " at module level"))
    return out


def _private_imports(files) -> dict[tuple[str, str], set[str]]:
    """``(file, module) -> {private names}`` taken across modules, by ``from`` or by attribute."""
    out: dict[tuple[str, str], set[str]] = {}
    for rel, tree in files:
        me = _module_name(rel)
        aliases = {}  # local name -> project module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__") and node.module != me:
                        out.setdefault((rel, node.module), set()).add(a.name)
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                target = aliases.get(node.value.id)
                if target and target.split(".")[0] in PROJECT_PACKAGES and target != me:
                    out.setdefault((rel, target), set()).add(node.attr)
    return out


def _long_functions(files) -> list[str]:
    out = []
    for rel, tree in files:
        if rel in LONG_FUNCTION_EXCEPTIONS:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
    return out


# --------------------------------------------------------------------------
# The checks themselves, on small sources with known answers
# --------------------------------------------------------------------------


def test_the_import_checks_catch_every_form():
    source = ast.parse(
        "import pipelines.preprocess\n"
        "from export.exporter import export_model\n"
        "import importlib\n"
        "def f():\n"
        "    import export\n"
        "    importlib.import_module('pipelines.validation')\n"
        "    return __import__('export.client')\n"
        "import qin_tf.spec\n")
    assert _imports(source) == [("pipelines.preprocess", 1, False), ("export.exporter", 2, False),
                                ("importlib", 3, False), ("export", 5, True), ("pipelines.validation", 6, True),
                                ("export.client", 7, True), ("qin_tf.spec", 8, False)]
    assert _layering_violations([("qin_tf/x.py", source)]) == [
        "qin_tf/x.py:1 imports pipelines.preprocess at module level",
        "qin_tf/x.py:2 imports export.exporter at module level",
        "qin_tf/x.py:5 imports export", "qin_tf/x.py:6 imports pipelines.validation",
        "qin_tf/x.py:7 imports export.client"]
    # the composition root: export inside a function only, never pipelines
    assert _layering_violations([("qin_tf/train.py", source)]) == [
        "qin_tf/train.py:1 imports pipelines.preprocess at module level",
        "qin_tf/train.py:2 imports export.exporter at module level",
        "qin_tf/train.py:6 imports pipelines.validation"]


def test_the_private_import_check_catches_from_and_attribute_forms():
    source = ast.parse(
        "from qin_tf.layers.attention import _as_mask, as_mask\n"
        "from pipelines import preprocess as pp\n"
        "import export.local_server as ls\n"
        "from qin_tf.me import _mine\n"
        "x = pp._join(pp.public, ls._tf_error_line, _mine, pp.__name__)\n")
    assert _private_imports([("qin_tf/me.py", source)]) == {
        ("qin_tf/me.py", "qin_tf.layers.attention"): {"_as_mask"},
        ("qin_tf/me.py", "pipelines.preprocess"): {"_join"},
        ("qin_tf/me.py", "export.local_server"): {"_tf_error_line"}}


def test_the_length_check_counts_every_line_of_a_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(78))
    at_limit = ast.parse(f"def ok():\n    '''doc'''\n{body}\n")  # 80 lines
    over = ast.parse(f"def long():\n    '''doc'''\n{body}\n    return x0\n")  # 81 lines
    assert _long_functions([("qin_tf/a.py", at_limit)]) == []
    assert _long_functions([("qin_tf/b.py", over)]) == ["qin_tf/b.py:1 long: 81 lines"]


# --------------------------------------------------------------------------
# The repository
# --------------------------------------------------------------------------


def test_qin_tf_imports_neither_pipelines_nor_export():
    assert _layering_violations(_python_files("qin_tf")) == []


def test_train_reaches_export_only_lazily():
    (rel, tree), = [f for f in _python_files("qin_tf") if f[0] == "qin_tf/train.py"]
    export_imports = [(m, in_function) for m, _, in_function in _imports(tree) if m.split(".")[0] == "export"]
    assert export_imports == [("export.exporter", True)]
    task_tree = next(t for r, t in _python_files("qin_tf") if r == "qin_tf/task.py")
    assert [m for m, _, _ in _imports(task_tree) if m.split(".")[0] in UPPER_LAYERS] == []


def test_importing_the_trainer_loads_neither_pipelines_nor_export():
    code = ("import sys; import qin_tf.train, qin_tf.task, qin_tf.data, qin_tf.callbacks; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pipelines', 'export')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_no_module_takes_another_modules_private_names():
    found = _private_imports(_python_files(*PROJECT_PACKAGES))
    new = {key: names - PRIVATE_IMPORT_ALLOWLIST.get(key, set()) for key, names in found.items()}
    assert {key: sorted(names) for key, names in new.items() if names} == {}


def test_no_function_in_qin_tf_exceeds_80_lines():
    assert _long_functions(_python_files("qin_tf")) == []


def test_no_function_in_export_exceeds_80_lines():
    assert _long_functions(_python_files("export")) == []


def test_batch_scoring_and_the_client_share_readers_and_writers_not_each_other():
    """``export.score`` and ``export.client`` both import ``export.readers`` and ``export.writers``, never each
    other (no circle), and nothing of scoring is left in ``qin_tf/``."""
    files = dict(_python_files("export"))
    imported = {rel: {m for m, _, _ in _imports(files[rel])} for rel in ("export/score.py", "export/client.py")}
    assert "export.client" not in imported["export/score.py"] and "export.score" not in imported["export/client.py"]
    for rel in imported:
        assert {"export.readers", "export.writers"} <= imported[rel], rel
    assert not (REPO / "qin_tf" / "score.py").exists()


def test_the_savedmodel_contract_is_spelled_once():
    """The signature names, the model file and the input suffixes are string literals in qin_tf/signatures.py
    only (docstrings aside): every other module imports them."""
    names = {"serving_default", "predict_examples", "serving_raw", "predict_raw_examples", "best.keras",
             "model_fingerprint.json", ".ndjson", ".tfrecords.gz"}
    found = []
    for rel, tree in _python_files(*PROJECT_PACKAGES):
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        found += [f"{rel}:{n.lineno} {n.value!r}" for n in ast.walk(tree) if isinstance(n, ast.Constant)
                  and n.value in names and id(n) not in docstrings and rel != "qin_tf/signatures.py"]
    assert found == []


# --------------------------------------------------------------------------
# --export_base from the training command
# --------------------------------------------------------------------------


def test_export_base_needs_the_training_commands_exporter(sample_spec, tmp_path):
    from qin_tf import task
    from qin_tf.config import ExperimentConfig, TrainConfig

    config = ExperimentConfig(train=TrainConfig(data_dir=sample_spec.base_dir, model_dir=str(tmp_path / "model"),
                                                export_base=str(tmp_path / "export")))
    with pytest.raises(task.TrainingError, match=r"^--export_base needs an export_fn: python -m qin_tf.train"):
        task.run(config, print_fn=lambda s: None)
    assert not (tmp_path / "model").exists()  # refused before anything was written


def test_a_failed_export_is_one_line_and_the_same_command_retries_it(sample_spec, tmp_path):
    """``python -m qin_tf.train --export_base=...`` where the export cannot be written: exit 1, one line
    saying training finished and how to retry; the backup stays, so the same command, run again with a
    writable base, resumes the finished run and exports it."""
    (tmp_path / "afile").write_text("")
    model_dir = tmp_path / "model"

    def train(export_base):
        return subprocess.run(
            [sys.executable, "-m", "qin_tf.train", f"--flagfile={REPO / 'configs' / 'sample.flags'}",
             f"--data_dir={sample_spec.base_dir}", f"--model_dir={model_dir}", "--epochs=1", "--steps_per_epoch=2",
             f"--export_base={export_base}"], cwd=REPO, capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})

    bad = tmp_path / "afile" / "export"
    proc = train(bad)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"train: error: training finished ({model_dir}/metrics.json), but the export to {bad} failed: "
        f"{tmp_path / 'afile'} is not a directory. Retry it with: python -m export.exporter "
        f"--model_dir={model_dir} --export_base={bad}"]
    assert "exported" not in proc.stdout
    assert (model_dir / "metrics.json").exists() and (model_dir / "backup").is_dir()

    good = tmp_path / "export"
    proc = train(good)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert f"resumed from {model_dir}/backup: 1 epochs done (training had finished)" in proc.stdout
    assert f"exported the best model to {good}/1" in proc.stdout
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["export"] == f"{good}/1" and metrics["epochs_run"] == 1
    assert (good / "1" / "saved_model.pb").exists()
    assert not (model_dir / "backup").exists()
