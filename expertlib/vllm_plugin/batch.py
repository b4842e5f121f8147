"""Per-request expert sets under continuous batching: each token learns its request's set row.

A request names its set row in `SamplingParams.extra_args[SET_ROW_KEY]` (over HTTP: `vllm_xargs`).
vLLM has no public hook that hands per-request values to the model's forward, so we wrap the model
runner's `_init_model_kwargs` (private API; vllm==0.32.0 is pinned), which every forward of the GPU
runner and of the CPU runner (its subclass) calls after the batch layout is known. The wrapper writes
the set rows into the model's persistent per-token buffer (`SlotContext.token_offsets`) from
`input_batch.req_ids` and `query_start_loc`; warm-up and dummy runs (`num_reqs=0`) leave it as it is.
"""

from __future__ import annotations

import logging

from expertlib.vllm_plugin import CAPTURE_KEY, CAPTURE_ROWS, SET_ROW_KEY

logger = logging.getLogger(__name__)


def request_set_row(state, max_sets: int) -> int:
    """The set row a cached request asked for (0 = base); invalid values fall back to the base."""
    params = getattr(state, "sampling_params", None)
    extra = getattr(params, "extra_args", None) if params is not None else None
    if not extra:
        return 0
    set_row = extra.get(SET_ROW_KEY, 0)
    if isinstance(set_row, bool) or not isinstance(set_row, int) or not 0 <= set_row <= max_sets:
        logger.warning(
            "expertlib: ignoring invalid %s=%r (0..%d); serving the base", SET_ROW_KEY, set_row, max_sets
        )
        return 0
    return set_row


def fill_token_sets(runner, ctx, num_reqs: int | None) -> None:
    """Write this step's per-token set rows into `ctx` (copies nothing when they did not change)."""
    if num_reqs == 0:
        # Warm-up, profiling and CUDA graph capture (`_dummy_run`) discard their outputs and run
        # outside the runner's input-prep synchronisation: leave the buffer alone (no host write, no
        # copy). Whatever it holds are valid set rows, and a graph records addresses, not values.
        return
    batch = runner.input_batch
    n = batch.num_reqs
    if n == 0:
        ctx.clear_tokens()
        ctx.set_capture([], [])
        return
    qsl = runner.query_start_loc.np[: n + 1]
    counts = (qsl[1:] - qsl[:-1]).tolist()
    set_rows = [request_set_row(runner.requests.get(rid), ctx.max_sets) for rid in batch.req_ids[:n]]
    ctx.set_tokens(set_rows, counts)
    states = [runner.requests.get(rid) for rid in batch.req_ids[:n]]
    ctx.set_capture([request_capture_row(s) for s in states], counts)


def request_capture_row(state) -> int:
    """The capture row of a request whose prompt routing is counted (`model="auto"`), else 0."""
    extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
    row = extra.get(CAPTURE_KEY, 0)
    return row if isinstance(row, int) and not isinstance(row, bool) and 0 <= row <= CAPTURE_ROWS else 0


def install_set_id_hook() -> None:
    """Wrap GPUModelRunner._init_model_kwargs once per process (the CPU runner inherits it)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._init_model_kwargs
    if getattr(original, "_expertlib_hook", False):
        return

    def _init_model_kwargs(self, num_reqs: int | None = None):
        kwargs = original(self, num_reqs)
        ctx = getattr(self.get_model(), "expertlib_slots", None) if "model" in self.__dict__ else None
        if ctx is not None:
            fill_token_sets(self, ctx, num_reqs)
        return kwargs

    _init_model_kwargs._expertlib_hook = True
    GPUModelRunner._init_model_kwargs = _init_model_kwargs
