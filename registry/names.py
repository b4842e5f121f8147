"""Names and references of expert sets in a registry.

    math            the latest version of task `math`
    math@3          version 3 (versions count from 1 to MAX_VERSION and are never reused)
    math@stable     whatever the movable tag `stable` points at (`latest` is automatic)
    math@blake3:ab  the immutable blob digest (a unique prefix of >= 8 hex digits is enough; sets of
                    patch format 3 and older are addressed by sha256: math@sha256:ab)

`parse_ref` turns such a string into a `RefSpec` (a query); the registry resolves it into a
`Ref`, the frozen value object (name, version, digest) that names one stored expert set.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from expertlib.errors import InvalidNameError

#: Longest task name or tag accepted.
MAX_NAME_LEN = 100
#: The automatic tag: always the highest version of a name.
LATEST = "latest"
#: The hashes a blob address may name, "<algorithm>:<64 hex>": blake3 (patch format 4 on) and
#: sha256 (formats 1-3; `expertlib.verify.hash_of`). Both prefixes are 7 characters long.
DIGEST_ALGORITHMS = ("blake3", "sha256")
DIGEST_PREFIXES = tuple(a + ":" for a in DIGEST_ALGORITHMS)
DIGEST_PREFIX_LEN = 7
#: Shortest digest prefix accepted in a reference.
MIN_DIGEST_PREFIX = 8
#: Highest version number a registry writes (publish, push, pull, import, the HTTP routes). A name
#: whose next version would pass it takes no new versions (they are never reused): publish under
#: another name.
MAX_VERSION = 2**31 - 1
#: Highest version number read back and accepted in references: SQLite's largest integer, so that
#: entries an older expertlib stored past MAX_VERSION can still be listed, shown and removed.
MAX_STORED_VERSION = 2**63 - 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")
_NAME_HINT = "use letters, digits and . _ + - (starting with a letter or digit, at most 100 characters)"


def validate_name(name: str, *, what: str = "task name") -> str:
    """Return `name` if it may be used as a task name (or tag); raise InvalidNameError otherwise."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"empty {what}", hint=_NAME_HINT)
    shown = ascii(name) if len(name) <= 40 else ascii(name[:40]) + "..."
    if len(name) > MAX_NAME_LEN:
        raise InvalidNameError(
            f"{what} {shown} is {len(name)} characters long (max {MAX_NAME_LEN})", hint=_NAME_HINT
        )
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise InvalidNameError(f"{what} {shown} contains control or invisible characters", hint=_NAME_HINT)
    if "/" in name or "\\" in name or ":" in name:
        raise InvalidNameError(f"{what} {shown} contains a path separator or ':'", hint=_NAME_HINT)
    if ".." in name or name in {".", ".."}:
        raise InvalidNameError(f"{what} {shown} contains '..'", hint=_NAME_HINT)
    if "@" in name:
        raise InvalidNameError(
            f"{what} {shown} contains '@', which separates a name from its version", hint=_NAME_HINT
        )
    if not _NAME_RE.match(name):
        raise InvalidNameError(
            f"{what} {shown} contains characters other than letters, digits and . _ + -", hint=_NAME_HINT
        )
    return name


def validate_tag(tag: str) -> str:
    """A custom tag: a valid name that cannot be mistaken for a version, a digest or `latest`."""
    validate_name(tag, what="tag")
    if tag.isdigit():
        raise InvalidNameError(
            f"tag {tag!r} is a number and would read as a version", hint="pick a tag with a letter"
        )
    if tag == LATEST:
        raise InvalidNameError(
            "tag 'latest' is automatic (the highest version)", hint="pick another tag name"
        )
    return tag


def validate_version(version: object) -> int:
    """`version` if a registry may store it (an int from 1 to MAX_VERSION); InvalidNameError otherwise."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        shown = repr(version) if len(repr(version)) <= 24 else repr(version)[:24] + "..."
        raise InvalidNameError(
            f"version {shown} is out of range: versions are 1 to {MAX_VERSION}",
            hint="leave the version out to take the next free one",
        )
    return version


def validate_digest(digest: str, *, prefix_ok: bool = False) -> str:
    if not isinstance(digest, str) or not digest.startswith(DIGEST_PREFIXES):
        raise InvalidNameError(
            f"digest {str(digest)[:80]!r} does not start with {' or '.join(DIGEST_PREFIXES)}",
            hint="copy it from `expertlib list` (blake3:<hex>, or sha256:<hex> for older sets)",
        )
    algorithm, hexpart = split_digest(digest)
    n_ok = MIN_DIGEST_PREFIX <= len(hexpart) <= 64 if prefix_ok else len(hexpart) == 64
    if not n_ok or not _HEX_RE.match(hexpart):
        need = f"{MIN_DIGEST_PREFIX} to 64" if prefix_ok else "64"
        raise InvalidNameError(
            f"digest {digest[:80]!r} is not {algorithm}: plus {need} lowercase hex digits",
            hint="copy it from `expertlib list`",
        )
    return digest


def split_digest(digest: str) -> tuple[str, str]:
    """("blake3" or "sha256", the hex digits) of a digest (checked by `validate_digest`)."""
    algorithm, _, hexpart = digest.partition(":")
    return algorithm, hexpart


def digest_path(digest: str) -> str:
    """Where a store keyed by digest keeps `digest`, relative: `<hex>` for sha256 (such stores held
    only sha256 digests, flat, before patch format 4), `<algorithm>/<hex>` for the others."""
    algorithm, hexpart = split_digest(validate_digest(digest))
    return hexpart if algorithm == "sha256" else f"{algorithm}/{hexpart}"


@dataclass(frozen=True)
class Ref:
    """One stored expert set: its name, version and immutable blob digest."""

    name: str
    version: int
    digest: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def pinned(self) -> str:
        """The immutable form, `name@blake3:...` (older sets: `name@sha256:...`)."""
        return f"{self.name}@{self.digest}"

    @property
    def short_digest(self) -> str:
        return self.digest[: DIGEST_PREFIX_LEN + 12]


@dataclass(frozen=True)
class RefSpec:
    """A parsed reference: a name plus at most one of version, tag or digest (none = latest)."""

    name: str
    version: int | None = None
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        sel = self.version if self.version is not None else (self.digest or self.tag)
        return f"{self.name}@{sel}" if sel is not None else self.name

    @property
    def selector(self) -> str | None:
        return str(self) if "@" in str(self) else None


def parse_ref(text: str) -> RefSpec:
    """Parse `task`, `task@3`, `task@tag` or `task@blake3:...` (`@sha256:...`); raise InvalidNameError
    on anything else."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidNameError(
            "empty expert-set reference", hint="e.g. math, math@3, math@stable, math@blake3:..."
        )
    name, sep, sel = text.partition("@")
    validate_name(name)
    if not sep:
        return RefSpec(name)
    if not sel:
        raise InvalidNameError(f"reference {text!r} has nothing after '@'", hint="e.g. math@3 or math@latest")
    if sel.startswith(DIGEST_PREFIXES):
        return RefSpec(name, digest=validate_digest(sel, prefix_ok=True))
    if sel.isdigit() and sel.isascii():
        if len(sel) > len(str(MAX_STORED_VERSION)) or int(sel) > MAX_STORED_VERSION:
            raise InvalidNameError(
                f"version {sel[:20]}{'...' if len(sel) > 20 else ''} in the reference is too large",
                hint=f"versions are 1 to {MAX_VERSION}; `expertlib list` shows the ones that exist",
            )
        version = int(sel)
        if version < 1:
            raise InvalidNameError(f"version {sel} in {text!r}: versions count from 1")
        return RefSpec(name, version=version)
    if sel == LATEST:
        return RefSpec(name, tag=LATEST)
    return RefSpec(name, tag=validate_tag(sel))
