"""Test AUC against training rows: the table and plot of the data-scaling study (RESULTS.md).

    python scripts/scaling_table.py --runs=qin:DIR,qin:DIR,din:DIR,... --plot=results/scaling/test_auc.png

Each ``LABEL:DIR`` is a training run's model dir (its ``metrics.json`` and
``feature_spec.json``, as ``qin_tf.train`` leaves them); runs with the same
label form one line. A run's point is its train split's row count and the
test AUC at its best epoch, selected on valid AUC (``metrics.json``'s
``splits``; a run still in progress counts by its best epoch so far, from
``history``, and is marked). Prints a Markdown table (one row per run, with
each label's gap to the ``--reference`` label at the same row count) and
writes the plot; ``--dashed`` labels are drawn dashed (runs cut short of
their recipe, e.g. after one epoch).

Exit status 1 with a one-line error naming the file for a run dir without a
readable ``metrics.json``/``feature_spec.json``.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

_RUNS = flags.DEFINE_list("runs", None, "LABEL:DIR of every run, e.g. qin:/runs/qin_0.25.", required=True)
_PLOT = flags.DEFINE_string("plot", None, "Where the PNG goes (none: no plot).")
_REFERENCE = flags.DEFINE_string("reference", "din", "The label the others' gaps are measured against.")
_DASHED = flags.DEFINE_list("dashed", [], "Labels drawn dashed: runs cut short of their recipe (say so in "
                            "the label).")


def read_run(model_dir: str) -> dict:
    """``{"train_rows", "best_epoch", "epochs", "valid_auc", "test_auc", "finished"}`` of a run."""
    spec_path = os.path.join(model_dir, "feature_spec.json")
    metrics_path = os.path.join(model_dir, "metrics.json")
    try:
        with open(spec_path) as f:
            rows = json.load(f)["splits"]["train"]["num_rows"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{spec_path}: cannot read the train split's row count ({e}).") from None
    try:
        with open(metrics_path) as f:
            metrics = json.load(f)
        history = metrics["history"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{metrics_path}: cannot read the run's metrics ({e}).") from None
    if "splits" in metrics and "test" in metrics["splits"]:
        return {"train_rows": rows, "best_epoch": metrics["best_epoch"], "epochs": len(history),
                "valid_auc": metrics["splits"]["valid"]["auc"], "test_auc": metrics["splits"]["test"]["auc"],
                "finished": True}
    best = max(history, key=lambda h: h["val_auc"])
    return {"train_rows": rows, "best_epoch": best["epoch"], "epochs": len(history), "valid_auc": best["val_auc"],
            "test_auc": best["test_auc"], "finished": False}


def table(points: dict[str, list[dict]], reference: str) -> str:
    ref = {p["train_rows"]: p["test_auc"] for p in points.get(reference, [])}
    lines = [f"| model | train rows | best epoch / epochs | valid AUC | test AUC | test AUC - {reference} |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, runs in points.items():
        for p in sorted(runs, key=lambda p: p["train_rows"]):
            gap = f"{p['test_auc'] - ref[p['train_rows']]:+.4f}" if p["train_rows"] in ref and label != reference \
                else "–"
            mark = "" if p["finished"] else " (running)"
            lines.append(f"| {label} | {p['train_rows']:,} | {p['best_epoch']} / {p['epochs']}{mark} | "
                         f"{p['valid_auc']:.4f} | {p['test_auc']:.4f} | {gap} |")
    return "\n".join(lines)


def plot(points: dict[str, list[dict]], path: str, dashed: set[str] = frozenset()) -> list[tuple[str, str]]:
    """Writes the PNG; returns each drawn line's ``(label, linestyle)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = []
    for label, runs in points.items():
        runs = sorted(runs, key=lambda p: p["train_rows"])
        style = "--" if label in dashed else "-"
        ax.plot([p["train_rows"] for p in runs], [p["test_auc"] for p in runs], marker="o", label=label,
                linestyle=style)
        drawn.append((label, style))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training rows (MicroLens-50k, a fraction of the users)")
    ax.set_ylabel("test AUC at the best valid epoch")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def main(argv):
    del argv
    points: dict[str, list[dict]] = {}
    try:
        for item in _RUNS.value:
            label, sep, model_dir = item.partition(":")
            if not sep or not label or not model_dir:
                raise ValueError(f"--runs: `{item}` is not LABEL:DIR.")
            points.setdefault(label, []).append(read_run(model_dir))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(points, _REFERENCE.value))
    if _PLOT.value:
        plot(points, _PLOT.value, set(_DASHED.value))
    return 0


if __name__ == "__main__":
    app.run(main)
