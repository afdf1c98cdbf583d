#!/usr/bin/env bash
# MovieLens-100k (GroupLens, F. Maxwell Harper and Joseph A. Konstan, "The MovieLens Datasets: History
# and Context", ACM TiiS 5(4), 2015), as RecBole 1.2.1 ships it in its wheel
# (recbole/dataset_example/ml-100k: ml-100k.inter, .item, .user). Extracts the three files into
# runs/ml-100k for configs/logs/movielens100k.json. recbole itself is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
$PY -m pip download -q recbole==1.2.1 --no-deps -d "$TMP"
mkdir -p runs/ml-100k
$PY - "$TMP" <<'PYEOF'
import glob, os, sys, zipfile
whl = glob.glob(os.path.join(sys.argv[1], "recbole-1.2.1-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    for ext in ("inter", "item", "user"):
        with z.open(f"recbole/dataset_example/ml-100k/ml-100k.{ext}") as src, \
                open(f"runs/ml-100k/ml-100k.{ext}", "wb") as dst:
            dst.write(src.read())
print("runs/ml-100k: ml-100k.inter, ml-100k.item, ml-100k.user")
PYEOF
