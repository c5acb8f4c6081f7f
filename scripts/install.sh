#!/usr/bin/env bash
# Create the virtual environment and install hnmix into it (editable, with the dev and cluster extras).
# torch is pinned to the builds this kind of machine serves from local disk; set TORCH_SPEC to override
# (e.g. TORCH_SPEC="torch torchvision" for whatever PyPI serves, or a CUDA build of your choice).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ -z "${TORCH_SPEC:-}" ]; then
  case "$(uname -m)" in
    x86_64) TORCH_SPEC="torch==2.14.1 torchvision==0.29.1" ;;
    aarch64|arm64) TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" ;;
    *) TORCH_SPEC="torch torchvision" ;;
  esac
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086  # the spec is a list of requirements
"$VENV/bin/python" -m pip install --quiet $TORCH_SPEC
"$VENV/bin/python" -m pip install --quiet -e ".[dev,cluster]"
"$VENV/bin/python" -c "import torch, torchvision, timm; print('installed: torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__)"
echo "hnmix is in $VENV/bin: run 'source $VENV/bin/activate' to have it on your PATH"
