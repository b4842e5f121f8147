#!/usr/bin/env bash
# The few wheels the offline GPU check machine lacks, downloaded here for its Python into .whl/
# (git-ignored; carried with the working tree, a few MiB). scripts/gpu_check.sh installs them there.
#
#   bash scripts/gpu_wheels.sh            # PY_VERSION (default 3.12) and PLATFORM select the wheels
#
# That machine has torch, transformers, accelerate, safetensors, peft, triton, click, rich, httpx and
# huggingface_hub, but not pydantic (the patch manifest, configs) or its dependencies, nor blake3 (patch
# digests). The versions are the ones this project's environment runs (.venv), so both test the same
# code; typing-extensions comes too: pydantic needs a newer one than some torch installs bring.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
PLATFORM=${PLATFORM:-manylinux_2_17_x86_64}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
version() {  # version DIST: what the project's environment has, else empty (the newest is taken)
    "$PYTHON" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}
rm -rf .whl
mkdir -p .whl
for dist in pydantic pydantic-core annotated-types typing-inspection typing-extensions blake3; do
    v=$(version "$dist")
    spec=$dist${v:+==$v}
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp --platform "$PLATFORM" -d .whl "$spec"
done
ls -l .whl
du -sh .whl
