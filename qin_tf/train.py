"""Trains QIN (or the DIN baseline): ``python -m qin_tf.train --flagfile=configs/sample.flags``.

A thin absl ``main``: flags -> :class:`~qin_tf.config.ExperimentConfig` ->
strategy -> :func:`qin_tf.task.run` (which does the work and writes
``model_dir``) -> with ``--export_base``, :func:`export_trained` (this
command is the one composition root that reaches ``export/``, lazily, as
TF Model Garden's ranking ``train.py`` does). Every field of
``ModelConfig`` and ``TrainConfig`` is a flag of the same name, with the
dataclass default. Precedence: defaults <
``--flagfile`` < flags given on the command line, wherever on the command
line the ``--flagfile`` stands. Optional values take ``none``
(``--eval_batch_size=none``); tuples take commas (``--din_dnn_units=512,256``).

Examples::

    python -m qin_tf.train --flagfile=configs/sample.flags
    python -m qin_tf.train --flagfile=configs/microlens50k.flags --model=din --epochs=5
    python -m qin_tf.train --flagfile=configs/sample.flags --strategy=mirrored --logical_cpus=2

Exit status 0 on success, 1 on a configuration or training error (the
message names the problem), 2 on bad flags.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import sys
import types
import typing

from absl import flags

from qin_tf.config import ExperimentConfig, ModelConfig, TrainConfig
from qin_tf.cli import error_line
from qin_tf.runtime import plain_text, run_app

#: The prefix of this command's one-line errors (qin_tf.cli: ``<tool>: error: ...``).
TOOL = "train"

#: The dataclasses whose fields are flags, and where they go in ExperimentConfig.
SECTIONS = (("model", ModelConfig), ("train", TrainConfig))


# --------------------------------------------------------------------------
# Flags generated from the dataclasses
# --------------------------------------------------------------------------


class _OptionalParser(flags.ArgumentParser):
    """``none`` (or an empty value) -> None; anything else through ``inner``."""

    def __init__(self, inner: flags.ArgumentParser, type_name: str):
        self.inner = inner
        self.type_name = type_name

    def parse(self, argument):
        if argument is None or (isinstance(argument, str) and argument.strip().lower() in ("", "none")):
            return None
        return self.inner.parse(argument)

    def flag_type(self):
        return f"{self.type_name} or none"


class _TupleParser(flags.ArgumentParser):
    """``"512,256"`` -> ``(512, 256)`` (or strings, by ``item_type``); ``""`` -> ``()``."""

    def __init__(self, item_type=int):
        self.item_type = item_type

    def parse(self, argument):
        if isinstance(argument, (tuple, list)):
            values = list(argument)
        else:
            values = [v for v in str(argument).replace(" ", "").split(",") if v]
        try:
            return tuple(self.item_type(v) for v in values)
        except ValueError:
            raise ValueError(f"expected comma-separated {self.flag_type()[16:]}, got {argument!r}") from None

    def flag_type(self):
        return "comma-separated " + ("ints" if self.item_type is int else "strings")


class _TupleSerializer(flags.ArgumentSerializer):
    def serialize(self, value):
        return ",".join(str(v) for v in value) if value else ""


def _field_help(cls) -> dict[str, str]:
    """Help texts, as plain text: ``metadata["help"]``, else the class docstring's ``Attributes:`` entry.

    An entry starts at the indentation of the first (``name: text``, or
    ``a, b: text`` for several fields); deeper lines continue it.
    """
    out = {}
    doc = inspect.getdoc(cls) or ""
    m = re.search(r"^Attributes:\n(.*?)(\n\s*\n|\Z)", doc, re.S | re.M)
    if m:
        lines = m.group(1).splitlines()
        indent = len(lines[0]) - len(lines[0].lstrip())
        current = []
        for line in lines:
            entry = re.match(r"([\w, ]+):\s*(.*)", line[indent:])
            if len(line) - len(line.lstrip()) == indent and entry:
                current = [n.strip() for n in entry.group(1).split(",")]
                for n in current:
                    out[n] = entry.group(2).strip()
            else:
                for n in current:
                    out[n] += " " + line.strip()
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            out[f.name] = f.metadata["help"]
    return {name: plain_text(text) for name, text in out.items()}


def _base_parser(tp):
    if tp is bool:
        return flags.BooleanParser(), "bool"
    if tp is int:
        return flags.IntegerParser(), "int"
    if tp is float:
        return flags.FloatParser(), "float"
    if tp is str:
        return flags.ArgumentParser(), "string"
    raise TypeError(f"no flag parser for type {tp!r}")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one flag per config field (plus ``--logical_cpus``) in ``flag_values``."""
    for section, cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        helps = _field_help(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f"[{section}] " + helps.get(f.name, f"{cls.__name__}.{f.name}")
            args = typing.get_args(tp)
            origin = typing.get_origin(tp)
            if origin in (typing.Union, types.UnionType) and type(None) in args:
                inner = next(a for a in args if a is not type(None))
                parser, name = _base_parser(inner)
                flags.DEFINE(_OptionalParser(parser, name), f.name, default, help_text,
                             flag_values=flag_values)
            elif origin is tuple:
                flags.DEFINE(_TupleParser(args[0]), f.name, default, help_text, flag_values=flag_values,
                             serializer=_TupleSerializer())
            elif tp is bool:
                flags.DEFINE_boolean(f.name, default, help_text, flag_values=flag_values)
            else:
                parser, _ = _base_parser(tp)
                flags.DEFINE(parser, f.name, default, help_text, flag_values=flag_values)
    flags.DEFINE_integer("logical_cpus", 0, "Split the host CPU into this many logical devices before "
                         "TensorFlow starts (runs --strategy=mirrored without GPUs; for tests).",
                         lower_bound=0, flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> ExperimentConfig:
    """The ExperimentConfig the parsed flags describe (raises ValueError on invalid values)."""
    parts = {}
    for section, cls in SECTIONS:
        parts[section] = cls(**{f.name: flag_values[f.name].value for f in dataclasses.fields(cls)})
    return ExperimentConfig(**parts)


def _flagfiles_first(argv: list[str]) -> list[str]:
    """Moves ``--flagfile`` arguments to the front so explicit flags override them."""
    head, files, rest = argv[:1], [], []
    i = 1
    while i < len(argv):
        a = argv[i]
        if re.match(r"^--?flagfile=", a):
            files.append(a)
        elif a in ("--flagfile", "-flagfile") and i + 1 < len(argv):
            files += [a, argv[i + 1]]
            i += 1
        elif a == "--":
            rest += argv[i:]
            break
        else:
            rest.append(a)
        i += 1
    return head + files + rest


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Parses ``argv`` (program name first) with flagfile < explicit precedence; returns the rest."""
    return flag_values(_flagfiles_first(list(argv)))


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def run_main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> int:
    """Trains with already parsed ``flag_values``; returns the exit status."""
    if len(argv) > 1:
        print(f"{TOOL}: error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    try:
        config = config_from_flags(flag_values)
    except ValueError as e:
        print(f"{TOOL}: error: {error_line(e)}", file=sys.stderr)
        return 1
    from qin_tf import task  # imports TensorFlow quietly, without starting it

    try:
        strategy = task.create_strategy(config.train.strategy, logical_cpus=flag_values["logical_cpus"].value)
        result = task.run(config, strategy=strategy, export_fn=functools.partial(export_trained, config))
    except task.TrainingError as e:
        print(f"{TOOL}: error: {error_line(e)}", file=sys.stderr, flush=True)
        return 1
    if result.is_chief and result.metrics:
        m = result.metrics
        summary = "  ".join(f"{split} AUC {v['auc']:.4f} logloss {v['logloss']:.4f} "
                            f"gAUC {v.get('gauc', float('nan')):.4f}" for split, v in m["splits"].items())
        print(f"done: best epoch {m['best_epoch']}: {summary}", flush=True)
    return 0


def export_trained(config: ExperimentConfig, model_dir: str) -> str:
    """``--export_base``: exports the finished run in ``model_dir``; returns the version directory.

    :func:`qin_tf.task.run` calls it on the chief once training succeeded and
    ``metrics.json`` is written. ``export/`` is imported here, lazily: this
    command is the one composition root that reaches it (``qin_tf/`` does
    not import ``export/``). A failed export is a ``TrainingError`` saying
    that training finished and how to retry the export alone.
    """
    from qin_tf import task

    tc = config.train
    try:
        from export.exporter import export_from_model_dir
    except ImportError as e:
        raise task.TrainingError(f"--export_base needs export.exporter ({e}).") from None
    try:
        return export_from_model_dir(model_dir, tc.export_base, data_dir=tc.data_dir)
    except Exception as e:  # the run itself succeeded: say so, and how to retry the export
        raise task.TrainingError(f"training finished ({os.path.join(model_dir, task.METRICS_FILENAME)}), but the "
                                 f"export to {tc.export_base} failed: {e}. Retry it with: python -m export.exporter "
                                 f"--model_dir={model_dir} --export_base={tc.export_base}") from e


def main(argv):
    return run_main(argv, flags.FLAGS)


def cli(argv: list[str]) -> int:
    """Parses ``argv`` into fresh flags and trains: ``cli(["train", "--flagfile=..."])``.

    The same path as ``python -m qin_tf.train`` (minus absl's process setup),
    for calling the command in-process.
    """
    fv = flags.FlagValues()
    define_flags(fv)
    try:
        rest = parse_flags(argv, fv)
    except flags.Error as e:
        print(f"{TOOL}: error: {error_line(e)}", file=sys.stderr)
        return 2
    return run_main(rest, fv)


def _parser(argv):
    try:
        return parse_flags(argv, flags.FLAGS)
    except flags.Error as e:
        print(f"FATAL Flags parsing error: {e}\nPass --helpfull to see help on flags.", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    run_app(main, flags_parser=_parser)
