"""The one place where errors become HTTP responses in OpenAI's error shape.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

expertlib errors carry their status (`http_status`); request validation errors become 400 with
`param` naming the offending field; anything unexpected is a 500 whose details go to the log.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertlib.errors import ExpertlibError, NotFoundError, NotLoadedError
from expertlib.server.protocol import ErrorBody, ErrorResponse

log = logging.getLogger("expertlib.server")

#: OpenAI's error `type` for each status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    507: "insufficient_storage",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
}

#: `code` for errors that do not carry one themselves.
ERROR_CODES: dict[type, str] = {NotLoadedError: "model_not_loaded", NotFoundError: "model_not_found"}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    err = ErrorBody(message=message, type=ERROR_TYPES.get(status, "error"), param=param, code=code)
    return ErrorResponse(error=err).model_dump()


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status)


def expertlib_error_body(exc: ExpertlibError) -> tuple[int, dict]:
    code = getattr(exc, "code", None) or next((c for t, c in ERROR_CODES.items() if isinstance(exc, t)), None)
    return exc.http_status, error_body(
        exc.http_status, str(exc), param=getattr(exc, "param", None), code=code
    )


#: Seconds a client is asked to wait (Retry-After) on a 429 or 503 that does not say.
DEFAULT_RETRY_AFTER = 1


def retry_headers(exc: ExpertlibError) -> dict[str, str]:
    """`Retry-After` for errors that pass with time (full queue, locked registry, not ready)."""
    if exc.http_status not in (429, 503):
        return {}
    return {"Retry-After": str(getattr(exc, "retry_after", None) or DEFAULT_RETRY_AFTER)}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ExpertlibError)
    async def _expertlib(_: Request, exc: ExpertlibError) -> JSONResponse:
        status, body = expertlib_error_body(exc)
        if status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc)
        return JSONResponse(body, status_code=status, headers=retry_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return error_response(500, f"internal server error ({type(exc).__name__})")
