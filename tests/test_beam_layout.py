"""The shape of pipelines/ (issue 21): named steps of at most 80 lines, one job a module.

``tests/test_layering.py`` checks imports (no module takes another's
``_private`` names) and the length of qin_tf/'s functions; this checks the
length of pipelines/' functions. ``pipelines/validation.py`` (the row
contract) is moving to ``qin_tf/`` and is checked there.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
#: Checked where it moves to (issue 21: the row contract goes below both packages).
MOVING = {"pipelines/validation.py"}


def _long_functions(source: str, rel: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(source, rel)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                out.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
    return out


def test_the_length_check_counts_a_functions_every_line():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    assert _long_functions("def f():\n" + body, "m.py") == []
    assert _long_functions("class C:\n    def g(self):\n    " + body.replace("\n    ", "\n        ")
                           + "        return 1\n", "m.py") == ["m.py:2 g: 81 lines"]


def test_no_function_in_pipelines_exceeds_80_lines():
    found = []
    for path in sorted((REPO / "pipelines").glob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel not in MOVING:
            found += _long_functions(path.read_text(encoding="utf-8"), rel)
    assert found == []


def test_the_beam_helpers_have_one_home():
    """The file helpers, the commit and running a pipeline live in pipelines.beamio and pipelines.commit,
    not in the tools that use them."""
    from pipelines import beamio, build_examples, commit, preprocess

    for name in ("join", "exists", "list_dir", "open_read", "create", "read_text", "write_text", "makedirs",
                 "rename", "delete", "pipeline_options", "run_pipeline"):
        assert callable(getattr(beamio, name)), name
    for name in ("journalled_commit", "recover_commit", "swap_commit", "write_manifest", "read_manifest",
                 "remove_stale_siblings", "resolve_output_dir"):
        assert callable(getattr(commit, name)), name
    for module in (preprocess, build_examples):
        assert not hasattr(module, "_join") and not hasattr(module, "_write_manifest") and not hasattr(module, "_commit")
    assert preprocess.LEDGER == commit.Ledger("pipelines.preprocess", "preprocess_manifest.json", "feature_spec.json")
    assert build_examples.LEDGER == commit.Ledger("pipelines.build_examples", "build_examples_manifest.json",
                                                  "dataset_config.json")
