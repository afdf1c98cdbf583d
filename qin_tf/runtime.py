"""Process-level runtime helpers: a quiet TensorFlow import for the CLIs; whether a process lives.

TensorFlow's C++ runtime logs to file descriptor 2 while it loads (oneDNN and
CUDA probes) and ignores ``TF_CPP_MIN_LOG_LEVEL`` for some of it. The CLIs
call :func:`import_tensorflow` before anything else imports TensorFlow, so a
user sees only qin-tf's own output. Set ``QIN_TF_VERBOSE=1`` to see it all.
"""

from __future__ import annotations

import contextlib
import os
import sys


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


def import_tensorflow():
    """Imports TensorFlow and Keras, initialises the devices, and returns ``tf``.

    Idempotent; silent unless ``QIN_TF_VERBOSE`` is set.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if "tensorflow" in sys.modules and getattr(import_tensorflow, "_done", False):
        return sys.modules["tensorflow"]
    with silenced_stderr():
        import tensorflow as tf
        import keras  # noqa: F401  (Keras 3, TF backend)

        tf.get_logger().setLevel("ERROR")
        tf.config.list_physical_devices()
        tf.constant(0)
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
