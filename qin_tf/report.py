"""``curves.png``: per-epoch training curves and the calibration of the best model.

Matplotlib with the non-interactive Agg backend (no display needed). Four panels:

1. loss: the training and validation log loss per epoch on the left axis;
   the training loss with L2 (what the optimiser minimises, often far
   larger) on its own right axis, so that it does not flatten the others;
2. AUC: the exact validation AUC and gAUC, and the training AUC (Keras'
   running approximation, for orientation), per epoch; the best epoch marked;
3. the learning rate per epoch (log scale), showing the halvings;
4. calibration (reliability diagram) of the best model on each evaluated
   split: mean predicted probability against the observed positive rate in
   ten equal-width bins; the diagonal is perfect calibration.

Example::

    plot_curves(history, {"valid": calibration_bins(y, p)}, "runs/sample/model/curves.png",
                best_epoch=3)
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

from qin_tf.fileio import write_bytes


def plot_curves(history: Sequence[Mapping], calibration: Mapping[str, Mapping], path: str, *,
                best_epoch: int | None = None, title: str | None = None) -> str:
    """Draws the curves and writes a PNG to ``path`` (atomically).

    Args:
        history: one mapping per epoch with ``epoch`` (1-based) and any of
            ``loss``, ``logloss``, ``auc``, ``val_auc``, ``val_logloss``, ``val_gauc``, ``lr``.
        calibration: split name -> :func:`qin_tf.metrics.calibration_bins` output.
        path: the ``.png`` to write (any TensorFlow filesystem, see :mod:`qin_tf.fileio`).
        best_epoch: 1-based epoch to mark.
        title: figure title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    epochs = [r["epoch"] for r in history]

    def series(key):
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        return ([e for e, _ in pts], [v for _, v in pts])

    def draw(ax, keys_labels, ylabel, log=False):
        for key, label in keys_labels:
            xs, ys = series(key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle=":", linewidth=1, label=f"best epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    draw(axes[0, 0], [("logloss", "train logloss"), ("val_logloss", "valid logloss")], "logloss")
    xs, ys = series("loss")
    if xs:
        with_l2 = axes[0, 0].twinx()
        with_l2.plot(xs, ys, color="grey", linestyle="--", marker="o", markersize=3, label="train loss (BCE + L2)")
        with_l2.set_ylabel("train loss with L2")
        with_l2.legend(fontsize=8, loc="lower left")
    draw(axes[0, 1], [("val_auc", "valid AUC (exact)"), ("val_gauc", "valid gAUC"),
                      ("auc", "train AUC (running, approx.)")], "AUC")
    draw(axes[1, 0], [("lr", "learning rate")], "learning rate", log=True)

    ax = axes[1, 1]
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    for split, bins in calibration.items():
        if bins and bins.get("mean_prediction"):
            ax.plot(bins["mean_prediction"], bins["positive_rate"], marker="o", markersize=4, label=split)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed positive rate")
    ax.set_title("calibration of the best model", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path
