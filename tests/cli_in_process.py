"""A command's ``main`` run in the test's own process, with its real flags: ``python -m`` without the launch.

Each ``python -m export.score ...`` costs seconds of TensorFlow import and
model load before the command does anything. :func:`run_main` runs the
same ``main(argv)`` in process: the module's own ``_define_flags()`` (or its
``_parse_flags(argv)``, the ``flags_parser`` it hands ``run_app``) defines
its flags into a fresh :class:`absl.flags.FlagValues` (never absl's global
``FLAGS``, so the flags of several commands do not clash; absl's logging
flags are shared), the arguments are parsed by absl as on the command line
(types, bounds, required flags), and ``main`` reads them as
``flags.FLAGS``. A ``SystemExit`` with a message is what Python does with
it at exit: the message and a newline on stderr, exit code 1. The log
levels ``main`` may set (absl's verbosity, Beam's logger) are put back.

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
import logging
import subprocess
import sys

import pytest
from absl import flags
from absl import logging as absl_logging


def _takes_flag_values(fn) -> bool:
    try:
        return "flag_values" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def run_main(module: str, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``python -m module *args`` (``stdin`` on its stdin) run in process: returncode, stdout and stderr."""
    mod = importlib.import_module(module)
    values = flags.FlagValues()
    argv = [module, *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    for flag in flags.FLAGS.get_flags_for_module("absl.logging"):
        values[flag.name] = flag
    verbosity, beam_level = absl_logging.get_verbosity(), logging.getLogger("apache_beam").level
    with pytest.MonkeyPatch.context() as mp:
        for name in dir(flags):  # DEFINE_*, mark_flag_as_required, ...: into `values`
            fn = getattr(flags, name)
            if callable(fn) and not isinstance(fn, type) and _takes_flag_values(fn):
                mp.setattr(flags, name, functools.partial(fn, flag_values=values))
        mp.setattr(flags, "FLAGS", values)
        mp.setattr(sys, "stdin", io.StringIO(stdin or ""))
        mp.setattr(sys, "stdout", out)
        mp.setattr(sys, "stderr", err)
        try:
            if hasattr(mod, "_parse_flags"):
                rest = mod._parse_flags(argv)
            else:
                mod._define_flags()
                rest = values(argv)
            code = mod.main(rest) or 0
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=err)
                code = 1
            else:
                code = e.code or 0
        finally:
            if absl_logging.get_verbosity() != verbosity:
                absl_logging.set_verbosity(verbosity)
            logging.getLogger("apache_beam").setLevel(beam_level)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
