"""What every benchmark of bench/ shares: the machine, the date, peak memory, one JSON line.

Each benchmark is a CLI that prints exactly one JSON line on stdout (progress,
if any, goes to stderr)::

    {"bench": "...", ..., "peak_rss_mb": ..., "wall_s": ..., "other_cpu_s": ...,
     "machine": {...}, "date": "...", "command": "..."}

``other_cpu_s`` is the CPU time used by other processes while the benchmark
ran: a run where it is more than a small fraction of ``wall_s`` shared the
cores with something else and its rates are low; run it again.

``peak_rss_mb`` is the peak resident set size of the benchmark's process
(``getrusage(RUSAGE_SELF).ru_maxrss``), TensorFlow's runtime included; where a
benchmark starts other processes their peak is reported separately.

Every figure must be one a user reproduces from a fresh virtual environment
made by the README's command (``pip install -e .``). So importing this module
checks the environment (:func:`environment_problems`): qin-tf installed,
every ``install_requires`` of ``setup.cfg`` installed at a declared version,
and the compiled CRC-32C of the TFRecord writer active. A difference stops
the benchmark (exit 1) with one line per problem; with
``QIN_BENCH_ALLOW_ENV_MISMATCH=1`` it runs, says so on stderr, and the JSON
line's ``environment`` records ``"fresh_install": false`` and the problems.
"""

from __future__ import annotations

import configparser
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Set to 1 to benchmark in an environment that differs from a fresh install (recorded in the output).
ALLOW_MISMATCH_ENV = "QIN_BENCH_ALLOW_ENV_MISMATCH"


def install_requires(setup_cfg: str = os.path.join(REPO, "setup.cfg")) -> list[str]:
    """The ``install_requires`` lines of ``setup.cfg``: what a fresh ``pip install -e .`` installs."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)
    return [line.strip() for line in cfg.get("options", "install_requires").splitlines() if line.strip()]


def environment_problems(requirements: list[str] | None = None) -> list[str]:
    """How this Python environment differs from a fresh install of this checkout; ``[]`` if it does not.

    Checks that qin-tf is installed, that every requirement is installed at a
    version it allows, and that ``pipelines.example_codec`` gets google-crc32c's
    C implementation (a missing accelerator is a failure, not a fallback).
    """
    from packaging.requirements import Requirement

    problems = []
    try:
        importlib.metadata.version("qin-tf")
    except importlib.metadata.PackageNotFoundError:
        problems.append("qin-tf is not installed (the README installs it with `pip install -e .`)")
    for line in install_requires() if requirements is None else requirements:
        req = Requirement(line)
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed; setup.cfg requires {req}")
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} is installed; setup.cfg requires {req}")
    try:
        from pipelines import example_codec  # its ImportError says what is missing

        import google_crc32c

        if example_codec._crc32c_bytes is not google_crc32c.value:
            problems.append("pipelines.example_codec does not use google-crc32c's C implementation")
    except ImportError as e:
        problems.append(" ".join(str(e).split()))
    return problems


def check_environment() -> dict:
    """Stops (exit 1) on :func:`environment_problems`, unless ``QIN_BENCH_ALLOW_ENV_MISMATCH=1``.

    Returns the ``environment`` record of the JSON line.
    """
    problems = environment_problems()
    record = {"fresh_install": not problems, "problems": problems, "python": sys.executable}
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        if os.environ.get(ALLOW_MISMATCH_ENV) != "1":
            raise SystemExit(f"bench: error: this environment ({sys.prefix}) differs from a fresh install of "
                             f"{REPO} (python3 -m venv .venv && .venv/bin/pip install -e .):\n{lines}\n"
                             f"Its figures would not be reproducible; fix it, or set {ALLOW_MISMATCH_ENV}=1 "
                             f"to run anyway (the output records the differences).")
        print(f"bench: WARNING: {ALLOW_MISMATCH_ENV}=1: benchmarking in an environment that differs from a "
              f"fresh install; these figures are not the README's:\n{lines}", file=sys.stderr, flush=True)
    return record


ENVIRONMENT = check_environment()


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes of the machine have used since boot (``/proc/stat``, not idle or iowait)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


#: At import: wall clock, the machine's busy CPU time and this process's own.
_START = (time.monotonic(), _busy_cpu_s(), _own_cpu_s())


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak RSS in MiB of this process (``RUSAGE_SELF``) or of its waited-for children."""
    return round(resource.getrusage(who).ru_maxrss / 1024.0, 1)  # ru_maxrss is KiB on Linux


def current_rss_mb() -> float:
    """RSS now, MiB (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def machine() -> dict:
    """CPU model, cores, RAM, load and software versions of this machine."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name", info["cpu"])
    except (OSError, subprocess.CalledProcessError):
        pass
    from qin_tf.runtime import NATIVE_BF16_CPU_FLAGS, cpu_flags

    flags = cpu_flags()
    info.update({flag: flag in flags for flag in NATIVE_BF16_CPU_FLAGS})   # amx_bf16, avx512_bf16
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["ram_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    info["load_1m_at_start"] = round(os.getloadavg()[0], 2)
    info["python"] = platform.python_version()
    try:
        from qin_tf.runtime import silenced_stderr

        with silenced_stderr():
            import tensorflow as tf
        info["tensorflow"] = tf.__version__
    except ImportError:
        pass
    return info


def command() -> str:
    """The command line that ran this benchmark, as a shell would take it."""
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def other_processes_cpu_s() -> float | None:
    """CPU seconds that processes other than this one (and its waited-for children) used since import.

    A benchmark's figures are valid only if this is small compared with its
    wall time: anything else running on the machine shares its cores.
    """
    busy = _busy_cpu_s()
    if busy is None or _START[1] is None:
        return None
    return round(max(0.0, (busy - _START[1]) - (_own_cpu_s() - _START[2])), 1)


def emit(record: dict) -> dict:
    """Adds peak RSS, machine, date, command and interference to ``record``; prints it as one JSON line.

    ``wall_s`` is the benchmark process's run time and ``other_cpu_s`` the CPU
    time other processes used meanwhile (:func:`other_processes_cpu_s`).
    """
    out = dict(record)
    out.setdefault("peak_rss_mb", peak_rss_mb())
    out["wall_s"] = round(time.monotonic() - _START[0], 1)
    out["other_cpu_s"] = other_processes_cpu_s()
    out["machine"] = machine()
    out["environment"] = ENVIRONMENT
    out["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out["command"] = command()
    print(json.dumps(out), flush=True)
    return out


def log(message: str) -> None:
    """A progress line on stderr (stdout carries only the JSON line)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentiles_ms(seconds, qs=(50, 90, 99)) -> dict:
    """``{"p50_ms": ..., ...}`` of a list of durations in seconds."""
    import numpy as np

    a = np.asarray(seconds, dtype=np.float64) * 1e3
    out = {f"p{q}_ms": round(float(np.percentile(a, q)), 3) for q in qs}
    out["mean_ms"] = round(float(a.mean()), 3)
    out["calls"] = int(a.size)
    return out


def vm_hwm_mb(pid: int) -> float | None:
    """Peak RSS so far of a running process (``VmHWM`` of ``/proc/<pid>/status``), MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


def run_measured(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float, float | None]:
    """Runs ``cmd`` to completion; returns ``(completed process, wall seconds, peak RSS MiB)``.

    The peak RSS comes from GNU ``/usr/bin/time`` wrapped around the command
    (``getrusage`` of a child forked from this large process would report
    this process's size: Linux carries the high-water mark across fork and
    exec); ``None`` when ``/usr/bin/time`` is missing.
    """
    import tempfile

    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    timer = "/usr/bin/time"
    rss_file = None
    if os.path.exists(timer):
        fd, rss_file = tempfile.mkstemp(prefix="bench_rss_")
        os.close(fd)
        cmd = [timer, "-o", rss_file, "-f", "%M", *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, **kwargs)
    wall = time.perf_counter() - t0
    peak = None
    if rss_file:
        try:
            with open(rss_file) as f:
                values = [line.strip() for line in f if line.strip().isdigit()]
            peak = round(int(values[-1]) / 1024.0, 1) if values else None
        finally:
            os.remove(rss_file)
    return proc, wall, peak


def configure_threads(intra_op: int, inter_op: int) -> None:
    """Sets TensorFlow's thread pools (0 = TensorFlow's default: one thread per core each).

    Call it before anything starts TensorFlow's runtime; it imports TensorFlow quietly.
    """
    from qin_tf.runtime import silenced_stderr

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with silenced_stderr():
        import tensorflow as tf

    if intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)


def train_config(train_flags: list[str]):
    """The ``qin_tf.config.ExperimentConfig`` that ``python -m qin_tf.train`` builds from ``train_flags``.

    ``train_flags`` are the training CLI's own flags (``--flagfile=configs/transformer_dcn.flags``,
    ``--cross_projection_dim=256``, ...), parsed in a fresh flag set with the CLI's precedence
    (flagfiles first, explicit flags over them). Raises ``SystemExit`` with the CLI's message on
    an invalid flag or value.
    """
    from absl import flags

    from qin_tf import train

    values = flags.FlagValues()
    train.define_flags(values)
    try:
        rest = train.parse_flags(["qin_tf.train", *train_flags], values)
        if len(rest) > 1:
            raise SystemExit(f"--train_flag: unexpected arguments {rest[1:]}")
        return train.config_from_flags(values)
    except (flags.Error, ValueError) as e:
        raise SystemExit(f"--train_flag: {e}") from None
