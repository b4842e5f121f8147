"""vLLM's per-token logprobs as OpenAI's two shapes: the legacy completions one (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`) and chat's (`content: [{token, logprob, bytes,
top_logprobs}]`).

A step is what vLLM returns per position: `{token_id: Logprob(logprob, rank, decoded_token)}`
holding the chosen token and the top-k alternatives, or None (the first prompt token has no
logprob: nothing precedes it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from expertlib.server import protocol as p

#: What OpenAI (and vLLM's server) report instead of -inf, which JSON cannot carry.
MIN_LOGPROB = -9999.0


def _value(lp: Any) -> float:
    x = float(lp.logprob)
    return MIN_LOGPROB if math.isnan(x) or x < MIN_LOGPROB else x


def _text(token_id: int, lp: Any, tokenizer) -> str:
    decoded = getattr(lp, "decoded_token", None)
    return decoded if decoded is not None else tokenizer.decode([token_id])


def _ranked(step: Any, k: int) -> list[tuple[int, Any]]:
    """The k most likely alternatives of a step, best first."""
    items = sorted(step.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
    return items[:k]


def completion_logprobs(
    token_ids: Sequence[int], steps: Sequence[Any], k: int, tokenizer, offset: int = 0
) -> p.CompletionLogProbs:
    """Legacy completions logprobs for `token_ids`; `top_logprobs` holds the chosen token and the k
    most likely ones (vLLM's server does the same); `text_offset` starts at `offset`."""
    out = p.CompletionLogProbs()
    for token_id, step in zip(token_ids, steps, strict=True):
        if step is None or token_id not in step:
            token = tokenizer.decode([token_id])
            out.tokens.append(token)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            chosen = step[token_id]
            token = _text(token_id, chosen, tokenizer)
            out.tokens.append(token)
            out.token_logprobs.append(_value(chosen))
            top: dict[str, float] = {}
            for t, lp in _ranked(step, k):  # best first: tokens that decode alike keep the best value
                top.setdefault(_text(t, lp, tokenizer), _value(lp))
            top.setdefault(token, _value(chosen))
            out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)
    return out


def chat_logprobs(token_ids: Sequence[int], steps: Sequence[Any], k: int, tokenizer) -> p.ChatLogProbs:
    """Chat logprobs for the generated `token_ids`, each with its k most likely alternatives."""
    content = []
    for token_id, step in zip(token_ids, steps, strict=True):
        chosen = step[token_id]
        token = _text(token_id, chosen, tokenizer)
        top = [
            p.TopLogprob(token=(t := _text(i, lp, tokenizer)), logprob=_value(lp), bytes=list(t.encode()))
            for i, lp in _ranked(step, k)
        ]
        content.append(
            p.TokenLogprob(token=token, logprob=_value(chosen), bytes=list(token.encode()), top_logprobs=top)
        )
    return p.ChatLogProbs(content=content)
