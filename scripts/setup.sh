#!/usr/bin/env bash
# Installs iso-megatron and everything its tests need. Idempotent; safe to re-run.
# On a machine without an NVIDIA GPU it takes PyTorch's CPU build (torch 2.13.0) and never
# installs transformer-engine (it breaks `import megatron.core` without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q "torch==2.13.0"
  fi
fi
# DeepSpeed: build no CUDA ops at install time (they are JIT-built where used).
DS_BUILD_OPS=0 "$PY" -m pip install -q -e ".[test]"
if "$PY" -c "import transformer_engine" 2>/dev/null && ! "$PY" -c "import torch,sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: transformer-engine is installed on a machine without CUDA; it breaks megatron.core. pip uninstall transformer-engine" >&2
  exit 1
fi
