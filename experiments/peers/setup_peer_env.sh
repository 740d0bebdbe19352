#!/usr/bin/env bash
# Creates .venv-peer: Python 3.11 with the CPU torch wheel on this machine's disk and
# transformers, for the PyTorch peers (golden files, benchmark peers). Not needed by CI.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PEER_PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY="env PYENV_VERSION=3.11.7 python"
$PY -m venv .venv-peer
.venv-peer/bin/pip install -q --upgrade pip
.venv-peer/bin/pip install -q torch==2.13.0 transformers==5.24.0 numpy gguf==0.19.0 \
  accelerate==1.15.0 sentencepiece==0.2.3 protobuf
.venv-peer/bin/python -c "import torch, transformers; print('peer env:', torch.__version__, transformers.__version__)"
