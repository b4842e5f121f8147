"""What a request carries into vLLM for its expert set, the same in both engines: the set's row of
the remap tables in `SamplingParams.extra_args` (`SET_ROW_KEY`; 0 is the base) and the set's
prefix-cache salt on the prompt (`SetRef.cache_salt`)."""

from __future__ import annotations

from typing import Any

from expertlib.slots import SetRef
from expertlib.vllm_plugin import SET_ROW_KEY


def with_set_row(params, ref: SetRef | None):
    """A copy of SamplingParams `params` that carries the set row of `ref` (0: the base) in extra_args."""
    from vllm import SamplingParams

    sp = params.clone() if params is not None else SamplingParams()
    sp.extra_args = {**(sp.extra_args or {}), SET_ROW_KEY: ref.set_row if ref else 0}
    return sp


def salted(prompt: Any, ref: SetRef | None) -> Any:
    """The prompt with the set's prefix-cache salt (`SetRef.cache_salt`): KV blocks computed under one
    expert set must never be reused by a request for another. A salt the caller already set is kept."""
    if ref is None:
        return prompt
    salt = ref.cache_salt
    if isinstance(prompt, str):
        return {"prompt": prompt, "cache_salt": salt}
    if isinstance(prompt, dict):
        return {"cache_salt": salt, **prompt}
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return {"prompt_token_ids": list(prompt), "cache_salt": salt}
    return prompt


__all__ = ["salted", "with_set_row"]
