"""Client of a remote expertlib registry over HTTP (the routes of `expertlib.server.registry_routes`).

Wire format (JSON bodies are the pydantic models of `expertlib.registry.protocol`):

    GET  {url}/entries?name=&base=        -> EntryList (each entry with its evaluation results)
    GET  {url}/entries/{ref}?base=        -> Entry (with manifest)     ref: math, math@3, math@sha256:...
    GET  {url}/blobs/{digest}             -> the patch bytes (application/octet-stream; Range: resumes)
    POST {url}/entries?name=&digest=&version=&tag=&source=   body: patch bytes  -> Entry (201)
    POST {url}/tags                       TagRequest -> Entry
    POST {url}/evals                      EvalsRequest -> Entry (results kept with the version)
Errors come back in OpenAI's shape, {"error": {"message": ..., "type": ..., "code": ...}}.
`Authorization: Bearer <token>` is sent when a token is given (the server's admin key).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx

from expertlib import jsonsafe
from expertlib.errors import NotFoundError, RemoteError
from expertlib.registry.blobs import CHUNK, BlobStore, TempBlob
from expertlib.registry.names import RefSpec, validate_digest, validate_name
from expertlib.registry.protocol import EVALS_PER_REQUEST, Entry, EntryList, EvalsRequest, TagRequest

TOKEN_ENV = "EXPERTLIB_REMOTE_TOKEN"
#: how often a broken download is resumed before the pull fails
RESUME_TRIES = 5


class HttpRemote:
    """A remote registry at `url` (e.g. http://host:8000/admin/registry)."""

    def __init__(
        self, url: str, *, token: str | None = None, timeout: float = 60.0, client: httpx.Client | None = None
    ):
        import os

        self.url = url.rstrip("/")
        token = token or os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = client or httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        #: called with the size of each piece of a download as it is written (a progress bar)
        self.on_bytes: Callable[[int], None] | None = None

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = self.client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise RemoteError(
                f"cannot reach {self.url}: {exc}", hint="check the URL and that the server runs"
            ) from exc
        _raise_for(r, self.url)
        return r

    # --- source ---------------------------------------------------------------------------------

    def entries(self, spec: RefSpec | None, base: str | None) -> list[Entry]:
        params = {"base": base} if base else {}
        if spec is not None and spec.selector is not None:
            r = self._request("GET", f"/entries/{quote(str(spec), safe='@:')}", params=params)
            return [_parse(Entry, r, self.url)]
        if spec is not None:
            params["name"] = spec.name
        return _parse(EntryList, self._request("GET", "/entries", params=params), self.url).entries

    def fetch(self, entry: Entry, staging: BlobStore) -> tuple[TempBlob, bool]:
        """The entry's bytes streamed into `staging` (hashed on the way, refused unless they match
        its digest); a dropped connection resumes where it broke (HTTP Range), so a GB-sized
        download survives a flaky network without starting over."""
        # the entry came from the remote: check what goes into the URL, and stop at its announced size
        validate_name(entry.name)
        digest = validate_digest(entry.digest)
        what = f"{entry.ref} from {self.url}"
        body = at_most(
            self._download(f"/blobs/{quote(digest, safe=':')}", entry.size, what), entry.size, what
        )
        return staging.write_temp(body, expected_digest=digest, progress=self.on_bytes), True

    def _download(self, path: str, size: int, what: str) -> Iterator[bytes]:
        """The bytes at `path`, resumed with a Range request after each break (RESUME_TRIES at most)."""
        got, breaks = 0, 0
        while True:
            headers = {"Range": f"bytes={got}-"} if got else {}
            try:
                with self.client.stream("GET", path, headers=headers) as r:
                    if r.status_code >= 400:
                        r.read()
                        _raise_for(r, self.url)
                    if got and not _resumes_at(r, got):
                        raise RemoteError(
                            f"download of {what} broke at byte {got} and the remote cannot resume it",
                            hint="retry the pull (the remote does not answer Range requests)",
                        )
                    for chunk in r.iter_bytes():  # as they arrive: a break loses nothing received
                        got += len(chunk)
                        yield chunk
                if got >= size:
                    return
                reason = f"the connection closed after {got} of {size} bytes"
            except httpx.TransportError as exc:
                reason = str(exc) or type(exc).__name__
            except httpx.HTTPError as exc:
                raise RemoteError(f"download of {what} failed: {exc}", hint="retry the pull") from exc
            breaks += 1
            if breaks > RESUME_TRIES:
                raise RemoteError(
                    f"download of {what} failed {breaks} times, last: {reason}", hint="retry the pull"
                )

    # --- sink -----------------------------------------------------------------------------------

    def find(self, entry: Entry) -> Entry | None:
        try:
            have = self.entries(RefSpec(entry.name), entry.base.config_digest)
        except NotFoundError:
            return None
        return next((e for e in have if e.digest == entry.digest), None)

    def put(self, entry: Entry, path: Path, tags: list[str]) -> Entry:
        params = [("name", entry.name), ("digest", entry.digest), ("version", str(entry.version))]
        params += [("tag", t) for t in tags]
        if entry.source:
            params.append(("source", entry.source))

        def body():
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk

        r = self._request(
            "POST",
            "/entries",
            params=params,
            content=body(),
            headers={"Content-Type": "application/octet-stream"},
        )
        return _parse(Entry, r, self.url)

    def set_tags(self, entry: Entry, tags: list[str]) -> None:
        for t in tags:
            body = TagRequest(ref=str(entry.ref), tag=t, base=entry.base.config_digest)
            self._request("POST", "/tags", json=body.model_dump())

    def record_evals(self, entry: Entry, records: list) -> None:
        for i in range(0, len(records), EVALS_PER_REQUEST):
            body = EvalsRequest(
                ref=str(entry.ref), base=entry.base.config_digest, records=records[i : i + EVALS_PER_REQUEST]
            )
            self._request("POST", "/evals", json=body.model_dump(mode="json"))


def _resumes_at(r: httpx.Response, offset: int) -> bool:
    """Whether `r` answers a Range request from `offset` with exactly those bytes."""
    cr = r.headers.get("content-range", "")
    return r.status_code == 206 and cr.startswith(f"bytes {offset}-")


def at_most(chunks: Iterator[bytes], size: int, what: str) -> Iterator[bytes]:
    """The chunks, refused as soon as they go past `size` bytes (a remote that sends more than it
    announced is not trusted with the disk)."""
    got = 0
    for chunk in chunks:
        got += len(chunk)
        if got > size:
            raise RemoteError(
                f"{what}: the remote sent more than the {size} bytes it announced",
                hint="the remote registry is broken or hostile; nothing was imported",
            )
        yield chunk


def _parse(model, r: httpx.Response, url: str):
    """A response body as `model`; a RemoteError (not a traceback) for anything else."""
    try:
        return model.model_validate(jsonsafe.loads(r.content))
    except ValueError as exc:  # JSON errors (nesting bounded) and pydantic's ValidationError
        first = str(exc).splitlines()[:3]
        raise RemoteError(
            f"{url} answered with an invalid {model.__name__}: {' '.join(first)}",
            hint="is this an expertlib registry of the same version? upgrade the older side",
        ) from None


def _raise_for(r: httpx.Response, url: str) -> None:
    if r.status_code < 400:
        return
    try:
        err = jsonsafe.loads(r.content)
        err = err.get("error", err)
        message = err.get("message") or err.get("detail") or r.text
    except (ValueError, AttributeError):
        message = r.text[:500] or r.reason_phrase
    message, _, hint = str(message).partition("\n  hint: ")
    if r.status_code == 404:
        raise NotFoundError(f"{url}: {message}", hint=hint or None)
    raise RemoteError(f"{url} answered {r.status_code}: {message}", hint=hint or None)
