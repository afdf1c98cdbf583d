"""What every command tells a user when it stops: one plain line, ``<tool>: error: <text>``.

* :func:`error_line`: an exception (a TensorFlow op error, a protobuf or
  gRPC error, the project's own) or its text as one plain line, without
  TensorFlow's runtime decorations. The one translator of TensorFlow's
  error text; ``qin_tf.data``, the trainer and every ``export`` command use
  it.
* :func:`exit_error`: stops a command with that line on stderr and exit code 1.
"""

from __future__ import annotations

import re
from typing import NoReturn

#: TensorFlow's runtime decorations of an op error: ``{{function_node ...}}``, ``[[{{node ...}}]]``, ``[Op:...]``.
_TF_DECORATION = re.compile(r"\{\{function_node [^}]*\}\}|\[\[\{\{node [^}]*\}\}\]\]|\[\[node [^\]]*\]\]|\{\{node [^}]*\}\}|"
                            r"\[Op:[^\]]*\](?: name: [^\n]*)?")
#: Lines that are TensorFlow's or Python's frame, not the message.
_TF_NOISE_LINES = ("Graph execution error", "Detected at node", "File ", "Traceback", "return ", "Stack trace")
#: TensorFlow's hints after a loading error, which do not apply to a broken export.
_TF_HINTS = re.compile(r"\s*You may be trying to load on a different device.*$|\s*Consider setting the "
                       r"`experimental_io_device`.*$")
_ASSERTION = re.compile(r"assertion failed: \[(.*?)\](?: \[|$)")


def error_line(error: BaseException | str) -> str:
    """An error, or its text (a gRPC status' details), as one plain line.

    Drops the graph-execution preamble and Python frames, ``{{function_node
    ...}}``, ``[[{{node ...}}]]``, ``[Op:...]`` and TensorFlow's loading
    hints, and joins what is left on one line; a failed graph assertion
    becomes its message (``assertion failed: [`item_id`: raw ids are ...]
    [Condition ...]`` -> ``refused by the graph: `item_id`: raw ids are ...``).

    >>> error_line(ValueError("{{function_node __inference_f_1}} bad id\\n\\t [[{{node Lookup}}]] [Op:f]"))
    'bad id'
    """
    if isinstance(error, UnicodeDecodeError):
        return "the input holds bytes that are not a serialized tf.train.Example."
    text = error if isinstance(error, str) else getattr(error, "message", None) or str(error)
    lines = [" ".join(_TF_DECORATION.sub(" ", line).split()) for line in str(text).splitlines()]
    lines = [line for line in lines if line and not line.startswith(_TF_NOISE_LINES)]
    for line in lines:
        m = _ASSERTION.match(line)
        if m:
            return "refused by the graph: " + m.group(1).replace('\\"', '"')  # TF escapes the message's quotes
    line = _TF_HINTS.sub("", " ".join(lines)).strip(" :")
    return line or ("error" if isinstance(error, str) else type(error).__name__)


def exit_error(tool: str, error: BaseException | str) -> NoReturn:
    """Stops the command ``tool``: ``<tool>: error: <error_line(error)>`` on stderr, exit code 1."""
    raise SystemExit(f"{tool}: error: {error_line(error)}")
