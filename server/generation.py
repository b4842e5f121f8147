"""Completions and chat completions over the engine: the library code behind the two routes.

A request is *prepared* (model resolved to an expert set, prompt tokenized and checked against
the context, sampling parameters built, admitted by the bounded queue) before any response
starts, so every error there is a normal JSON error. Then each prompt goes to the engine as its
own request; requests for different expert sets run concurrently and share the engine's batches.
Whoever stops consuming (a client disconnect) aborts every engine request not yet finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from expertlib.errors import EngineError, ExpertlibError, InvalidRequestError, PromptTooLongError
from expertlib.server import protocol as p
from expertlib.server import tools
from expertlib.server.catalog_view import public_name
from expertlib.server.limits import check_prompt_chars, text_chars
from expertlib.server.logprobs import chat_logprobs, completion_logprobs
from expertlib.server.state import ServerState
from expertlib.slots import SetRef

BASE_LABEL = "base"
#: The `model` that lets the server choose the set from the prompt's own routing.
AUTO_MODEL = "auto"


@dataclass
class Job:
    """One prepared request: what to send to the engine and how to report it."""

    request_id: str
    endpoint: str  # "completions" | "chat"
    model: str  # echoed back in responses
    expert_set: SetRef | None  # resolved once from `model`; the engine salts the prefix cache from it
    prompts: list[list[int]]
    params: Any  # vllm.SamplingParams
    stream: bool
    include_usage: bool
    release: Any = None  # the bounded queue's release, called once the job ends
    cached_tokens: dict[int, int] = field(default_factory=dict)  # prompt index -> prefix-cache hits
    started: float = field(default_factory=time.perf_counter)
    top_logprobs: int | None = None  # alternatives per position in `logprobs`; None: no logprobs
    echo: bool = False  # completions: each choice starts with the prompt (and its logprobs)
    echo_only: bool = False  # echo with max_tokens=0: score the prompt, return no new tokens
    prompt_texts: list[str] = field(default_factory=list)  # for echo
    prompt_logprobs: dict[int, Any] = field(default_factory=dict)  # prompt index -> vLLM's prompt logprobs
    tokenizer: Any = None  # decodes tokens for logprobs
    tool_parser: str | None = None  # vLLM tool parser for chat requests with `tools`
    request: Any = None  # the chat request (for tool-call parsing)

    @property
    def label(self) -> str:
        return self.expert_set.name if self.expert_set else BASE_LABEL


# --- preparing ------------------------------------------------------------------------------------


async def prepare_completion(state: ServerState, req: p.CompletionRequest) -> Job:
    echo_only = req.echo and req.max_tokens == 0
    max_tokens = 1 if echo_only else req.max_tokens  # vLLM's server also runs one step, then drops it
    job = await _prepare(state, req, "completions", _completion_prompts, max_tokens, "prompt")
    job.top_logprobs, job.echo, job.echo_only = req.logprobs, req.echo, echo_only
    if req.echo:
        raw = req.prompt
        texts = [raw] if isinstance(raw, str) else raw if all(isinstance(x, str) for x in raw) else None
        job.prompt_texts = texts or [job.tokenizer.decode(ids) for ids in job.prompts]
    return job


async def prepare_chat(state: ServerState, req: p.ChatCompletionRequest) -> Job:
    job = await _prepare(state, req, "chat", _chat_prompts, req.completion_limit, "messages")
    job.top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    job.tool_parser, job.request = tools.check(job.tokenizer, req), req
    return job


def _completion_prompts(tokenizer, req: p.CompletionRequest) -> list[list[int]]:
    if req.max_tokens == 0 and not req.echo:
        raise InvalidRequestError(
            "max_tokens=0 generates nothing; it is only meaningful with echo=true (scoring the prompt)",
            param="max_tokens",
        )
    prompt = req.prompt
    if isinstance(prompt, str):
        return [list(tokenizer.encode(prompt))]
    if all(isinstance(x, int) for x in prompt):
        return [list(prompt)]
    return [list(tokenizer.encode(x)) if isinstance(x, str) else list(x) for x in prompt]


def _chat_prompts(tokenizer, req: p.ChatCompletionRequest) -> list[list[int]]:
    parser = tools.check(tokenizer, req)
    try:
        messages = [chat_message(m) for m in req.messages]
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="messages") from None
    extra = {"tools": req.tools} if parser else {}
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    except Exception as exc:  # noqa: BLE001 - template errors come as many types (jinja, ValueError)
        raise InvalidRequestError(
            f"the chat template could not render these messages: {exc}", param="messages"
        ) from None
    return [list(tokenizer.encode(text, add_special_tokens=False))]


def chat_message(m: p.ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


async def _prepare(
    state: ServerState, req, endpoint: str, to_prompts, max_tokens: int | None, prompt_param: str
) -> Job:
    label = None
    try:
        _, catalog = state.require_ready()
        texts = _prompt_texts(req)
        check_prompt_chars(texts, state.prompt_char_limit, prompt_param)  # before any tokenizing
        sequences = _sequences(req)
        release = state.admission.enter(sequences)  # admission first: a full queue tokenizes nothing
        try:
            auto = req.model == AUTO_MODEL  # the set is chosen from the prompt's routing, below
            expert_set = None if auto else await catalog.resolve(req.model)
            label = expert_set.name if expert_set else BASE_LABEL
            # off the event loop, in the bounded tokenizer pool (short prompts never wait behind long)
            chars = sum(text_chars(t) for t in texts)
            prompts = await state.tokenize_pool.run(
                chars, _tokenized, to_prompts, state.tokenizer, req, prompt_param
            )
            vocab = _vocab_size(state.tokenizer)
            for ids in prompts:
                if not ids:
                    raise InvalidRequestError("the prompt is empty", param=prompt_param)
                if vocab is not None and any(not 0 <= t < vocab for t in ids):
                    raise InvalidRequestError(f"token ids must lie in [0, {vocab})", param=prompt_param)
            if auto:  # the first prompt decides for the request (expertlib.server.sets.resolve_auto)
                expert_set, _ = await catalog.resolve_auto(prompts[0], state.settings.auto_threshold)
                label = expert_set.name if expert_set else BASE_LABEL
                state.metrics.auto_decisions.labels(model=label).inc()
            limit = _check_length(state, prompts, max_tokens, prompt_param)
            params = _sampling_params(req, limit, stream=req.stream)
            if params.structured_outputs is not None:  # compiling a schema can take a while: off the loop
                await asyncio.to_thread(_verify, state.engine, params)
        except BaseException:
            release()
            raise
        shown = req.model  # echoed back; for auto, what served: the set's name or the base's
        if auto:
            shown = expert_set.name if expert_set else public_name(state.settings.model_name)
        return Job(
            request_id=p.new_id("cmpl" if endpoint == "completions" else "chatcmpl"),
            endpoint=endpoint,
            model=shown,
            expert_set=expert_set,
            prompts=prompts,
            params=params,
            stream=req.stream,
            include_usage=req.include_usage_in_stream,
            tokenizer=state.tokenizer,
            release=release,
        )
    except ExpertlibError as exc:
        state.metrics.requests.labels(
            model=label or "unknown", endpoint=endpoint, status=str(exc.http_status)
        ).inc()
        raise


def _prompt_texts(req) -> list[Any]:
    """The texts a request's prompts are tokenized from (one entry per prompt; token ids: none)."""
    if isinstance(req, p.ChatCompletionRequest):
        return [[req.messages, req.tools or []]]
    prompt = req.prompt
    return [prompt] if isinstance(prompt, str) else [x for x in prompt if isinstance(x, str)]


def _sequences(req) -> int:
    """Sequences a request generates (prompts x choices): what the bounded queue counts."""
    prompt = getattr(req, "prompt", None)
    prompts = (
        1
        if prompt is None or isinstance(prompt, str) or all(isinstance(x, int) for x in prompt)
        else len(prompt)
    )
    return prompts * max(req.n, getattr(req, "best_of", None) or 1)


def _tokenized(to_prompts, tokenizer, req, prompt_param: str) -> list[list[int]]:
    try:
        return to_prompts(tokenizer, req)
    except (TypeError, UnicodeError) as exc:  # e.g. a lone surrogate the tokenizer cannot encode
        raise InvalidRequestError(f"the prompt cannot be tokenized: {exc}", param=prompt_param) from None


def _verify(engine, params) -> None:
    """vLLM's own check of the parameters (a schema its backend cannot compile, ...) as a 400 before
    the response starts, instead of an error from the engine mid-stream."""
    verify = getattr(engine, "verify_params", None)
    if verify is None:
        return
    try:
        verify(params)
    except Exception as exc:
        refused = isinstance(exc, (ValueError, TypeError, RecursionError)) or _is_validation_error(exc)
        if isinstance(exc, ExpertlibError) or not refused:
            raise
        raise InvalidRequestError(_engine_refusal(exc), param=_refused_param(exc, params)) from None


def _is_validation_error(exc: BaseException) -> bool:
    from vllm.exceptions import VLLMValidationError

    return isinstance(exc, VLLMValidationError)


def _engine_refusal(exc: BaseException) -> str:
    return f"the engine refused these parameters: {exc}"


def _refused_param(exc: BaseException, params) -> str | None:
    named = getattr(exc, "parameter", None)
    return named or ("response_format" if getattr(params, "structured_outputs", None) is not None else None)


def _vocab_size(tokenizer) -> int | None:
    try:
        return len(tokenizer)
    except TypeError:
        return None


def _check_length(
    state: ServerState, prompts: list[list[int]], max_tokens: int | None, prompt_param: str
) -> int:
    """The completion limit to use; PromptTooLongError when prompt plus completion exceed the context."""
    ctx = state.max_model_len
    longest = max(len(ids) for ids in prompts)
    if ctx is None:
        return max_tokens or state.settings.default_max_tokens
    if longest >= ctx:
        raise PromptTooLongError(
            f"the prompt is {longest} tokens long; this model's context is {ctx} tokens", param=prompt_param
        )
    room = ctx - longest
    if max_tokens is None:
        return min(state.settings.default_max_tokens, room)
    if max_tokens > room:
        raise PromptTooLongError(
            f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) exceed this model's context of {ctx} tokens",
            param="max_tokens",
            hint=f"ask for at most {room} tokens, or shorten the prompt",
        )
    return max_tokens


#: Sampling fields both endpoints hand to vLLM's request models unchanged.
_SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
    "logit_bias",
    "top_k",
    "min_p",
    "repetition_penalty",
)


def _sampling_params(req, max_tokens: int, *, stream: bool):
    """vLLM's SamplingParams for a validated request, converted by vLLM's own OpenAI request models
    (logprobs, prompt logprobs for echo, structured outputs from `response_format`, defaults)."""
    from pydantic import ValidationError
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    body: dict[str, Any] = {k: getattr(req, k) for k in _SAMPLING_FIELDS if getattr(req, k) is not None}
    body["model"] = req.model
    if req.response_format is not None:
        body["response_format"] = req.response_format.to_openai()
    try:
        if isinstance(req, p.CompletionRequest):
            from vllm.entrypoints.openai.completion.protocol import CompletionRequest

            # the prompt is already tokenized here; vLLM's model only converts the parameters
            body.update(prompt=[0], echo=req.echo, logprobs=req.logprobs, max_tokens=req.max_tokens)
            params = CompletionRequest.model_validate(body).to_sampling_params(max_tokens)
        else:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

            body.update(messages=[], logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0)
            params = ChatCompletionRequest.model_validate(body).to_sampling_params(max_tokens, {})
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ())) or None
        raise InvalidRequestError(
            str(first.get("msg", exc)).removeprefix("Value error, "), param=param
        ) from None
    except (ValueError, TypeError, VLLMValidationError) as exc:  # vLLM's is no ValueError
        raise InvalidRequestError(str(exc), param=getattr(exc, "parameter", None)) from None
    except RecursionError:
        raise InvalidRequestError("a parameter is nested too deeply", param="response_format") from None
    params.output_kind = RequestOutputKind.CUMULATIVE if stream else RequestOutputKind.FINAL_ONLY
    return params


# --- running --------------------------------------------------------------------------------------


async def _merged(state: ServerState, job: Job) -> AsyncIterator[tuple[int, Any]]:
    """(prompt index, RequestOutput) from every prompt's engine request, as they come.

    Closing this iterator early (cancel, disconnect) aborts the engine requests not finished."""
    engine = state.engine
    assert engine is not None
    ids = [f"{job.request_id}-{i}" for i in range(len(job.prompts))]
    finished: set[int] = set()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int) -> None:
        try:
            # the engine salts the prompt for vLLM's prefix cache with job.expert_set.cache_salt
            async for out in engine.generate(job.prompts[i], job.params, ids[i], job.expert_set):
                await queue.put((i, out))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            if not isinstance(exc, ExpertlibError) and _is_validation_error(exc):  # refused when added
                exc = InvalidRequestError(_engine_refusal(exc), param=_refused_param(exc, job.params))
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(ids))]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                if item.finished:
                    finished.add(i)
                cached = getattr(item, "num_cached_tokens", None)
                if isinstance(cached, int):
                    job.cached_tokens[i] = cached
                if getattr(item, "prompt_logprobs", None) is not None:
                    job.prompt_logprobs.setdefault(i, item.prompt_logprobs)
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for i, rid in enumerate(ids):
            if i not in finished:
                with contextlib.suppress(Exception):
                    await engine.abort(rid)


async def wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _record(state: ServerState, job: Job, status: int, prompt_tokens: int, completion_tokens: int) -> None:
    m = state.metrics
    m.requests.labels(model=job.label, endpoint=job.endpoint, status=str(status)).inc()
    m.latency.labels(model=job.label).observe(time.perf_counter() - job.started)
    m.prompt_tokens.labels(model=job.label).inc(prompt_tokens)
    m.completion_tokens.labels(model=job.label).inc(completion_tokens)


def _usage(job: Job, completions: dict[tuple[int, int], Any]) -> p.Usage:
    prompt = sum(len(ids) for ids in job.prompts)
    completion = 0 if job.echo_only else sum(len(o.token_ids) for o in completions.values())
    details = p.PromptTokensDetails(cached_tokens=sum(job.cached_tokens.values()))
    return p.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=details,
    )


async def run_to_end(
    state: ServerState, job: Job, request: Request | None
) -> p.CompletionResponse | p.ChatCompletionResponse | None:
    """Run a non-streaming job; None when the client disconnected first (the engine was aborted)."""
    try:
        finals: dict[tuple[int, int], Any] = {}

        async def consume() -> None:
            async with contextlib.aclosing(_merged(state, job)) as outputs:
                async for i, out in outputs:
                    for o in out.outputs:
                        finals[(i, o.index)] = o

        task = asyncio.create_task(consume())
        watcher = asyncio.create_task(wait_for_disconnect(request)) if request is not None else None
        try:
            waiting = {task} if watcher is None else {task, watcher}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if watcher is not None:
                watcher.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            _record(state, job, 499, sum(len(x) for x in job.prompts), 0)
            return None
        task.result()  # re-raise engine errors
    finally:
        job.release()
    usage = _usage(job, finals)
    _record(state, job, 200, usage.prompt_tokens, usage.completion_tokens)
    n = job.params.n
    ordered = [(i * n + idx, finals[(i, idx)]) for (i, idx) in sorted(finals)]
    created = p.now()
    if job.endpoint == "completions":
        choices = [
            p.CompletionChoice(
                index=k,
                text=_echoed(job, k // n, o.text),
                logprobs=_completion_logprobs(job, k // n, o, echo=job.echo),
                finish_reason=o.finish_reason,
                stop_reason=_stop_reason(o),
            )
            for k, o in ordered
        ]
        return p.CompletionResponse(
            id=job.request_id, created=created, model=job.model, choices=choices, usage=usage
        )
    choices = [_chat_choice(job, k, o) for k, o in ordered]
    return p.ChatCompletionResponse(
        id=job.request_id, created=created, model=job.model, choices=choices, usage=usage
    )


def _chat_choice(job: Job, k: int, o: Any) -> p.ChatChoice:
    content, calls, finish = o.text, [], o.finish_reason
    if job.tool_parser is not None:
        content, calls = tools.extract(job.tool_parser, job.tokenizer, job.request, o.text)
        finish = "tool_calls" if calls else finish
    return p.ChatChoice(
        index=k,
        message=p.ChatMessageOut(content=content, tool_calls=calls),
        logprobs=_chat_logprobs(job, o, 0),
        finish_reason=finish,
        stop_reason=_stop_reason(o),
    )


def _echoed(job: Job, i: int, text: str) -> str:
    if not job.echo:
        return text
    return job.prompt_texts[i] + ("" if job.echo_only else text)


def _completion_logprobs(
    job: Job, i: int, o: Any, *, echo: bool, start: int = 0, offset: int = 0
) -> p.CompletionLogProbs | None:
    """Logprobs of generated tokens from `start` on (and of the prompt's first, with `echo`)."""
    if job.top_logprobs is None:
        return None
    ids: list[int] = [] if job.echo_only else list(o.token_ids)[start:]
    steps: list[Any] = [] if job.echo_only else list(o.logprobs or [])[start:]
    if echo:
        prompt_steps = job.prompt_logprobs.get(i)
        if prompt_steps is None:
            raise EngineError("the engine returned no prompt logprobs for an echo request")
        ids, steps = [*job.prompts[i], *ids], [*prompt_steps, *steps]
    return completion_logprobs(ids, steps, job.top_logprobs, job.tokenizer, offset)


def _chat_logprobs(job: Job, o: Any, start: int) -> p.ChatLogProbs | None:
    if job.top_logprobs is None:
        return None
    return chat_logprobs(
        list(o.token_ids)[start:], list(o.logprobs or [])[start:], job.top_logprobs, job.tokenizer
    )


def _stop_reason(o: Any) -> int | str | None:
    reason = getattr(o, "stop_reason", None)
    return reason if isinstance(reason, (int, str)) else None


def sse(data: Any) -> str:
    body = data.model_dump_json(exclude_none=False) if hasattr(data, "model_dump_json") else json.dumps(data)
    return f"data: {body}\n\n"


async def stream_events(state: ServerState, job: Job) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    from expertlib.server.errors import error_body, expertlib_error_body

    n = job.params.n
    created = p.now()
    sent: dict[tuple[int, int], int] = {}  # characters of text sent
    sent_tokens: dict[tuple[int, int], int] = {}  # tokens whose logprobs were sent
    offsets: dict[tuple[int, int], int] = {}  # text_offset of the next token (completions logprobs)
    latest: dict[tuple[int, int], Any] = {}
    status = 499
    try:
        if job.endpoint == "chat":
            for i in range(len(job.prompts)):
                for idx in range(n):
                    yield sse(
                        _chat_chunk(job, created, i * n + idx, p.ChatDelta(role="assistant", content=""))
                    )
        async with contextlib.aclosing(_merged(state, job)) as outputs:
            async for i, out in outputs:
                for o in out.outputs:
                    key = (i, o.index)
                    if key in latest and latest[key].finish_reason is not None:
                        continue
                    latest[key] = o
                    first = key not in sent
                    delta = "" if job.echo_only else o.text[sent.get(key, 0) :]
                    sent[key] = len(o.text)
                    start, sent_tokens[key] = sent_tokens.get(key, 0), len(o.token_ids)
                    if first and job.echo:
                        delta = job.prompt_texts[i] + delta
                    if (
                        delta
                        or o.finish_reason is not None
                        or (start < len(o.token_ids) and job.top_logprobs is not None)
                    ):
                        if job.endpoint == "chat":
                            lp = _chat_logprobs(job, o, start)
                        else:
                            lp = _completion_logprobs(
                                job, i, o, echo=first and job.echo, start=start, offset=offsets.get(key, 0)
                            )
                            offsets[key] = offsets.get(key, 0) + len(delta)
                        yield sse(_chunk(job, created, i * n + o.index, delta, o.finish_reason, lp))
        status = 200
        if job.include_usage:
            usage = _usage(job, latest)
            if job.endpoint == "chat":
                yield sse(
                    p.ChatCompletionChunk(
                        id=job.request_id, created=created, model=job.model, choices=[], usage=usage
                    )
                )
            else:
                yield sse(
                    p.CompletionResponse(
                        id=job.request_id, created=created, model=job.model, choices=[], usage=usage
                    )
                )
    except ExpertlibError as exc:
        status, body = expertlib_error_body(exc)
        yield sse(body)
    except Exception as exc:  # noqa: BLE001 - the response has started: report in-band, then end
        status, body = 500, error_body(500, f"generation failed ({type(exc).__name__}: {exc})")
        yield sse(body)
    finally:
        job.release()
        usage = _usage(job, latest)
        _record(state, job, status, usage.prompt_tokens, usage.completion_tokens)
    yield "data: [DONE]\n\n"


def _chat_chunk(
    job: Job, created: int, index: int, delta: p.ChatDelta, finish: str | None = None, logprobs=None
):
    choice = p.ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
    return p.ChatCompletionChunk(id=job.request_id, created=created, model=job.model, choices=[choice])


def _chunk(job: Job, created: int, index: int, delta: str, finish: str | None, logprobs=None):
    if job.endpoint == "chat":
        content = p.ChatDelta(content=delta if delta else None)
        return _chat_chunk(job, created, index, content, finish, logprobs)
    choice = p.CompletionChoice(index=index, text=delta, finish_reason=finish, logprobs=logprobs)
    return p.CompletionResponse(id=job.request_id, created=created, model=job.model, choices=[choice])
