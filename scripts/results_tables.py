r"""Writes RESULTS.md's tables (Markdown) from training runs' ``metrics.json`` and ``config.json``.

    python scripts/results_tables.py results/microlens50k_qin results/microlens50k_din \
        "QIN, tuned=results/microlens50k_qin_tuned" > /tmp/tables.md

Each argument is a run directory (what ``python -m qin_tf.train`` leaves in
``--model_dir``), or ``LABEL=DIRECTORY`` to name its rows; the default label
is the directory's name. The first run is the reference: a run's ``flags``
are the settings in which its ``config.json`` differs from the first run's
(paths and logging left out), written as training flags. Three tables, in
the order of the arguments:

1. Results at the best epoch: best epoch / epochs run, then AUC, logloss and
   gAUC of every evaluated split (valid first), and the training wall time.
2. Epoch by epoch: one row per epoch, the ``--epoch_metrics`` (default AUC)
   of every split each run evaluated every epoch (``--monitor_splits``), the
   best epoch in bold.
3. Per run: valid and test AUC epoch by epoch on one line, the best epoch in
   bold, ``(cap)`` when the run used all its epochs without stopping early;
   the best epoch's valid / test AUC and training AUC.

With ``--spread``, one table instead: runs that differ in their seed only,
grouped, with the mean, sample standard deviation and range of the best
epoch's valid and test AUC and test logloss (RESULTS.md's seed spreads).

Rows for numbers measured elsewhere (the original implementation,
``views_level`` alone) are not in any run directory: add them by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qin_tf.config import ExperimentConfig  # noqa: E402

#: config.json settings that do not change what a run computes: paths, logging, extra evaluation.
#: (Not qin_tf.config.RESUMABLE_CHANGES: a resume may change --epochs, which changes the run.)
NOT_SETTINGS = {"export_base", "overwrite", "log_every_steps", "log_every_seconds", "data_dir", "model_dir",
                "monitor_splits", "eval_batch_size"}
METRIC_NAMES = {"auc": "AUC", "logloss": "logloss", "gauc": "gAUC"}
MISSING = "–"


@dataclasses.dataclass
class Run:
    label: str
    path: str
    metrics: dict
    config: dict

    @property
    def valid_split(self) -> str:
        return self.config.get("train", {}).get("valid_split", "valid")

    def history_key(self, split: str, metric: str) -> str:
        """The per-epoch history's key of ``metric`` on ``split`` (``val_auc``, ``test_auc``)."""
        return f"val_{metric}" if split == self.valid_split else f"{split}_{metric}"

    def history_splits(self) -> list[str]:
        """The splits evaluated every epoch: the valid split, then the monitored ones."""
        monitored = self.config.get("train", {}).get("monitor_splits", [])
        return [self.valid_split] + [s for s in monitored if s != self.valid_split]


def load_run(arg: str) -> Run:
    label, _, path = arg.rpartition("=")
    path = path.rstrip("/")
    label = label or os.path.basename(path)
    files = {}
    for name in ("metrics.json", "config.json"):
        p = os.path.join(path, name)
        try:
            with open(p) as f:
                files[name] = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"results_tables: error: {p}: {e}") from None
    return Run(label, path, files["metrics.json"], files["config.json"])


def _num(value, digits: int = 4) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _flag(name: str, value) -> str:
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if value is None:
        return f"--{name}=none"
    if isinstance(value, (list, tuple)):
        return f"--{name}=" + ",".join(str(v) for v in value)
    return f"--{name}={value:g}" if isinstance(value, float) else f"--{name}={value}"


def flags_against(run: Run, reference: Run) -> str:
    """The settings in which ``run`` differs from ``reference``, as flags (defaults fill missing keys)."""
    defaults = ExperimentConfig().to_dict()
    out = []
    for section in ("model", "train"):
        base = {**defaults.get(section, {}), **reference.config.get(section, {})}
        mine = {**defaults.get(section, {}), **run.config.get(section, {})}
        for name in sorted(set(base) | set(mine)):
            if name not in NOT_SETTINGS and base.get(name) != mine.get(name):
                out.append(_flag(name, mine.get(name)))
    return f"`{' '.join(out)}`" if out else MISSING


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def best_epoch_table(runs: list[Run]) -> str:
    splits = []
    for run in runs:
        for s in [run.valid_split] + sorted(run.metrics.get("splits", {})):
            if s not in splits:
                splits.append(s)
    header = ["run", "flags", "best epoch / run"]
    header += [f"{s} {METRIC_NAMES[m]}" for s in splits for m in ("auc", "logloss", "gauc")]
    header.append("train wall time")
    rows = []
    for run in runs:
        m = run.metrics
        row = [run.label, flags_against(run, runs[0]), f"{m.get('best_epoch', MISSING)} / {m.get('epochs_run', MISSING)}"]
        row += [_num(m.get("splits", {}).get(s, {}).get(k)) for s in splits for k in ("auc", "logloss", "gauc")]
        seconds = m.get("train_seconds")
        row.append(MISSING if seconds is None else f"{seconds / 60:.1f} min ({m.get('epochs_run')} epochs)")
        rows.append(row)
    return _table(header, rows)


def epoch_table(runs: list[Run], metrics: tuple[str, ...] = ("auc",)) -> str:
    columns = [(run, s, k) for run in runs for s in run.history_splits() for k in metrics]
    header = ["epoch"] + [f"{run.label} {s} {METRIC_NAMES[k]}" for run, s, k in columns]
    epochs = max((len(run.metrics.get("history", [])) for run in runs), default=0)
    rows = []
    for epoch in range(1, epochs + 1):
        row = [str(epoch)]
        for run, s, k in columns:
            record = next((r for r in run.metrics.get("history", []) if r.get("epoch") == epoch), {})
            cell = _num(record.get(run.history_key(s, k)))
            row.append(f"**{cell}**" if epoch == run.metrics.get("best_epoch") and cell != MISSING else cell)
        rows.append(row)
    return _table(header, rows)


def _by_epoch(run: Run, key: str) -> str:
    history = run.metrics.get("history", [])
    values = [_num(r.get(key)) for r in history]
    best = run.metrics.get("best_epoch")
    values = [f"**{v}**" if r.get("epoch") == best else v for r, v in zip(history, values)]
    epochs_cap = run.config.get("train", {}).get("epochs")
    capped = not run.metrics.get("stopped_early") and len(history) == epochs_cap
    return " / ".join(values) + (" (cap)" if capped else "")


def per_run_table(runs: list[Run], other: str = "test") -> str:
    header = ["run", "flags", "valid AUC, epoch by epoch", f"{other} AUC, epoch by epoch",
              f"best epoch: valid / {other} AUC", "train AUC at best"]
    rows = []
    for run in runs:
        best = run.metrics.get("best_epoch")
        record = next((r for r in run.metrics.get("history", []) if r.get("epoch") == best), {})
        splits = run.metrics.get("splits", {})
        valid, test = splits.get(run.valid_split, {}).get("auc"), splits.get(other, {}).get("auc")
        rows.append([run.label, flags_against(run, runs[0]), _by_epoch(run, run.history_key(run.valid_split, "auc")),
                     _by_epoch(run, run.history_key(other, "auc")) if other in run.history_splits() else MISSING,
                     f"{best}: {_num(valid)} / {_num(test)}" if best else MISSING, _num(record.get("auc"), 3)])
    return _table(header, rows)


def _mean_sd(values: list[float], digits: int = 4) -> str:
    """``mean ± sd [min, max]`` (sample standard deviation); one value alone; ``–`` for none."""
    values = [v for v in values if v is not None]
    if not values:
        return MISSING
    if len(values) == 1:
        return _num(values[0], digits)
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.{digits}f} ± {sd:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def spread_table(runs: list[Run], other: str = "test") -> str:
    """One row per group of runs that differ in their seed only (in the order of first appearance): the
    seeds, best epochs, and mean ± sample standard deviation [min, max] of the best epoch's valid AUC,
    ``other``'s AUC and logloss, and the mean training time. A group is named by its first run's label
    without a trailing seed (``_s1``, ``-seed7``)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        flags = flags_against(run, runs[0])
        key = " ".join(f for f in ("" if flags == MISSING else flags.strip("`")).split() if not f.startswith("--seed="))
        groups.setdefault(key, []).append(run)
    header = ["runs", "flags", "n", "seeds", "best epochs", "valid AUC", f"{other} AUC", f"{other} logloss",
              "train time (mean)"]
    rows = []
    for key, members in groups.items():
        splits = [m.metrics.get("splits", {}) for m in members]
        seconds = [m.metrics.get("train_seconds") for m in members if m.metrics.get("train_seconds") is not None]
        rows.append([re.sub(r"[_-]s(eed)?\d+$", "", members[0].label), f"`{key}`" if key else MISSING,
                     str(len(members)), ", ".join(str(m.config.get("train", {}).get("seed", MISSING)) for m in members),
                     ", ".join(str(m.metrics.get("best_epoch", MISSING)) for m in members),
                     _mean_sd([s.get(r.valid_split, {}).get("auc") for s, r in zip(splits, members)]),
                     _mean_sd([s.get(other, {}).get("auc") for s in splits]),
                     _mean_sd([s.get(other, {}).get("logloss") for s in splits]),
                     f"{sum(seconds) / len(seconds) / 60:.1f} min" if seconds else MISSING])
    return _table(header, rows)


def tables(runs: list[Run], epoch_metrics: tuple[str, ...] = ("auc",)) -> str:
    return "\n".join([
        "## Results at the best epoch (selected on valid AUC)\n", best_epoch_table(runs),
        "## Epoch by epoch\n", epoch_table(runs, epoch_metrics),
        "## Each run epoch by epoch\n", per_run_table(runs),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Writes RESULTS.md's tables from training runs' metrics.json "
                                                 "and config.json.")
    parser.add_argument("runs", nargs="+", metavar="[LABEL=]RUN_DIR", help="A training run's --model_dir.")
    parser.add_argument("--epoch_metrics", default="auc",
                        help="Comma-separated metrics of the epoch-by-epoch table: auc, logloss, gauc.")
    parser.add_argument("--spread", action="store_true",
                        help="Print only the seed-spread table: runs that differ in --seed only, grouped.")
    args = parser.parse_args(argv)
    metrics = tuple(m.strip() for m in args.epoch_metrics.split(",") if m.strip())
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        parser.error(f"--epoch_metrics: unknown {unknown}; choose from {sorted(METRIC_NAMES)}")
    runs = [load_run(a) for a in args.runs]
    sys.stdout.write(spread_table(runs) if args.spread else tables(runs, metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
