"""HTTP routes of a registry (FastAPI), the server side of `expertlib.registry.client`.

Mount `router` in any FastAPI app; the registry is found in `app.state.registry`, or
`app.state.server.registry` (the expertlib server); `expertlib.server.registry_app(reg)` is a
standalone app. Routes raise expertlib errors; the app's error handler turns them into OpenAI-shaped
bodies.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from expertlib import jsonsafe
from expertlib.errors import (
    IntegrityError,
    InvalidRequestError,
    NotFoundError,
    PatchError,
)
from expertlib.registry.local import RegistryStore
from expertlib.registry.names import MAX_VERSION, validate_digest, validate_name, validate_tag
from expertlib.registry.protocol import Entry, EntryList, EvalsRequest, TagRequest
from expertlib.registry.storage import storage_errors

router = APIRouter(tags=["registry"])

DIGEST_HEADER = "X-Expertlib-Digest"
#: Largest JSON body a registry route reads (a tag request is a few hundred bytes).
MAX_JSON_BODY = 64 * 1024


def get_registry(request: Request) -> RegistryStore:
    state = request.app.state
    reg = getattr(state, "registry", None)
    if reg is None:
        reg = getattr(getattr(state, "server", None), "registry", None)
    if reg is None:
        raise NotFoundError("this server has no expert-set registry", hint="start it with --registry DIR")
    return reg if isinstance(reg, RegistryStore) else RegistryStore(reg)


@router.get("/entries", response_model=EntryList)
def list_entries(
    name: str | None = None, base: str | None = None, reg: RegistryStore = Depends(get_registry)
) -> EntryList:
    """Every published version, optionally of one name and/or base (name, folder or config digest),
    each with its evaluation results."""
    from expertlib.registry.evals import with_evals

    return EntryList(entries=with_evals(reg, reg.list(base=base, name=name)))


@router.get("/entries/{ref}", response_model=Entry)
def show_entry(ref: str, base: str | None = None, reg: RegistryStore = Depends(get_registry)) -> Entry:
    """One entry with its manifest and evaluation results: `math`, `math@3`, `math@stable` or `math@blake3:...`."""
    from expertlib.registry.evals import with_evals

    return with_evals(reg, [reg.show(ref, base=base)])[0]


@router.get("/blobs/{digest}")
def get_blob(digest: str, reg: RegistryStore = Depends(get_registry)) -> FileResponse:
    """The patch bytes of a published entry (unreferenced blobs are not served)."""
    validate_digest(digest)
    if not reg.has_digest(digest):
        raise NotFoundError(f"no published expert set has digest {digest}")
    path = reg.blobs.path(digest)
    if not path.is_file():
        raise IntegrityError(f"blob {digest[:19]}... is missing", hint="run `expertlib verify` on the server")
    return BlobResponse(path, media_type="application/octet-stream", headers={DIGEST_HEADER: digest})


class BlobResponse(FileResponse):
    """A file sent in 4 MiB pieces (Starlette's 64 KiB cost a thread hop and a send per piece,
    which capped a download near 400 MB/s on loopback); Range requests work as before."""

    chunk_size = 4 << 20


@router.post("/entries", response_model=Entry, status_code=201)
async def push_entry(
    request: Request,
    name: str,
    digest: str,
    tag: list[str] = Query(default=[]),
    source: str | None = None,
    version: int | None = Query(
        default=None, ge=1, le=MAX_VERSION, description="preferred version number (mirrors the source)"
    ),
    reg: RegistryStore = Depends(get_registry),
) -> Entry:
    """Publish the patch in the body as the next version of `name`; refused unless it hashes to `digest`."""
    validate_name(name)
    validate_digest(digest)
    tags = [validate_tag(t) for t in tag]
    reg._writable()  # before the body is read
    reg.blobs.ensure()
    tmp = reg.blobs.temp_path()
    try:
        with storage_errors(reg.root), open(tmp, "wb") as f:
            async for chunk in request.stream():
                f.write(chunk)
        try:  # publish copies the body into the store in one hashing pass, refused unless it is `digest`
            entry = await run_in_threadpool(
                reg.publish,
                tmp,
                task=name,
                tags=tags,
                expected_digest=digest,
                source=source,
                version=version,
            )
        except PatchError as exc:  # named after the upload, not the server's temp file
            what = f"the pushed body of {name}"
            raise type(exc)(exc.message.removeprefix(f"{tmp}: "), path=what, hint=exc.hint) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    prepacker = getattr(getattr(request.app.state, "server", None), "prepacker", None)
    if prepacker is not None:  # the expertlib server packs it ahead of its first request now
        prepacker.wake()
    return entry


@router.post(
    "/tags",
    response_model=Entry,
    openapi_extra={  # the body is read by json_body (bounded), so FastAPI does not describe it itself
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": TagRequest.model_json_schema()}},
        }
    },
)
async def set_tag(request: Request, reg: RegistryStore = Depends(get_registry)) -> Entry:
    """Point a tag at a version: the body is a TagRequest."""
    body = await json_body(request, TagRequest)
    return await run_in_threadpool(reg.tag, body.ref, body.tag, base=body.base)


@router.post(
    "/evals",
    response_model=Entry,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": EvalsRequest.model_json_schema()}},
        }
    },
)
async def record_evals(request: Request, reg: RegistryStore = Depends(get_registry)) -> Entry:
    """Keep evaluation results with a version: the body is an EvalsRequest."""
    from expertlib.registry.evals import record_evals

    body = await json_body(request, EvalsRequest)
    return await run_in_threadpool(record_evals, reg, body.ref, body.records, base=body.base)


async def json_body(request: Request, model):
    """The request's JSON body as `model`: bounded in size and nesting (`expertlib.jsonsafe`), 400s
    with a one-line message otherwise."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_JSON_BODY:
            raise InvalidRequestError(f"the request body is over {MAX_JSON_BODY} bytes")
    try:
        data = jsonsafe.loads(bytes(raw))
    except ValueError as exc:
        raise InvalidRequestError(f"the request body is not usable JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
