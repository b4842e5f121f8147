#!/usr/bin/env bash
# GPU check, one command, for a bare offline machine with one NVIDIA GPU (no vLLM, no network):
#
#   bash scripts/gpu_check.sh              # on the GPU machine, from any directory
#   bash scripts/gpu_check.sh --dry-run    # the same steps on the CPU at tiny shapes (make test runs it)
#
# Needs python3 with torch (CUDA), transformers, accelerate, safetensors, click, rich, httpx and
# huggingface_hub. What it lacks (pydantic and its dependencies, blake3) comes as wheels from .whl/, which
# `bash scripts/gpu_wheels.sh` downloads beforehand on a machine with network; they are unpacked
# into a scratch folder, nothing is installed into the machine's Python. expertlib itself runs from
# this checkout through a generated package folder (registry/, server/, cli/ mapped under
# expertlib, as pyproject's package-dir does), with vLLM and the server modules blocked from import:
# nothing these steps run may need them. What runs and what it measures: scripts/gpu_check.py and
# docs/GPU.md ("What the GPU checks run"). Budget: ~3-4 minutes on an H200, 10 at most (CHECK_TIMEOUT).
#
# Everything it writes goes under $OUT (default: a new temporary folder): gpu_check.log (all output),
# gpu_check.md and gpu_check.json (the results table). Exit status: 0 all steps passed, 1 a step
# failed, 2 no GPU (without --dry-run) or a broken set-up, 124 the time limit.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DRY=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
: >"$LOG"
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ "$DRY" = 1 ] && [ -x "$ROOT/.venv/bin/python" ] && PYTHON="$ROOT/.venv/bin/python"
fi
CHECK_TIMEOUT=${CHECK_TIMEOUT:-540}
say() { echo "gpu_check: $*" | tee -a "$LOG"; }

if [ "$DRY" = 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$LOG"; then
    echo "gpu_check: no CUDA GPU here (torch in $PYTHON sees none); --dry-run is the CPU mode, 'make test' the CPU suite" |
        tee -a "$LOG" >&2
    exit 2
fi

SITE="$OUT/site"  # generated: wheels, the package mapping, the import blocker
rm -rf "$SITE"
mkdir -p "$SITE/expertlib"
for entry in "$ROOT"/expertlib/*; do
    ln -s "$entry" "$SITE/expertlib/$(basename "$entry")"
done
for sub in registry server cli; do
    ln -s "$ROOT/$sub" "$SITE/expertlib/$sub"
done
cat >"$SITE/sitecustomize.py" <<'PY'
"""gpu_check: make the modules the GPU machine lacks unimportable, so a dry run proves nothing needs them."""
import os
import sys

BLOCKED = ("vllm", "fastapi", "uvicorn", "starlette", "prometheus_client", "openai", "lm_eval", "matplotlib")


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in BLOCKED:
            log = os.environ.get("GPU_CHECK_BLOCKED_LOG")
            if log:  # what the code tried (and, if the step still passed, did without)
                with open(log, "a") as f:
                    f.write(top + "\n")
            raise ImportError(f"{name} is blocked by gpu_check (the GPU machine has no {top})")
        return None


sys.meta_path.insert(0, _Blocker())
PY

if [ "$DRY" = 0 ]; then
    if ! "$PYTHON" -c "import pydantic, blake3" 2>/dev/null; then
        shopt -s nullglob
        wheels=("$ROOT"/.whl/*.whl)
        if [ ${#wheels[@]} = 0 ]; then
            say "pydantic or blake3 is missing and .whl/ holds no wheels: run 'bash scripts/gpu_wheels.sh' where there is network"
            exit 2
        fi
        # wheels are zip files: unpacked onto the path they import as installed (no pip, no network)
        "$PYTHON" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
            "$SITE" "${wheels[@]}" 2>&1 | tee -a "$LOG"
        say "unpacked ${#wheels[@]} wheels from .whl/ into $SITE"
    fi
else
    say "dry run: the .whl/ wheels are for the GPU machine's Python and are not unpacked here"
fi

cd "$OUT"  # not the checkout: its expertlib/ folder (without cli/, server/, registry/) would shadow the mapping
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export XDG_CACHE_HOME="$OUT/cache" HF_HOME="$OUT/cache/huggingface" TRITON_CACHE_DIR="$OUT/cache/triton"
export EXPERTLIB_REGISTRY="$OUT/cache/registry" GPU_CHECK_BLOCKED_LOG="$SITE/blocked.txt"
if ! "$PYTHON" -c "
import expertlib, expertlib.cli.main, expertlib.patch, sys
assert expertlib.__file__.startswith(sys.argv[1]), expertlib.__file__
" "$SITE" >>"$LOG" 2>&1; then
    say "expertlib does not import from the generated package folder (see $LOG)"
    tail -5 "$LOG" >&2
    exit 2
fi

ARGS=(--out "$OUT")
[ "$DRY" = 1 ] && ARGS+=(--dry-run)
timeout "$CHECK_TIMEOUT" "$PYTHON" "$ROOT/scripts/gpu_check.py" "${ARGS[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}  # the check's status, not tee's
rm -rf "$SITE" "$OUT/cache"
if [ "$rc" = 124 ]; then
    say "stopped after CHECK_TIMEOUT=${CHECK_TIMEOUT}s (exit 124); partial output in $LOG"
fi
say "exit $rc; log, results: $OUT"
exit "$rc"
