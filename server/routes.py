"""The OpenAI-compatible routes, /health and /metrics. Each route: parse, call one function, format."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, StreamingResponse

from expertlib.server import generation, tokens
from expertlib.server.auth import check_api_key
from expertlib.server.catalog_view import model_card, model_list
from expertlib.server.errors import error_response
from expertlib.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from expertlib.server.state import ServerState

router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

#: Status for a request whose client went away before the answer (nginx's convention).
CLIENT_CLOSED = 499
#: Response header naming the request (engine request ids are `{id}-{prompt index}`).
REQUEST_ID = "X-Request-Id"
#: which expert set served a request (its served name, or "base"): what `model="auto"` chose
SET_HEADER = "x-expertlib-set"


def state_of(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/health")
async def health(request: Request) -> Response:
    state = state_of(request)
    if state.ready:
        return JSONResponse({"status": "ok"})
    reason = f"startup failed: {state.startup_error}" if state.startup_error else "starting"
    return error_response(503, f"not ready ({reason})", code="not_ready")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = state_of(request)
    state.refresh_metrics()
    body = await asyncio.to_thread(state.metrics.render)  # lists the registry: off the event loop
    return Response(body, media_type=state.metrics.content_type)


@v1.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return await model_list(state_of(request))


@v1.get("/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    return await model_card(state_of(request), model_id)


@v1.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    state = state_of(request)
    job = await generation.prepare_completion(state, body)
    return await _respond(state, job, request)


@v1.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = state_of(request)
    job = await generation.prepare_chat(state, body)
    return await _respond(state, job, request)


# vLLM's tokenizer routes live outside /v1 (same API key)
@router.post("/tokenize", response_model=TokenizeResponse, dependencies=[Depends(check_api_key)])
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await tokens.tokenize(state_of(request), body)


@router.post("/detokenize", response_model=DetokenizeResponse, dependencies=[Depends(check_api_key)])
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return await tokens.detokenize(state_of(request), body)


async def _respond(state: ServerState, job: generation.Job, request: Request):
    if job.stream:
        return StreamingResponse(
            generation.stream_events(state, job),
            media_type="text/event-stream",
            headers={REQUEST_ID: job.request_id, SET_HEADER: job.label},
        )
    result = await generation.run_to_end(state, job, request)
    if result is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(jsonable_encoder(result), headers={SET_HEADER: job.label})
