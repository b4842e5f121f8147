"""Bounded work before a request reaches the engine: the JSON nesting cap (checked on the raw body,
before any parse), the prompt character cap (checked before any tokenization) and the tokenizer
pool (tokenization off the event loop, in a few threads with a bounded queue).

A token covers at most a few characters of real text (about 4 in English, rarely more than 16), so
a prompt of more than `max_model_len x CHARS_PER_TOKEN` characters cannot fit the context: it is
refused before the tokenizer sees it (`--max-prompt-chars` sets the cap explicitly). Short prompts
have their own lane, so a request of a few tokens never waits behind multi-megabyte ones.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from expertlib.errors import InvalidRequestError, PromptTooLongError, QueueFullError

T = TypeVar("T")

#: Deepest JSON nesting a request body may have (objects and arrays); deeper bodies get 400.
MAX_JSON_DEPTH = 64
#: Generous bound on characters per token: prompts longer than max_model_len x this cannot fit.
CHARS_PER_TOKEN = 32
#: Prompts up to this many characters are tokenized in the short lane (never behind long ones).
SHORT_PROMPT_CHARS = 16_384
#: Long prompts tokenized or waiting at once per tokenizer thread; more get 429 with Retry-After.
PENDING_PER_THREAD = 2

_BRACKETS = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_KEEP = b'[]{}"'
_DROP = bytes(b for b in range(256) if b not in _KEEP)
_STRING = re.compile(rb'"[^"]*"')
_STEP = np.zeros(256, dtype=np.int8)
for _b, _d in _BRACKETS.items():
    _STEP[_b] = _d


def json_depth(body: bytes) -> int:
    """The deepest nesting of objects and arrays in a JSON text, from its bytes without parsing it
    (C-speed passes: escapes out, everything but brackets and quotes out, strings out, a running sum)."""
    if not body:
        return 0
    text = body.replace(b"\\\\", b"").replace(b'\\"', b"")  # then every '"' delimits a string
    text = _STRING.sub(b"", text.translate(None, _DROP))
    if not text:
        return 0
    steps = _STEP[np.frombuffer(text, dtype=np.uint8)]  # +1 per opening, -1 per closing bracket
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def check_json_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """InvalidRequestError when `body` nests objects and arrays deeper than `limit`."""
    depth = json_depth(body)
    if depth > limit:
        raise InvalidRequestError(
            f"the request body nests JSON {depth} levels deep; this server takes at most {limit}",
            code="json_too_deep",
        )


def prompt_char_limit(max_model_len: int | None, explicit: int | None = None) -> int | None:
    """The most characters a prompt may have (None: no context length known, no cap)."""
    if explicit is not None:
        return explicit
    return None if max_model_len is None else max_model_len * CHARS_PER_TOKEN


def text_chars(value: Any) -> int:
    """Characters of text in a prompt: a string, a list of strings or of message dicts/models."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_chars(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(text_chars(v) for v in value if not isinstance(v, int))
    if hasattr(value, "model_dump"):
        return text_chars(value.model_dump(exclude_none=True))
    return 0


def check_prompt_chars(texts: Iterable[Any], limit: int | None, param: str) -> None:
    """PromptTooLongError for the first prompt longer than `limit` characters (before tokenizing)."""
    if limit is None:
        return
    for text in texts:
        n = text_chars(text)
        if n > limit:
            raise PromptTooLongError(
                f"the prompt is {n} characters long; this server takes at most {limit} "
                f"(its context in tokens x {CHARS_PER_TOKEN} characters per token)",
                param=param,
            )


class TokenizerPool:
    """Tokenization off the event loop: a short lane for prompts of up to SHORT_PROMPT_CHARS
    characters and a long lane of `threads` threads that holds at most `threads x
    PENDING_PER_THREAD` prompts (running or waiting); a long prompt beyond that gets 429."""

    def __init__(self, threads: int | None = None):
        self.threads = threads or max(1, min(4, (os.cpu_count() or 2) // 2))
        self.limit = self.threads * PENDING_PER_THREAD
        self.pending = 0
        self._short = ThreadPoolExecutor(1, thread_name_prefix="tokenize-short")
        self._long = ThreadPoolExecutor(self.threads, thread_name_prefix="tokenize-long")

    async def run(self, chars: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the lane for a prompt of `chars` characters."""
        loop = asyncio.get_running_loop()
        if chars <= SHORT_PROMPT_CHARS:
            return await loop.run_in_executor(self._short, fn, *args)
        if self.pending >= self.limit:
            raise QueueFullError(
                f"{self.pending} long prompts are being tokenized; this server takes {self.limit} at once",
                hint="retry after a short wait",
            )
        self.pending += 1
        try:
            return await loop.run_in_executor(self._long, fn, *args)
        finally:
            self.pending -= 1

    def shutdown(self) -> None:
        self._short.shutdown(wait=False, cancel_futures=True)
        self._long.shutdown(wait=False, cancel_futures=True)


__all__ = [
    "CHARS_PER_TOKEN",
    "MAX_JSON_DEPTH",
    "TokenizerPool",
    "check_json_depth",
    "check_prompt_chars",
    "json_depth",
    "prompt_char_limit",
]
