"""Serving engines: one base MoE model in vLLM, many expert sets loaded into its expert slots.

    engine = ExpertEngine("path/to/base", slots=8, max_sets=8, enforce_eager=True)
    engine.load("math.safetensors")                     # -> "math" (the set's task name)
    engine.load(code_set, name="code", pin=True)        # an in-memory ExpertSet works too
    outs = engine.generate(["2+2=", "def f(", "hi"], expert_set=["math", "code", None])
    engine.unload("math")

`AsyncExpertEngine.from_base(...)` is the same over vLLM's AsyncLLM (for the server): `await load`,
`await unload`, and `generate(prompt, sampling_params, request_id, expert_set=...)` streams
RequestOutputs. Loads and unloads run on the workers through `collective_rpc` while requests are being
served; a set with requests in flight is never evicted, and unloading it waits for them.

A request's set is a `SetRef` (name, content digest, set row, registry version): `engine.ref(name)`
resolves a name once (the server's catalog does it per request) and `generate` takes the value; a
plain name is resolved the same way. A load opens its set once (`expertlib.loading.open_expert_set`)
and runs the checks the transformers composer runs too (`expertlib.loading.SetLedger`).

One module per job:
- `book.py`: `SetBook`, the ledger of sets and the load/unload transactions both engines run, written
  once against an awaitable `collective_rpc`;
- `start.py`: what starting an engine takes (`EngineStart`: base folder, vLLM's arguments);
- `memory.py`: memory sized to fit the machine (`size_memory`), memory failures made one error;
- `requests.py`: what a request carries into vLLM (its set row, its prefix-cache salt);
- `offline.py`: `ExpertEngine` (vLLM's `LLM`); `async_engine.py`: `AsyncExpertEngine` (`AsyncLLM`).

The slot accounting is `expertlib.slots.SlotPool`; the vLLM mechanics are `expertlib.vllm_plugin`.
"""

from expertlib.checkpoint import BaseCheckpoint
from expertlib.engine.async_engine import AsyncExpertEngine
from expertlib.engine.memory import CPU_MAX_NUM_SEQS, size_memory
from expertlib.engine.offline import ExpertEngine
from expertlib.engine.start import resolve_base
from expertlib.errors import NotLoadedError
from expertlib.slots import SetRef

__all__ = [
    "CPU_MAX_NUM_SEQS",
    "AsyncExpertEngine",
    "BaseCheckpoint",
    "ExpertEngine",
    "NotLoadedError",
    "SetRef",
    "resolve_base",
    "size_memory",
]
