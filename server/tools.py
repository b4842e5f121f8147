"""Tool calling (`tools`, `tool_choice`) through vLLM's tool-call parsers.

A base can call tools only when its chat template renders them and vLLM has a parser for the
format the template teaches. The format is recognised from the template's markers; anything else
is a 400 naming `tools`, so a client never gets plain text where it asked for tool calls.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from expertlib.errors import InvalidRequestError
from expertlib.server import protocol as p

#: Marker in a chat template -> the vLLM tool parser for that format (checked in this order).
TEMPLATE_PARSERS: tuple[tuple[str, str], ...] = (
    ("<tool_call>", "hermes"),  # Qwen2.5 / Qwen3 / Hermes
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
)


def parser_name(tokenizer) -> str | None:
    """The vLLM parser for the tool-call format the tokenizer's chat template uses, if any."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = " ".join(str(t) for t in template.values())
    if not isinstance(template, str) or "tools" not in template:
        return None
    return next((name for marker, name in TEMPLATE_PARSERS if marker in template), None)


@functools.lru_cache(maxsize=4)
def _parser_class(name: str):
    from vllm.tool_parsers import ToolParserManager

    return ToolParserManager.get_tool_parser(name)


def check(tokenizer, req: p.ChatCompletionRequest) -> str | None:
    """The parser name to use for this request (None: no tool calls to parse); 400 when impossible."""
    if not req.tools or req.tool_choice == "none":
        return None
    name = parser_name(tokenizer)
    if name is None:
        raise InvalidRequestError(
            "tools are not supported for this model: its chat template has no tool-call format "
            "that vLLM has a parser for",
            param="tools",
            hint="leave out `tools` (or use tool_choice='none'), or serve a base whose template renders tools",
        )
    if req.stream:
        raise InvalidRequestError(
            "streaming is not supported together with tools", param="stream", hint="set stream=false"
        )
    if req.tool_choice not in (None, "auto"):
        raise InvalidRequestError(
            f"tool_choice {req.tool_choice!r} is not supported; use 'auto' or 'none'", param="tool_choice"
        )
    return name


def extract(
    name: str, tokenizer, req: p.ChatCompletionRequest, text: str
) -> tuple[str | None, list[p.ToolCall]]:
    """(remaining content, tool calls) parsed from a finished output by vLLM's parser `name`."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    vreq = ChatCompletionRequest.model_validate(
        {"model": req.model, "messages": [], "tools": req.tools, "tool_choice": "auto"}
    )
    info = _parser_class(name)(tokenizer, vreq.tools).extract_tool_calls(text, vreq)
    if not info.tools_called:
        return text, []
    calls = [
        p.ToolCall(
            id=c.id or p.new_id("call"),
            function=p.FunctionCall(name=c.function.name, arguments=_json_text(c.function.arguments)),
        )
        for c in info.tool_calls
    ]
    return info.content or None, calls


def _json_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)
