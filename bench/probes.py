"""Measurements the benchmarks share: this process's resident memory and a vLLM worker's weights."""

from __future__ import annotations


def rss() -> int:
    """Resident memory of this process in bytes (Linux /proc; 0 where it is not available)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def weight_bytes(worker) -> int:
    """Parameter bytes of the model on a vLLM worker (a `collective_rpc` target)."""
    model = worker.model_runner.get_model()
    return sum(p.numel() * p.element_size() for p in model.parameters())
