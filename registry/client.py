"""Client of a remote expertlib registry over HTTP (the routes of `expertlib.server.registry_routes`).

Wire format (JSON bodies are the pydantic models of `expertlib.registry.protocol`):

    GET  {url}/entries?name=&base=        -> EntryList (each entry with its evaluation results)
    GET  {url}/entries/{ref}?base=        -> Entry (with manifest)     ref: math, math@3, math@blake3:...
    GET  {url}/blobs/{digest}             -> the patch bytes (application/octet-stream; Range: resumes)
    POST {url}/entries?name=&digest=&version=&tag=&source=   body: patch bytes  -> Entry (201)
    POST {url}/tags                       TagRequest -> Entry
    POST {url}/evals                      EvalsRequest -> Entry (results kept with the version)
Errors come back in OpenAI's shape, {"error": {"message": ..., "type": ..., "code": ...}}.
`Authorization: Bearer <token>` is sent when a token is given (the server's admin key).

JSON requests go through httpx. A blob download is read with the standard library's client
(httpx's 64 KiB reads through a pure-Python parser cost most of a pull's time): over plain HTTP on
Linux its body is spliced from the socket into the registry's temp file inside the kernel
(`os.splice` through a pipe: no copy through this process), elsewhere (HTTPS, no splice) read in
READ_SIZE pieces into one reused buffer and written there; either way hashed from the file as it
lands. It falls back to httpx behind a proxy, with a password in the URL, or when a client is handed
in (tests' transports).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import http.client
import os
import select
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx

from expertlib import jsonsafe
from expertlib.errors import ExpertlibError, NotFoundError, RemoteError
from expertlib.registry.blobs import CHUNK, BlobStore, TempBlob
from expertlib.registry.names import RefSpec, validate_digest, validate_name
from expertlib.registry.protocol import EVALS_PER_REQUEST, Entry, EntryList, EvalsRequest, TagRequest

TOKEN_ENV = "EXPERTLIB_REMOTE_TOKEN"
#: how often a broken download is resumed before the pull fails
RESUME_TRIES = 5
#: bytes a download reads from its socket at once (httpx reads 64 KiB at a time through its
#: pure-Python HTTP parser, which bounded a loopback pull near 400 MB/s)
READ_SIZE = 4 << 20
#: pipe size asked for when a download is spliced from its socket into the file (the kernel's
#: limit for unprivileged processes, /proc/sys/fs/pipe-max-size, is 1 MiB by default)
SPLICE_SIZE = 1 << 20
#: the most of an error answer's body a download reads
MAX_ERROR_BODY = 64 * 1024


class HttpRemote:
    """A remote registry at `url` (e.g. http://host:8000/admin/registry)."""

    def __init__(
        self, url: str, *, token: str | None = None, timeout: float = 60.0, client: httpx.Client | None = None
    ):
        self.url = url.rstrip("/")
        token = token or os.environ.get(TOKEN_ENV)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        #: blob downloads read the socket themselves (`_socket_body`) when this remote made its own
        #: client and no proxy stands between; through `client` otherwise (a test's transport, a proxy)
        self.direct = client is None and _no_proxy(self.url)
        self.client = client or httpx.Client(
            base_url=self.url, headers=self._headers, timeout=timeout, verify=_tls()
        )
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
        path = f"/blobs/{quote(digest, safe=':')}"

        def body(fd: int) -> Iterator[bytes | int]:
            return at_most(self._download(path, entry.size, what, into=fd), entry.size, what)

        return staging.write_temp(body, expected_digest=digest, progress=self.on_bytes), True

    def _download(self, path: str, size: int, what: str, into: int | None = None) -> Iterator[bytes | int]:
        """The bytes at `path`, resumed with a Range request after each break (RESUME_TRIES at most).
        Each piece is valid until the next one is asked for (the socket path reuses its buffer).
        `into`: the descriptor of the file the bytes go to, at its position; where the socket path
        can, it moves the bytes there itself inside the kernel (`_spliced`) and yields their count."""
        got, breaks = 0, 0
        body = self._socket_body if self.direct else self._httpx_body
        while True:
            headers = {"Range": f"bytes={got}-"} if got else {}
            try:
                with body(path, headers, into, size - got) as (status, content_range, chunks):
                    if got and not (status == 206 and content_range.startswith(f"bytes {got}-")):
                        raise RemoteError(
                            f"download of {what} broke at byte {got} and the remote cannot resume it",
                            hint="retry the pull (the remote does not answer Range requests)",
                        )
                    for chunk in chunks:  # as they arrive: a break loses nothing received
                        got += chunk if isinstance(chunk, int) else len(chunk)
                        yield chunk
                if got >= size:
                    return
                reason = f"the connection closed after {got} of {size} bytes"
            except ExpertlibError:  # an answer (an error status, no Range support): no retry
                raise
            except (httpx.TransportError, OSError, http.client.HTTPException) as exc:  # a break
                reason = str(exc) or type(exc).__name__
            except httpx.HTTPError as exc:
                raise RemoteError(f"download of {what} failed: {exc}", hint="retry the pull") from exc
            breaks += 1
            if breaks > RESUME_TRIES:
                raise RemoteError(
                    f"download of {what} failed {breaks} times, last: {reason}", hint="retry the pull"
                )

    @contextlib.contextmanager
    def _httpx_body(self, path: str, headers: dict[str, str], into: int | None = None, wanted: int = 0):
        """(status, Content-Range, chunks) of a GET through the httpx client."""
        with self.client.stream("GET", path, headers=headers) as r:
            if r.status_code >= 400:
                r.read()
                _raise_for(r, self.url)
            yield r.status_code, r.headers.get("content-range", ""), r.iter_bytes()

    @contextlib.contextmanager
    def _socket_body(self, path: str, headers: dict[str, str], into: int | None = None, wanted: int = 0):
        """(status, Content-Range, chunks) of a GET read straight from the socket into one reused
        buffer of READ_SIZE bytes (the standard library's HTTP client: no per-64-KiB parsing), or,
        given the file `into` and a plain-HTTP body of known length, spliced from the socket into
        that file (`_spliced`: counts of bytes written), `wanted` bytes and one more at most (the
        one more shows a body longer than announced)."""
        u = urlsplit(self.url)
        if u.scheme == "https":
            conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=self._timeout, context=_tls())
        else:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=self._timeout)
        try:
            conn.request(
                "GET", u.path + path, headers={**self._headers, **headers, "Accept-Encoding": "identity"}
            )
            r = conn.getresponse()
            if r.status >= 400:
                kind = {"content-type": r.getheader("content-type", "")}
                error = httpx.Response(r.status, headers=kind, content=r.read(MAX_ERROR_BODY))
                _raise_for(error, self.url)
            if into is not None and u.scheme == "http" and _can_splice(r):
                chunks = _spliced(r, into, min(r.length, wanted + 1), self._timeout)
            else:
                chunks = _pieces(r)
            yield r.status, r.getheader("content-range", ""), chunks
        finally:
            conn.close()

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


def _pieces(r: http.client.HTTPResponse) -> Iterator[memoryview]:
    """The body of `r`, READ_SIZE bytes at a time into one buffer (each piece valid until the next);
    a body cut short raises http.client.IncompleteRead after its last bytes."""
    buf = memoryview(bytearray(READ_SIZE))
    while n := r.readinto(buf):
        yield buf[:n]


def _can_splice(r: http.client.HTTPResponse) -> bool:
    """Whether the body of `r` can be moved by `_spliced`: the platform has splice (Linux) and the
    body is the socket's next `Content-Length` bytes (not chunked)."""
    return hasattr(os, "splice") and not r.chunked and r.length is not None and r.length > 0


def _spliced(r: http.client.HTTPResponse, fd: int, length: int, timeout: float) -> Iterator[bytes | int]:
    """The first `length` bytes of the body of `r` moved into the file `fd` (at its position) inside
    the kernel: socket -> pipe -> file with `os.splice`, no copy through this process (the HTTP
    client's user-space reads and the write back cost 0.200 cpu-s per 144 MiB, splicing 0.123,
    measured). Yields the count of each piece written, after bytes the client had already read
    ahead of the body (as bytes); stops short where the connection closes (the caller resumes).
    Where the kernel refuses to splice these descriptors, the rest is read the ordinary way."""
    head = r.fp.peek()[:length] if length else b""  # the reader's buffer (one socket read if empty)
    if head:
        head = r.fp.read(len(head))
        length -= len(head)
        yield head
    if not length:
        return
    sock = r.fp.fileno()  # non-blocking under a timeout: waited on with poll below
    rd, wr = os.pipe()
    try:
        with contextlib.suppress(OSError):  # bigger pieces where allowed (1 MiB by default)
            fcntl.fcntl(wr, fcntl.F_SETPIPE_SZ, SPLICE_SIZE)
        size = fcntl.fcntl(wr, fcntl.F_GETPIPE_SZ) if hasattr(fcntl, "F_GETPIPE_SZ") else 1 << 16
        poll, first = select.poll(), True
        poll.register(sock, select.POLLIN)
        while length:
            try:
                n = os.splice(sock, wr, min(length, size))
            except BlockingIOError:
                if not poll.poll(timeout * 1000):
                    raise TimeoutError(f"no data for {timeout} s") from None
                continue
            except OSError as exc:
                if first and exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    yield from _read_rest(r.fp, length)  # these descriptors cannot splice
                    return
                raise
            if n == 0:  # the connection closed early
                return
            first, moved = False, 0
            while moved < n:
                moved += os.splice(rd, fd, n - moved)
            length -= n
            yield n
    finally:
        os.close(rd)
        os.close(wr)


def _read_rest(fp, length: int) -> Iterator[memoryview]:
    """The next `length` bytes of the reader `fp`, READ_SIZE at a time into one buffer (stops short
    where the connection closes)."""
    buf = memoryview(bytearray(min(READ_SIZE, length)))
    while length:
        n = fp.readinto(buf[: min(length, len(buf))])
        if not n:
            return
        length -= n
        yield buf[:n]


def _no_proxy(url: str) -> bool:
    """Whether requests to `url` go straight to it: no proxy in the environment applies (httpx
    reads the same variables) and the URL carries no user:password (httpx sends those)."""
    import urllib.request

    proxies = urllib.request.getproxies_environment()
    u = urlsplit(url)
    if u.username is not None:
        return False
    if u.scheme not in proxies and "all" not in proxies:
        return True
    return bool(urllib.request.proxy_bypass_environment(u.hostname or "", proxies))


def _tls() -> ssl.SSLContext:
    """httpx's TLS settings (certifi's roots, or SSL_CERT_FILE / SSL_CERT_DIR), built once per
    process: loading the roots took 0.05-0.15 s, which every client paid, plain HTTP included."""
    return _tls_for(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _tls_for(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """One context per value of the variables httpx reads (they are the cache's key)."""
    return httpx.create_ssl_context()


def at_most(chunks: Iterator[bytes | int], size: int, what: str) -> Iterator[bytes | int]:
    """The chunks, refused as soon as they go past `size` bytes (a remote that sends more than it
    announced is not trusted with the disk); an int is the count of bytes a chunk wrote itself."""
    got = 0
    for chunk in chunks:
        got += chunk if isinstance(chunk, int) else len(chunk)
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
