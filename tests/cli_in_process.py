"""A command's ``main`` run in the test's own process, with its real flags: ``python -m`` without the launch.

Each ``python -m export.score ...`` costs seconds of TensorFlow import and
model load before the command does anything. :func:`run_main` runs the
same ``main(argv)`` in process: the module's own ``_define_flags()`` defines
its flags into a fresh :class:`absl.flags.FlagValues` (never absl's global
``FLAGS``, so the flags of several commands do not clash), the arguments
are parsed by absl as on the command line (types, bounds, required flags),
and ``main`` reads them as ``flags.FLAGS``. A ``SystemExit`` with a message
is what Python does with it at exit: the message and a newline on stderr,
exit code 1.

What it does not run is the launch itself (``run_app``: the interpreter's
start, TensorFlow's quiet import, absl's ``app.run``). Every test file that
uses it keeps real ``python -m`` launches of each command it covers, and
``tests/test_cli_sweep.py`` launches every command on bad input.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import subprocess
import sys

import pytest
from absl import flags


def run_main(module: str, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``python -m module *args`` (``stdin`` on its stdin) run in process: returncode, stdout and stderr."""
    mod = importlib.import_module(module)
    values = flags.FlagValues()
    argv = [module, *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for name in dir(flags):
            define = getattr(flags, name)
            if name.startswith("DEFINE") and "flag_values" in inspect.signature(define).parameters:
                mp.setattr(flags, name, functools.partial(define, flag_values=values))
        mod._define_flags()
        rest = values(argv)
        mp.setattr(flags, "FLAGS", values)
        mp.setattr(sys, "stdin", io.StringIO(stdin or ""))
        mp.setattr(sys, "stdout", out)
        mp.setattr(sys, "stderr", err)
        try:
            code = mod.main(rest) or 0
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=err)
                code = 1
            else:
                code = e.code or 0
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
