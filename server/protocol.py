"""Request and response bodies of the HTTP API, mirroring OpenAI's shapes.

Only the fields the server honours are declared; unknown fields are ignored (as OpenAI's own
server does for forward compatibility), but fields we cannot honour with a non-default value
(`suffix`, `best_of` other than `n`, `tools` without a parser for the base's chat template) are
refused with a 400 naming the parameter. Sampling parameters are converted to vLLM's by vLLM's own
request models (`expertlib.server.generation`), so their meaning is exactly vLLM's server's.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Most choices one request may ask for (`n`).
MAX_N = 16
#: Most stop strings (OpenAI's limit).
MAX_STOP = 4
#: Most alternatives per position in `logprobs` / `top_logprobs` (OpenAI's limit).
MAX_LOGPROBS = 20
#: Largest `top_k` (vLLM keeps it as a 32-bit integer; any k at or above the vocabulary means all).
MAX_TOP_K = 2**31 - 1
#: Largest magnitude of a `logit_bias` value (OpenAI's limit).
MAX_LOGIT_BIAS = 100.0


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
    state: str | None = Field(default=None, description="expert sets: `resident` (in the slots)")


class LoadableSet(BaseModel):
    id: str = Field(description="registry reference `task@version`")
    task: str
    version: int | None = None
    digest: str | None = None
    state: str = Field(
        default="disk", description="`host` (in the host cache: a fast reload) or `disk`; loads on first use"
    )


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


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema", description="the JSON schema the output must satisfy")
    strict: bool | None = None

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, v):
        from jsonschema import exceptions, validators

        try:
            validators.validator_for(v).check_schema(v)
        except exceptions.SchemaError as exc:
            raise ValueError(f"not a valid JSON schema: {exc.message}") from None
        except RecursionError:
            raise ValueError("the JSON schema is nested too deeply to check") from None
        return v


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _needs_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a `json_schema` object with a `schema`")
        return self

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI-shaped dict (what vLLM's request models take)."""
        if self.type != "json_schema":
            return {"type": self.type}
        return {
            "type": "json_schema",
            "json_schema": self.json_schema.model_dump(by_alias=True, exclude_none=True),
        }


def _check_text(value: Any, depth: int = 0) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                "text contains a lone UTF-16 surrogate (e.g. \\ud800); send valid Unicode"
            ) from None
    elif depth < 8 and isinstance(value, dict):
        for v in value.values():
            _check_text(v, depth + 1)
    elif depth < 8 and isinstance(value, list):
        for v in value:
            if not isinstance(v, int):
                _check_text(v, depth + 1)


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(
        description="the base model's name, or an expert set: `task`, `task@version`, `task@tag`"
    )
    max_tokens: int | None = Field(default=None, ge=1, description="most tokens to generate")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(
        default=None,
        ge=-(2**63),
        lt=2**63,
        description="sampling seed (64-bit), for reproducible sampled output",
    )
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
    logit_bias: (
        dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS, allow_inf_nan=False)]] | None
    ) = Field(default=None, description="token id (as a string) -> bias added to its logit (-100..100)")
    top_k: int | None = Field(
        default=None, ge=-1, le=MAX_TOP_K, description="vLLM extension: sample among the k most likely"
    )
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, description="vLLM extension")
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0, description="vLLM extension")
    response_format: ResponseFormat | None = Field(
        default=None,
        description="`text`, `json_object`, or `json_schema` (output constrained by vLLM's structured outputs)",
    )

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data):
        """Every string must be encodable (JSON allows lone UTF-16 surrogates, tokenizers do not)."""
        _check_text(data)
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v == "":
            raise ValueError("stop must not be an empty string")
        if isinstance(v, list):
            if len(v) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must not be empty")
        return v

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, a batch of texts, token ids, or a batch of token-id lists"
    )
    max_tokens: int | None = Field(
        default=None, ge=0, description="most tokens to generate; 0 with `echo` scores the prompt only"
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description=f"log-probabilities of each token and of the 0..{MAX_LOGPROBS} most likely alternatives",
    )
    echo: bool = Field(default=False, description="prepend the prompt (and its token logprobs) to the choice")
    suffix: str | None = Field(
        default=None, description="not supported (no model here is trained for insertion)"
    )
    best_of: int | None = Field(default=None, ge=1, description="accepted when equal to `n`")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("prompt token lists must not be empty")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info):
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of must equal n (vLLM's engine returns every sampled choice)")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix is not supported by this server")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, description="an assistant's earlier tool calls"
    )
    tool_call_id: str | None = Field(default=None, description="which call a `tool` message answers")

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
    logprobs: bool = Field(default=False, description="return the log-probability of each output token")
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description=f"0..{MAX_LOGPROBS} most likely alternatives per position; needs `logprobs`",
    )
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="functions the model may call (needs a tool parser for the base's template)"
    )
    tool_choice: str | dict[str, Any] | None = Field(
        default=None, description="`none`, `auto`, `required` or a named function"
    )
    parallel_tool_calls: bool | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info):
        if v is not None and v > 0 and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return v

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


FinishReason = Literal["stop", "length", "abort", "tool_calls"] | None


class CompletionLogProbs(BaseModel):
    """Per token of the choice's text (prompt tokens first with `echo`): OpenAI's legacy shape."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogProbs(BaseModel):
    content: list[TokenLogprob] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
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


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON string")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogProbs | None = None
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
    logprobs: ChatLogProbs | None = None
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


# --- tokenizer (vLLM's /tokenize and /detokenize shapes) ------------------------------------------


class TokenizeRequest(BaseModel):
    """Either `prompt` (text) or `messages` (rendered with the chat template first)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, description="any served name (all share one tokenizer)")
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(
        default=None, description="default: true for `prompt`, false for `messages` (as vLLM)"
    )
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data):
        """Every string must be encodable (JSON allows lone UTF-16 surrogates, tokenizers do not)."""
        _check_text(data)
        return data

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int] = Field(description="token ids to turn back into text")


class DetokenizeResponse(BaseModel):
    prompt: str


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
