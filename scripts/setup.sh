#!/usr/bin/env bash
# Installs iso-megatron and everything its tests need. Idempotent; safe to re-run.
#
#   bash scripts/setup.sh          this Python (python3, or $PYTHON): megatron-core 0.16.1
#   bash scripts/setup.sh 0.19     a second environment, .venv-mcore-0.19/, with megatron-core 0.19.2
#
# On a machine without an NVIDIA GPU it takes PyTorch's CPU build (torch 2.13.0) and never
# installs transformer-engine (it breaks `import megatron.core` without CUDA).
# megatron-core 0.17+ declares Python >= 3.12, but 0.19.2 ships a cp311 wheel that runs here: it is
# installed with --no-deps --ignore-requires-python after the dependencies it needs (numpy,
# packaging, psutil) and triton, which 0.19 imports at `import megatron.core` (MoE paged_stash,
# reached from pipeline_parallel/schedules.py) without declaring it; a CPU torch build lacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-0.16}
case "$VERSION" in
  0.16|0.16.1) MCORE=0.16.1 ;;
  0.19|0.19.2) MCORE=0.19.2 ;;
  *) echo "error: scripts/setup.sh: supported megatron-core versions: 0.16 (0.16.1), 0.19 (0.19.2); got '$VERSION'" >&2; exit 2 ;;
esac

if [ "$MCORE" = "0.16.1" ]; then
  PY=${PYTHON:-python3}
else
  VENV=.venv-mcore-0.19
  [ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
  PY=$VENV/bin/python
fi

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if ! "$PY" -c "import torch" 2>/dev/null; then
  if have_gpu; then "$PY" -m pip install -q torch; else "$PY" -m pip install -q "torch==2.13.0"; fi
fi
if [ "$MCORE" = "0.19.2" ]; then
  "$PY" -m pip install -q numpy packaging psutil triton
  if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('megatron-core') != '0.19.2')" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --ignore-requires-python "megatron-core==0.19.2"
  fi
fi
# DeepSpeed: build no CUDA ops at install time (they are JIT-built where used).
DS_BUILD_OPS=0 "$PY" -m pip install -q -e ".[test]"
"$PY" -c "import importlib.metadata as m, sys; v = m.version('megatron-core'); sys.exit(0 if v == '$MCORE' else f'error: megatron-core {v} installed, expected $MCORE')"
if "$PY" -c "import transformer_engine" 2>/dev/null && ! "$PY" -c "import torch,sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: transformer-engine is installed on a machine without CUDA; it breaks megatron.core. pip uninstall transformer-engine" >&2
  exit 1
fi
