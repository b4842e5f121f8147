"""JSON from outside, parsed with bounded nesting: patch headers and manifests, registry listings and
bodies, remote answers.

Python's `json` raises RecursionError (not a ValueError) on deep nesting, and what parses can still
be too deep for pydantic to serialise back (a manifest that opens but cannot be stored). `loads`
measures the nesting on the raw text first, in linear time and before anything is built, and refuses
too deep input with one ValueError, so every caller keeps its own `except ValueError` and names the
file or source in its own error.

    data = loads(raw)          # ValueError: "JSON nested deeper than 64 levels" / JSONDecodeError
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

#: Deepest nesting of arrays and objects accepted. Manifests need about 5 levels (provenance ->
#: training settings -> ...), listings a few more.
MAX_JSON_DEPTH = 64
#: Deepest nesting of a patch manifest: half of the above, so that the registry's wire forms that
#: carry a manifest (an entry in a listing, a Hub manifest) stay well within MAX_JSON_DEPTH.
MAX_MANIFEST_DEPTH = 32

_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # as int8: +1 opens, -1 closes
_CHUNK = 1 << 20
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class JSONDepthError(ValueError):
    """JSON nested deeper than `MAX_JSON_DEPTH`."""


def loads(data: str | bytes | bytearray, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads`, refusing input nested deeper than `max_depth` with JSONDepthError (a ValueError).

    Invalid JSON raises json.JSONDecodeError and undecodable bytes UnicodeDecodeError, both
    ValueErrors too."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    encoding = json.detect_encoding(raw)
    if not encoding.startswith("utf-8"):  # UTF-16/32 JSON: measured in UTF-8
        raw = raw.decode(encoding).encode("utf-8", "surrogatepass")
    if nesting(raw, stop=max_depth + 1) > max_depth:
        raise JSONDepthError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(data)
    except RecursionError:  # not reached after the check above; kept as the last line of defence
        raise JSONDepthError(f"JSON nested deeper than {max_depth} levels") from None


def nesting(raw: bytes, *, stop: int | None = None) -> int:
    """How deeply arrays and objects nest in UTF-8 JSON text (counting ends once `stop` is reached):
    escapes and string literals dropped, each remaining bracket a step of +1 or -1, the depth the
    highest running sum. All at C speed (bytes methods, numpy), in chunks of bounded memory."""
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")  # no quote left inside a string
    outside = b"".join(unescaped.split(b'"')[::2])  # the text between string literals
    steps = np.frombuffer(outside.translate(_STEPS, _NOT_BRACKETS), dtype=np.int8)  # +1 / -1
    depth, level = 0, 0
    for start in range(0, len(steps), _CHUNK):
        running = np.cumsum(steps[start : start + _CHUNK], dtype=np.int64) + level
        depth, level = max(depth, int(running.max())), int(running[-1])
        if stop is not None and depth >= stop:
            break
    return depth
