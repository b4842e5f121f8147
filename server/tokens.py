"""/tokenize and /detokenize (vLLM's shapes): every served name shares the base's tokenizer. Prompts
are bounded in characters before tokenizing, which runs in the server's tokenizer pool."""

from __future__ import annotations

from expertlib.errors import InvalidRequestError
from expertlib.server import protocol as p
from expertlib.server.generation import chat_message
from expertlib.server.limits import check_prompt_chars, text_chars
from expertlib.server.state import ServerState


async def _tokenizer(state: ServerState, model: str | None):
    _, catalog = state.require_ready()
    if model is not None:
        await catalog.resolve(model)  # an unknown name is a 404, as for generation
    return state.tokenizer


async def tokenize(state: ServerState, req: p.TokenizeRequest) -> p.TokenizeResponse:
    text = req.prompt if req.prompt is not None else req.messages
    check_prompt_chars([text], state.prompt_char_limit, "prompt" if req.prompt is not None else "messages")
    tok = await _tokenizer(state, req.model)
    return await state.tokenize_pool.run(text_chars(text), _tokenize, state, tok, req)


def _tokenize(state: ServerState, tok, req: p.TokenizeRequest) -> p.TokenizeResponse:
    if req.prompt is not None:
        ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    else:
        try:
            text = tok.apply_chat_template(
                [chat_message(m) for m in req.messages],
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt,
            )
        except Exception as exc:  # noqa: BLE001 - template errors come as many types
            raise InvalidRequestError(
                f"the chat template could not render these messages: {exc}", param="messages"
            ) from None
        ids = tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
    ids = list(ids)
    strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return p.TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids, token_strs=strs)


async def detokenize(state: ServerState, req: p.DetokenizeRequest) -> p.DetokenizeResponse:
    tok = await _tokenizer(state, req.model)
    vocab = len(tok)
    if any(not 0 <= t < vocab for t in req.tokens):
        raise InvalidRequestError(f"token ids must lie in [0, {vocab})", param="tokens")
    text = await state.tokenize_pool.run(len(req.tokens), tok.decode, req.tokens)
    return p.DetokenizeResponse(prompt=text)
