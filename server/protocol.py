"""Request and response bodies of the HTTP API, mirroring OpenAI's shapes.

Only the fields the server honours are declared; unknown fields are ignored (as OpenAI's own
server does for forward compatibility), but fields we cannot honour with a non-default value
(`logprobs`, `echo`, `suffix`, ...) are refused with a 400 naming the parameter.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Most choices one request may ask for (`n`).
MAX_N = 16
#: Most stop strings (OpenAI's limit).
MAX_STOP = 4


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# --- errors -------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorBody


# --- models -------------------------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str = Field(description="what to pass as `model`: the base's name or an expert set `task@version`")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "expertlib"
    parent: str | None = Field(default=None, description="the base model an expert set runs on")
    root: str | None = Field(default=None, description="the base model's folder or hub id")
    aliases: list[str] = Field(
        default_factory=list, description="other names that select this model (`task`)"
    )
    pinned: bool | None = None


class LoadableSet(BaseModel):
    id: str = Field(description="registry reference `task@version`")
    task: str
    version: int | None = None
    digest: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    loadable: list[LoadableSet] = Field(
        default_factory=list,
        description="registered sets of this base that are not loaded (admin load, or on demand)",
    )


# --- sampling (shared by both endpoints) --------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(
        description="the base model's name, or an expert set: `task`, `task@version`, `task@tag`"
    )
    max_tokens: int | None = Field(default=None, ge=1, description="most tokens to generate")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, description="sampling seed, for reproducible sampled output")
    stop: str | list[str] | None = Field(default=None, description=f"up to {MAX_STOP} stop strings")
    n: int = Field(default=1, ge=1, le=MAX_N, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = Field(
        default=False, description="vLLM extension: keep generating past end-of-sequence"
    )
    logprobs: Any = Field(default=None, description="not supported")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list):
            if len(v) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server")
        return v

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, a batch of texts, token ids, or a batch of token-id lists"
    )
    echo: bool = Field(default=False, description="not supported")
    suffix: str | None = Field(default=None, description="not supported")
    best_of: int | None = Field(default=None, description="only 1 or n is accepted")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("prompt token lists must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported by this server")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported by this server")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; OpenAI content parts of type `text` are joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part of type {part.get('type')!r} is not supported (text only)")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="same as max_tokens")

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- responses ----------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(default=0, description="prompt tokens served from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


FinishReason = Literal["stop", "length", "abort"] | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = Field(
        default=None, description="vLLM extension: the stop string or token id"
    )


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = Field(
        default=None, description="vLLM extension: the stop string or token id"
    )


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# A streamed text completion chunk has the same shape as the response (object text_completion).
CompletionChunk = CompletionResponse


# --- admin --------------------------------------------------------------------------------------


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="registry reference (`task`, `task@version`, `task@tag`) or a patch file path"
    )
    pin: bool = Field(default=False, description="never evict this set when slots run out")


class NameRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="a loaded expert set: `task@version` or `task`")


class PinRequest(NameRequest):
    pinned: bool = True


class SetStatus(BaseModel):
    name: str
    loaded: bool = True
    pinned: bool | None = None


class AdminStatus(BaseModel):
    ready: bool
    base: str
    loaded: list[str]
    engine: dict[str, Any] = Field(description="the engine's own status: slots, sets, pins")
    queue_depth: int
    max_queue: int
