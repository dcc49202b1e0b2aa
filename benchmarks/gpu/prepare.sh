#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (benchmarks/gpu/wheels.txt) for its Python, build
# the few that exist only as source (sdists.txt; pure Python, so one build serves any Python), check
# that they and the machine's own packages (preinstalled.txt) meet every requirement
# (depcheck.py), and print their total size (at most 60 MB: the device tool carries 64 MiB,
# working tree included).
#
#   benchmarks/gpu/prepare.sh [DEST]        # default DEST: benchmarks/gpu/wheels (git-ignored)
#   PYTHON=/path/to/python GPU_PYTHON=3.12.3 benchmarks/gpu/prepare.sh
#
# Needs a package registry (pip download) and, for the check, `packaging` in $PYTHON.
set -euo pipefail

KIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="${1:-$KIT/wheels}"
PY="${PYTHON:-python3}"
GPU_PYTHON="${GPU_PYTHON:-3.12.3}"   # python3 on the nvidia-h200 machines (device notes, 2026-11)
LIMIT_MB="${LIMIT_MB:-60}"
PY_MM="${GPU_PYTHON%.*}"             # 3.12

mkdir -p "$DEST"
rm -f "$DEST"/*.whl                  # a stale second version of a package stops the whole install
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
echo "prepare: downloading $(grep -cvE '^[[:space:]]*(#|$)' "$KIT/wheels.txt") wheels for CPython $PY_MM x86-64 into $DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_MM" --implementation cp \
    "${platforms[@]}" -d "$DEST" -r "$KIT/wheels.txt"
echo "prepare: building $(grep -cvE '^[[:space:]]*(#|$)' "$KIT/sdists.txt") pure-Python wheel(s) from source"
"$PY" -m pip wheel --quiet --no-deps -w "$DEST" -r "$KIT/sdists.txt"

"$PY" "$KIT/depcheck.py" "$DEST" --preinstalled "$KIT/preinstalled.txt" --python "$GPU_PYTHON"

"$PY" - "$DEST" "$LIMIT_MB" <<'PYEOF'
import sys
from pathlib import Path

dest, limit_mb = Path(sys.argv[1]), float(sys.argv[2])
files = sorted(dest.glob("*.whl"), key=lambda f: -f.stat().st_size)
total = sum(f.stat().st_size for f in files)
for f in files[:5]:
    print(f"prepare: {f.stat().st_size / 1e6:7.2f} MB  {f.name}")
print(f"prepare: total {total / 1e6:.1f} MB in {len(files)} wheels (limit {limit_mb:g} MB)")
sys.exit(1 if total > limit_mb * 1e6 else 0)
PYEOF
