"""Benchmark: pipelines.build_examples on the MicroLens-50k raw logs, and how its time grows with the log.

    python bench/bench_build_examples.py [--config=configs/logs/microlens50k.json] [--scales=1,4,16] \\
        [--output_base=DIR] [Beam options]

For each scale s the event log is the real one with every user repeated s
times under new ids (user u becomes u + k * 10**7, k = 0..s-1: synthetic
users made by relabelling real ones, so the item side is unchanged and the
events grow s-fold). Each build runs as its own process
(``python -m pipelines.build_examples``), timed, with its peak RSS from GNU
time; its output is removed (kept under ``--output_base`` when given, to
compare runs with ``diff -r``). Beam options pass through to the build, e.g.
``--direct_running_mode=multi_processing --direct_num_workers=2``. Prints
one JSON line (``bench/common.py``) with, per scale, events, rows, seconds,
CPU seconds (user + sys of the build), events per second and peak RSS; the
``other_cpu_s`` field says how much CPU other processes took meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

_CONFIG = flags.DEFINE_string("config", "configs/logs/microlens50k.json", "Log config (format `sequences`).")
_SCALES = flags.DEFINE_list("scales", ["1", "4", "16"], "Log sizes, as multiples of the real log.")
_OUTPUT_BASE = flags.DEFINE_string("output_base", None, "Keep each build's output here (out_x{scale}); "
                                   "unset, outputs are removed.")
USER_OFFSET = 10 ** 7


def scaled_config(config: str, scale: int, tmp: str) -> str:
    """A copy of ``config`` whose event log is the real one with every user repeated ``scale`` times."""
    from pipelines.logs_config import LogsConfig

    cfg = LogsConfig.load(config)
    with open(config) as f:
        d = json.load(f)
    if cfg.events.source.format != "sequences":
        raise SystemExit("bench_build_examples: the config's events must be of format `sequences`")
    base = os.path.dirname(os.path.abspath(config))
    for part in (d.get("catalog") or {}, (d.get("catalog") or {}).get("vector") or {}):
        if isinstance(part, dict) and "files" in part:
            part["files"] = os.path.normpath(os.path.join(base, part["files"]))
    events = os.path.join(tmp, f"events_x{scale}.tsv")
    with open(events, "w") as out:
        for path in cfg.events.source.match():
            with open(path) as f:
                lines = [line.rstrip("\n") for line in f if line.strip()]
            for k in range(scale):
                for line in lines:
                    user, _, items = line.partition(cfg.events.source.delimiter)
                    out.write(f"{int(user) + k * USER_OFFSET}{cfg.events.source.delimiter}{items}\n")
    d["events"]["files"] = events
    path = os.path.join(tmp, f"logs_x{scale}.json")
    with open(path, "w") as f:
        json.dump(d, f)
    return path


def main(argv):
    beam_args = argv[1:]
    tmp = tempfile.mkdtemp(prefix="bench_build_examples_")
    runs = []
    try:
        for s in [int(x) for x in _SCALES.value]:
            config = _CONFIG.value if s == 1 else scaled_config(_CONFIG.value, s, tmp)
            out = os.path.join(_OUTPUT_BASE.value or tmp, f"out_x{s}")
            common.log(f"scale {s}: building")
            t0 = os.times()
            proc, wall, peak = common.run_measured(
                [sys.executable, "-m", "pipelines.build_examples", f"--config={config}", f"--output_dir={out}",
                 *beam_args], cwd=common.REPO, env={**os.environ, "PYTHONPATH": common.REPO})
            t1 = os.times()
            cpu = (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)
            if proc.returncode != 0:
                raise SystemExit(f"bench_build_examples: scale {s} failed: {proc.stderr.strip()[-500:]}")
            with open(os.path.join(out, "stats.json")) as f:
                stats = json.load(f)
            runs.append({"scale": s, "events": stats["events_in"], "users": stats["users_out"],
                         "rows": {k: v["rows"] for k, v in stats["splits"].items()},
                         "seconds": round(wall, 1), "cpu_s": round(cpu, 1),
                         "events_per_s": round(stats["events_in"] / wall), "peak_rss_mb": peak})
            common.log(f"scale {s}: {wall:.1f} s, {cpu:.1f} CPU s, peak {peak} MiB")
            if not _OUTPUT_BASE.value:
                shutil.rmtree(out, ignore_errors=True)
        common.emit({"bench": "build_examples", "config": _CONFIG.value, "beam_args": beam_args, "runs": runs})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _parse(argv):
    return flags.FLAGS(argv, known_only=True)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
