#!/usr/bin/env bash
# The README's test command: the whole suite against megatron-core 0.16.1 (this Python) and
# 0.19.2 (.venv-mcore-0.19), each set up by scripts/setup.sh and given its own time budget.
# Extra arguments go to pytest (e.g. -m "not multiprocess").
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${ISO_TEST_BUDGET_S:-1200}  # per environment; the two together stay under 30 minutes with set-up

run() {  # run VERSION PYTHON
  echo "=== megatron-core $1: python -m pytest (budget ${BUDGET_S}s)"
  timeout --kill-after=30 "$BUDGET_S" "$2" -m pytest -q "${@:3}"
}

bash scripts/setup.sh 0.16 || exit 1
run 0.16.1 "${PYTHON:-python3}" "$@"; rc16=$?
echo "=== megatron-core 0.16.1 suite exited with $rc16"
bash scripts/setup.sh 0.19 || exit 1
# DeepSpeed JIT-builds its CPU shared-memory all-reduce against each environment's torch: one
# build directory per environment, so the two never rebuild (or lock) each other's
export TORCH_EXTENSIONS_DIR=$PWD/.venv-mcore-0.19/torch_extensions
run 0.19.2 .venv-mcore-0.19/bin/python "$@"; rc19=$?
[ "$rc16" -eq 0 ] || echo "=== megatron-core 0.16.1 suite FAILED (exit $rc16), see above"
exit $(( rc16 != 0 || rc19 != 0 ))
