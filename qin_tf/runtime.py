"""Process-level runtime helpers of the CLIs: a quiet TensorFlow import, :func:`run_app`; whether a process lives.

TensorFlow's C++ runtime logs to file descriptor 2 while it loads (oneDNN and
CUDA probes) and ignores ``TF_CPP_MIN_LOG_LEVEL`` for some of it. The CLIs
call :func:`import_tensorflow` before anything else imports TensorFlow, so a
user sees only qin-tf's own output. Set ``QIN_TF_VERBOSE=1`` to see it all.

Every CLI starts through :func:`run_app` (absl's ``app.run`` with a plain-text
``--help`` and a prompt exit).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
from typing import Callable, Sequence


@contextlib.contextmanager
def silenced_stderr():
    """Redirects file descriptor 2 (C and Python stderr) to /dev/null."""
    if os.environ.get("QIN_TF_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow(*, start: bool = True):
    """Imports TensorFlow quietly and returns ``tf``; with ``start``, also Keras and the devices.

    ``start=False`` imports TensorFlow without setting up any device (what
    :func:`qin_tf.fileio.gfile` needs: a multi-worker strategy may still be
    created afterwards). Idempotent; silent unless ``QIN_TF_VERBOSE`` is set.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if "tensorflow" in sys.modules and (not start or getattr(import_tensorflow, "_done", False)):
        return sys.modules["tensorflow"]
    with silenced_stderr():
        import tensorflow as tf

        if start:
            import keras  # noqa: F401  (Keras 3, TF backend)

            tf.get_logger().setLevel("ERROR")
            tf.config.list_physical_devices()
            tf.constant(0)
    if start:
        import_tensorflow._done = True
    return tf


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is running (to leave a live run's temporary files alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


#: ``/proc/cpuinfo`` flags of CPUs that compute bfloat16 natively: AMX tiles (Sapphire Rapids and
#: later Xeons) and AVX512-BF16 dot products (Cooper Lake, AMD Zen 4 and later).
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
#: The first GPU compute capability with bfloat16 tensor cores (Ampere).
NATIVE_BF16_GPU_CAPABILITY = (8, 0)


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of this machine's CPU (the first ``flags`` line of ``path``); empty where
    there is no such file (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bfloat16(*, gpus: Sequence[tuple[int, int] | None] | None = None,
                    flags: frozenset[str] | None = None) -> str | None:
    """Why this machine computes bfloat16 natively, or ``None`` where it does not.

    With GPUs, they decide (training runs there): every one needs compute
    capability 8.0 or more (``"GPU compute capability 9.0"``). Without, the
    CPU does: one of :data:`NATIVE_BF16_CPU_FLAGS` (``"CPU flag amx_bf16"``).
    ``gpus`` (each GPU's compute capability, ``None`` where unknown) and
    ``flags`` default to this machine's; TensorFlow starts when ``gpus`` is
    not given.
    """
    if gpus is None:
        tf = import_tensorflow()
        gpus = [tf.config.experimental.get_device_details(d).get("compute_capability")
                for d in tf.config.list_physical_devices("GPU")]
    if gpus:
        if any(cc is None or tuple(cc) < NATIVE_BF16_GPU_CAPABILITY for cc in gpus):
            return None
        major, minor = min(tuple(cc) for cc in gpus)
        return f"GPU compute capability {major}.{minor}"
    have = cpu_flags() if flags is None else flags
    found = [f for f in NATIVE_BF16_CPU_FLAGS if f in have]
    return f"CPU flag {found[0]}" if found else None


def resolve_dtype_policy(policy: str | None, **probe) -> tuple[str | None, str]:
    """``(policy, why)``: ``"auto"`` becomes ``mixed_bfloat16`` where :func:`native_bfloat16` finds
    native bfloat16 and ``float32`` elsewhere; any other policy is returned as it is. ``probe``:
    :func:`native_bfloat16`'s arguments."""
    if policy != "auto":
        return policy, "as asked"
    why = native_bfloat16(**probe)
    if why:
        return "mixed_bfloat16", f"auto: {why}"
    return "float32", "auto: no native bfloat16 on this machine"


_ROLE = re.compile(r":[\w:]+:`(~?)([^`<]+?)(?:\s*<[^>]*>)?`")


def plain_text(text: str) -> str:
    r"""``text`` with its reStructuredText markup removed, as a terminal should show it.

    A role with a ``~`` target keeps the target's last name, other roles
    their target; double and single back-quotes and ``**`` are dropped; a
    line's closing ``::`` becomes ``:``.

    >>> plain_text("Examples::\n    ``x`` is a :class:`~qin_tf.config.TrainConfig`")
    'Examples:\n    x is a TrainConfig'
    """
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    text = text.replace("``", "").replace("**", "").replace("`", "")
    return re.sub(r"(\S)::$", r"\1:", text, flags=re.M)


def run_app(main: Callable[[list[str]], int | None], *, tensorflow: bool = False, **kwargs) -> None:
    """Runs ``main`` as a command line program: absl's ``app.run(main, **kwargs)``, plus:

    * ``--help`` prints the ``__main__`` module's docstring through
      :func:`plain_text`;
    * ``tensorflow=True`` imports TensorFlow quietly (:func:`import_tensorflow`)
      after the flags are parsed, so ``--help`` and bad flags answer at once;
    * when ``main`` is done, the objects alive are moved out of the cyclic
      garbage collector's sight (``gc.freeze``). Otherwise Python's shutdown
      walks the hundreds of thousands of objects that TensorFlow's tracing
      leaves, again after each module it clears: seconds on the bundled
      sample, up to a minute of full CPU after a run on MicroLens-50k. The
      operating system reclaims the memory; the program's files are closed
      by then.
    """
    from absl import app

    module = sys.modules["__main__"]
    if module.__doc__:
        module.__doc__ = plain_text(module.__doc__)

    def program(argv):
        if tensorflow:
            import_tensorflow()
        try:
            return main(argv)
        finally:
            sys.stdout.flush()
            gc.freeze()

    app.run(program, **kwargs)
