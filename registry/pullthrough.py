"""A local registry that pulls a set it does not hold from a remote on first use (`serve --pull-from`).

    expertlib serve ./base --registry ./reg --pull-from s3://bucket/sets

The local registry is a cache of the remote: a reference it resolves is served from it as always; one
it does not (a task never pulled, a version or tag it lacks) is looked up on the remote, pulled (digests
checked on the way, `expertlib.registry.remotes.transfer`) and then resolved locally. A bare name or
`@latest` the local registry already holds resolves locally, to its own latest version; name a version
or a tag to get a newer one from the remote. The local registry never reuses a version number, so a
remote version older than one it holds is stored under its next number (the set is the same bytes;
the reference that pulled it keeps resolving to it).

The remote's names are listed at most once per `listing_ttl` seconds, so requests for names that exist
nowhere cost no round trip each; a set pushed to the remote is found within that time. A name the
remote does not hold is a NotFoundError (404 on the server); a remote that cannot be reached is a
RemoteError (502).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from expertlib.errors import ExpertlibError, NotFoundError, RegistryBusyError, RemoteError
from expertlib.registry.names import LATEST, RefSpec, parse_ref
from expertlib.registry.remotes import _wire_base, open_remote

log = logging.getLogger("expertlib.registry")

#: seconds a listing of the remote's names is reused
LISTING_TTL_S = 10.0


class PullThrough:
    """`registry` (a local `Registry`), whose `resolve` pulls what it lacks from `remote`; everything else
    is the local registry's."""

    def __init__(
        self, registry: Any, remote: str, *, token: str | None = None, listing_ttl: float = LISTING_TTL_S
    ):
        self.registry = registry
        self.remote = remote
        self.token = token
        self.listing_ttl = listing_ttl
        self.source = open_remote(remote, token=token, source=True)  # a bad URL fails at start
        self.pulls = 0  # sets pulled from the remote
        self._lock = threading.Lock()  # one pull at a time; a second caller finds the set pulled
        self._names: dict[str | None, tuple[float, set[str]]] = {}  # wire base -> (listed at, names)
        self._wire: dict[str, str | None] = {}
        self._pulled: dict[tuple[Any, str], str] = {}  # (reference, base) -> name@digest pulled for it

    def __getattr__(self, name: str) -> Any:
        return getattr(self.registry, name)

    def resolve(self, ref: Any, *, base: Any = None, **kw: Any) -> Any:
        key = (ref, str(base))
        try:
            return self.registry.resolve(self._pulled.get(key, ref), base=base, **kw)
        except NotFoundError:
            if not isinstance(ref, str):
                raise
        spec = parse_ref(ref)
        with self._lock:
            try:  # pulled meanwhile, by another request or another process on this registry
                return self.registry.resolve(self._pulled.get(key, ref), base=base, **kw)
            except NotFoundError:
                pass
            if spec.name not in self.remote_names(base):
                raise NotFoundError(
                    f"neither the registry nor the remote {self.remote} holds an expert set named {spec.name!r}",
                    hint=f"push it there first (expertlib push {spec.name} {self.remote})",
                )
            wanted = spec if spec.selector else RefSpec(spec.name, tag=LATEST)
            entry = self.source.entries(wanted, self._wire_of(base))[-1]  # NotFoundError: no such version
            # by digest: the local registry numbers versions its own way (a number is never reused, so
            # a version older than one it holds arrives under its next number)
            exact = f"{entry.name}@{entry.digest}"
            start = time.perf_counter()
            try:
                report = self.registry.pull(self.remote, [exact], base=base, token=self.token)
            except (NotFoundError, RegistryBusyError, RemoteError):
                raise
            except ExpertlibError as exc:
                try:  # another process on the same registry folder pulled it first
                    found = self.registry.resolve(exact, base=base, **kw)
                    self._pulled[key] = exact
                    return found
                except NotFoundError:
                    pass
                raise RemoteError(  # e.g. bytes that fail their digest: nothing was imported
                    f"pulling {wanted} from {self.remote} failed: {exc}",
                    hint=getattr(exc, "hint", None) or "check the remote's copy (expertlib pull --dry-run)",
                ) from exc
            self.pulls += len(report.copied)
            self._pulled[key] = exact
            log.info("pulled %s from %s in %.2f s", wanted, self.remote, time.perf_counter() - start)
        return self.registry.resolve(exact, base=base, **kw)

    def _wire_of(self, base: Any) -> str | None:
        if base is None:
            return None
        key = str(base)
        if key not in self._wire:
            self._wire[key] = _wire_base(base)  # a folder's identity: read its config once
        return self._wire[key]

    def remote_names(self, base: Any = None) -> set[str]:
        """The task names the remote holds for `base` (listed at most once per `listing_ttl`)."""
        wire = self._wire_of(base)
        listed = self._names.get(wire)
        if listed is None or time.monotonic() - listed[0] > self.listing_ttl:
            names = {e.name for e in self.source.entries(None, wire)}
            listed = self._names[wire] = (time.monotonic(), names)
        return listed[1]


__all__ = ["LISTING_TTL_S", "PullThrough"]
