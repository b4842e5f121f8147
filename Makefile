# expertlib — one-command set-up, tests, lint and benchmarks.
#   make install           virtual environment in .venv with the CPU vLLM engine
#   make install ENGINE=gpu  the same with the CUDA vLLM build
#   make test              install (if needed) and run the test suite
#   make bench             benchmarks (bench-train, bench-composer); results in bench/RESULTS.md
PYTHON ?= python3
VENV ?= .venv
ENGINE ?= cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.expertlib-installed-$(ENGINE)

.PHONY: install test test-fast lint format bench bench-train bench-composer bench-paper bench-scale bench-scale-serve bench-auto bench-replicas gpu-check gpu-check-vllm demo demo-stop clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	ENGINE=$(ENGINE) PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

# the browser test uses the distribution's Chromium: installed once (as root), a no-op afterwards
test: install
	bash scripts/install_browser.sh
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not vllm and not slow"

# lint and format need only ruff, in a small environment of their own (not the 2.5 GB install)
LINT_VENV ?= .venv-lint
RUFF := $(LINT_VENV)/bin/ruff

$(RUFF):
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install --quiet "ruff==0.17.6"

lint: $(RUFF)
	$(RUFF) check .
	$(RUFF) format --check .

format: $(RUFF)
	$(RUFF) format .
	$(RUFF) check --fix .

bench: bench-train bench-composer

bench-train: install
	$(BIN)/python bench/train_cost.py

# the composer's three ratios: mixed-task throughput (eager and compiled), memory, hot load
bench-composer: install
	$(BIN)/python bench/mixed_batch.py
	$(BIN)/python bench/mixed_batch.py --compiled
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/hot_load.py

# real per-layer shapes (DeepSeek-V2-Lite, Qwen3-30B-A3B, OLMoE-1B-7B) at truncated depth, on CPU;
# then moving a real-size set: verify, publish, push/pull (folder, HTTP), engine loads, decode during
# loads and the 1000-cycle load/unload/evict soak (issue 21's ratios, side by side)
bench-scale: install
	nice -n 5 $(BIN)/python bench/scale.py
	nice -n 5 $(BIN)/python bench/load_speed.py
	nice -n 5 $(BIN)/python bench/engine_load.py --soak 1000

# serving at those shapes on CPU vLLM: mixed batch with 16/32 sets vs plain vLLM, engine memory per set
# (~25 min on 2 CPUs: loading 32 sets per engine twice per model dominates, so not part of bench-scale)
bench-scale-serve: install
	nice -n 5 $(BIN)/python bench/serve_scale.py

# model="auto" and model="a+b" on the demo world (issue 24): picks, accuracy vs the set named, sum+fill,
# TTFT, the routing capture's cost, the threshold's calibration (~10 min on 2 CPUs, training included)
bench-auto: install
	nice -n 5 $(BIN)/python bench/auto_route.py

# serve --replicas 2 vs one replica under Ray Serve (issue 23): throughput ratio, hits from the replicas'
# counters, answers compared; room for one routed set per replica, then for every set (~15 min on 2 CPUs)
bench-replicas: install
	nice -n 5 $(BIN)/python bench/replicas.py --max-sets 2
	nice -n 5 $(BIN)/python bench/replicas.py --max-sets 4

# one NVIDIA GPU, no vLLM needed (a bare offline machine works; docs/GPU.md): ESFT, slot pool, remap
# op in a CUDA graph; results under $$OUT. `bash scripts/gpu_check.sh --dry-run` is its CPU mode.
gpu-check:
	bash scripts/gpu_check.sh

# one NVIDIA GPU with this project installed with vLLM (make install ENGINE=gpu): GPU-path tests,
# production settings (bf16, compiled, CUDA graphs, mixed sets) against merged-checkpoint vLLM
gpu-check-vllm:
	$(BIN)/python scripts/gpu_check_vllm.py

demo: install
	$(BIN)/expertlib demo

# the server `make demo` leaves running for its web view
demo-stop:
	$(BIN)/expertlib demo --stop

# the ESFT paper's table at toy scale on the shipped demo base (FFT, LoRA, ESFT-Token, ESFT-Gate)
bench-paper: install
	$(BIN)/python bench/paper_table.py

clean:
	rm -rf $(VENV) $(LINT_VENV) build *.egg-info .pytest_cache .ruff_cache
