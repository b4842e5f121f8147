#!/usr/bin/env bash
# GPU check: the CUDA paths end to end on one NVIDIA GPU, in under 8 minutes.
#
#   bash scripts/gpu_check.sh            # from the repository root
#
# 1. installs the CUDA engine (ENGINE=gpu) into its own virtual environment (VENV, default .venv-gpu)
# 2. starts a slot engine on CUDA and checks it runs vLLM's V1 model runner and the Triton MoE kernel
#    (the only ones expert slots work with, docs/GPU.md), then runs the vLLM engine tests on CUDA
#    (Triton fused MoE with expert slots, CUDA graphs with the remap table): tests/test_vllm_engine.py,
#    test_vllm_routing.py, test_vllm_compiled.py, test_gpu_paths.py
# 3. runs a short mixed-batch bench on CUDA (8 sets vs plain vLLM, compiled mode) and the real-shape
#    serving bench for Qwen3-30B-A3B's layer (16 sets vs plain vLLM, engine memory per set; 16, not
#    32, to stay within the budget: writing and loading the sets dominates)
# 4. trains a few ESFT steps on CUDA (bf16 base, fp32 master weights, memory plan printed)
# and prints one summary line per step. Exits non-zero when a step fails, and at once (exit 2,
# before installing anything) where there is no NVIDIA GPU.
# SKIP_INSTALL=1 reuses the environment as it is; STEP_TIMEOUT (seconds, default 300) bounds each step;
# LOG (default: a temporary file, named in the summary) receives every step's output.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi is missing or lists no device)." >&2
    echo "gpu_check: run it on a machine with a CUDA GPU and driver; the CPU suite is 'make test'." >&2
    exit 2
fi
GPU=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)
LOG=${LOG:-$(mktemp -t gpu_check.XXXXXX.log)}
: >"$LOG"
declare -a SUMMARY=()
FAILED=0
T0=$(date +%s)

step() {  # step NAME COMMAND...: run, time, record ok/FAIL; the output goes to $LOG
    local name=$1
    shift
    local t=$(date +%s)
    echo "== $name: $*" | tee -a "$LOG"
    if timeout "$STEP_TIMEOUT" "$@" >>"$LOG" 2>&1; then
        SUMMARY+=("ok    $name ($(($(date +%s) - t)) s)")
    else
        SUMMARY+=("FAIL  $name ($(($(date +%s) - t)) s, exit $?; see $LOG)")
        FAILED=1
    fi
}

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
    step "install ENGINE=gpu" make install ENGINE=gpu VENV="$VENV"
fi
PY="$VENV/bin/python"
step "torch sees CUDA" "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA'; print(torch.cuda.get_device_name(0))"
step "slot engine on CUDA: V1 model runner, Triton MoE kernel (docs/GPU.md)" "$PY" -c "
import tempfile, pathlib
from expertlib.engine import ExpertEngine
from expertlib.vllm_plugin.testing import make_vllm_tiny_base, random_expert_set
d = pathlib.Path(tempfile.mkdtemp())
m = make_vllm_tiny_base('qwen2_moe', d / 'base')
path = random_expert_set(m, 't', {0: [0, 1], 1: [2]}, scale=1.0).save(d / 't.safetensors')
e = ExpertEngine(d / 'base', slots=4, max_sets=2, dtype='float32', max_model_len=128, max_num_seqs=4,
                 gpu_memory_utilization=0.3)
def probe(w):
    ctx = w.model_runner.get_model().expertlib_slots
    k = next(iter(ctx.layers.values())).routed_experts.quant_method.moe_kernel.fused_experts
    return type(w.model_runner).__module__, type(k).__name__, str(ctx.remap.device)
runner, kernel, device = e.llm.collective_rpc(probe)[0]
print('model runner', runner, '| MoE kernel', kernel, '| remap on', device)
assert runner == 'vllm.v1.worker.gpu_model_runner' and kernel == 'TritonExperts' and device.startswith('cuda')
e.load(path)
e.shutdown()
"
step "vLLM engine tests (CUDA)" "$PY" -m pytest -q -x -m vllm \
    tests/test_vllm_engine.py tests/test_vllm_routing.py tests/test_vllm_compiled.py tests/test_gpu_paths.py
step "mixed-batch bench (CUDA, compiled)" "$PY" bench/mixed_batch.py --requests 64 --rounds 3 --compiled --no-write
step "mixed batch at real shapes, 16 sets (CUDA)" "$PY" bench/serve_scale.py --models qwen3-30b-a3b \
    --sets 16 --requests 64 --tokens 32 --max-num-seqs 64 --rounds 2 --no-write

WORK=$(mktemp -d)
step "tiny base for training" "$PY" -c "
import json, sys
from expertlib.testing import make_tiny_model
make_tiny_model('qwen2_moe', '$WORK/base')
rows = [{'prompt': f'say {w}', 'completion': w * 2} for w in 'abcdefghijklmnop']
open('$WORK/task.jsonl', 'w').write(''.join(json.dumps(r) + '\n' for r in rows))
"
step "ESFT training on CUDA (bf16 base, fp32 master)" "$VENV/bin/expertlib" train "$WORK/base" "$WORK/task.jsonl" \
    --task gpu --steps 5 --lr 1e-3 --batch-size 4 --device cuda --dtype bfloat16 --master-dtype float32 \
    --gradient-checkpointing --out "$WORK/gpu.safetensors" --json
step "score on CUDA" "$VENV/bin/expertlib" score "$WORK/base" "$WORK/task.jsonl" --device cuda \
    --out "$WORK/scores.json" --json
rm -rf "$WORK"

echo
echo "gpu_check on $GPU, $(($(date +%s) - T0)) s:"
printf '  %s\n' "${SUMMARY[@]}"
if [ "$FAILED" = "1" ]; then
    echo "gpu_check: FAILED (details in $LOG)"
    exit 1
fi
echo "gpu_check: all steps passed"
