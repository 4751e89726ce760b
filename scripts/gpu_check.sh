#!/usr/bin/env bash
# The prepared GPU check (issue 10 part 4), offline, from the repo root:
#
#   bash scripts/gpu_check.sh --wheels .whl --out OUT     # GPU machine: installs OUT's wheels first
#   bash scripts/gpu_check.sh --dry-run --out OUT         # CPU: every check's logic, never a pass
#
# --wheels DIR: every *.whl in DIR is installed (no index, no dependencies) into a fresh folder
# put first on PYTHONPATH, so the image's Python keeps its own torch; the project runs from this
# checkout (PYTHONPATH=.). Everything else goes to scripts/gpu_check.py (see its --help): it
# writes OUT/gpu_check.json and the logs, and its exit status is this script's
# (0 passed, 1 failed, 2 bad arguments, 3 dry run). PYTHON picks the interpreter (default python3);
# GPU_CHECK_TIMEOUT_S is the hard wall-clock limit (default 245 s).
set -uo pipefail
PYTHON=${PYTHON:-python3}
WHEELS="" OUT="" ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --wheels=*) WHEELS=${1#--wheels=}; shift ;;
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --out=*) OUT=${1#--out=}; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu_check.sh: --out DIR is required" >&2; exit 2; }
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)  # the caller's paths, before moving to the repo root
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { echo "gpu_check.sh: --wheels $WHEELS: no such folder" >&2; exit 2; }
  WHEELS=$(cd "$WHEELS" && pwd)
fi
cd "$(dirname "$0")/.."
ARGS+=(--out "$OUT")

if [ -n "$WHEELS" ]; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  [ ${#wheels[@]} -gt 0 ] || { echo "gpu_check.sh: no *.whl in $WHEELS" >&2; exit 2; }
  SITE=$(mktemp -d "${TMPDIR:-/tmp}/iso_gpu_check_site.XXXXXX")
  echo "[gpu_check.sh] installing ${#wheels[@]} wheel(s) from $WHEELS into $SITE"
  if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      "${wheels[@]}" > "$OUT/wheels_install.log" 2>&1; then
    # a wheel whose tags pip refuses for this Python: its files unpacked as they are (megatron-core
    # is pure Python apart from a dataset helper that inference never imports)
    echo "[gpu_check.sh] pip refused (see $OUT/wheels_install.log); unpacking the wheels instead"
    "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$SITE" "${wheels[@]}" || exit 1
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export ISO_GPU_CHECK_WHEELS="${wheels[*]##*/}" ISO_GPU_CHECK_SITE="$SITE"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

timeout --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-245}" "$PYTHON" scripts/gpu_check.py "${ARGS[@]}"
rc=$?
[ -n "$WHEELS" ] && rm -rf "$SITE"
[ $rc -eq 124 ] || [ $rc -eq 137 ] && echo "[gpu_check.sh] killed at the ${GPU_CHECK_TIMEOUT_S:-245} s limit; $OUT/gpu_check.json has what had finished" >&2
exit $rc
