r"""AUC, logloss and calibration of exported versions on the labelled splits of a preprocessed data directory.

    python scripts/evaluate_exports.py --data=runs/microlens50k/data --splits=valid,test \
        DIN=runs/ensemble/din/1 "QIN, tuned=runs/ensemble/qin_tuned/1" ensemble=runs/ensemble/blend/1

Each argument is ``NAME=VERSION_DIR`` (or an export base: its newest version). Every row of each split
is scored through the version's ``predict_examples`` signature, as the gate (``export.validate``) and
batch scoring read them; the metrics are the gate's (exact AUC, log loss, mean prediction / positive
rate). Prints one JSON object per version and split, then a Markdown table; ``--out`` also writes the
JSON lines to a file (refused if it exists).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Metrics of exported versions on a data directory's splits.")
    parser.add_argument("versions", nargs="+", metavar="NAME=VERSION_DIR")
    parser.add_argument("--data", required=True, help="A preprocessed data directory (feature_spec.json).")
    parser.add_argument("--splits", default="valid,test", help="Comma-separated labelled splits.")
    parser.add_argument("--out", help="Also write the JSON lines here (a new file).")
    args = parser.parse_args(argv)
    if args.out and os.path.exists(args.out):
        parser.error(f"--out: {args.out} exists; choose a new file")

    from qin_tf.runtime import import_tensorflow

    import_tensorflow()
    from export.exporter import ExportError
    from export.validate import data_files, resolve_version, score_version, version_metrics
    from qin_tf.rows import PreprocessError
    from qin_tf.spec import SpecError

    named = []
    for item in args.versions:
        name, sep, path = item.rpartition("=")
        if not sep or not name:
            parser.error(f"{item!r} is not NAME=VERSION_DIR")
        named.append((name, path))
    records = []
    try:
        for name, path in named:
            version_dir = resolve_version(path, name)
            for split in [s.strip() for s in args.splits.split(",") if s.strip()]:
                files, kind, _ = data_files(args.data, split)
                labels, scores = score_version(version_dir, files, kind)
                m = version_metrics(labels, scores)
                records.append({"name": name, "version_dir": version_dir, "split": split, "rows": int(len(labels)),
                                "auc": m["auc"], "logloss": m["logloss"], "calibration": m["calibration"]})
                print(json.dumps(records[-1]), flush=True)
    except (ExportError, PreprocessError, SpecError, OSError) as e:
        print(f"evaluate_exports: error: {e}", file=sys.stderr)
        return 1
    splits = list(dict.fromkeys(r["split"] for r in records))
    print("\n| export | " + " | ".join(f"{s} AUC | {s} logloss" for s in splits) + " |")
    print("| --- |" + " --- | --- |" * len(splits))
    for name, _ in named:
        cells = []
        for s in splits:
            r = next(r for r in records if r["name"] == name and r["split"] == s)
            cells += [f"{r['auc']:.4f}", f"{r['logloss']:.4f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "x") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
