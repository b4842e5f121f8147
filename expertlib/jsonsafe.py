"""JSON from outside, parsed with bounded nesting: patch headers and manifests, registry listings and
bodies, remote answers.

Python's `json` raises RecursionError (not a ValueError) on deep nesting, and what parses can still
be too deep for pydantic to serialise back (a manifest that opens but cannot be stored). `loads`
refuses both with one ValueError, so every caller keeps its own `except ValueError` and names the
file or source in its own error.

    data = loads(raw)          # ValueError: "JSON nested deeper than 64 levels" / JSONDecodeError
"""

from __future__ import annotations

import json
from typing import Any

#: Deepest nesting of arrays and objects accepted. Manifests need about 5 levels (provenance ->
#: training settings -> ...); pydantic stops serialising somewhere past 100.
MAX_JSON_DEPTH = 64
#: Deepest nesting of a patch manifest: half of the above, so that the registry's wire forms that
#: carry a manifest (an entry in a listing, a Hub manifest) stay well within MAX_JSON_DEPTH.
MAX_MANIFEST_DEPTH = 32


class JSONDepthError(ValueError):
    """JSON nested deeper than `MAX_JSON_DEPTH`."""


def loads(data: str | bytes | bytearray, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads`, refusing input nested deeper than `max_depth` with JSONDepthError (a ValueError).

    Invalid JSON raises json.JSONDecodeError and undecodable bytes UnicodeDecodeError, both
    ValueErrors too."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise JSONDepthError(f"JSON nested deeper than {max_depth} levels") from None
    if nesting(value, stop=max_depth + 1) > max_depth:
        raise JSONDepthError(f"JSON nested deeper than {max_depth} levels")
    return value


def nesting(value: Any, *, stop: int | None = None) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (a scalar 0, `[]` 1), level by level
    without recursion; counting ends at `stop` levels."""
    depth, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level and (stop is None or depth < stop):
        depth += 1
        level = [
            c
            for node in level
            for c in (node.values() if isinstance(node, dict) else node)
            if isinstance(c, (dict, list))
        ]
    return depth
