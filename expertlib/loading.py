"""Opening an expert set, and the checks of the one load transaction every backend runs.

    opened = open_expert_set("math.safetensors")                    # a patch file
    opened = open_expert_set("math@2", open_named=registry_open)    # a name the caller's opener opens
    opened = open_expert_set(es, name="code")                       # an ExpertSet in memory

`open_expert_set` turns what a caller names into an `OpenedSet` (the lazily opened set, the name it
is loaded under, its registry version) once; a load keeps that value, and the `SetRef` a request
carries is made from it. Where names live is the caller's business: the library never imports the
registry, its caller passes an opener (`expertlib eval` its registry's `open` among one base's sets,
the server's catalog one that opens an entry it has resolved already).

`SetLedger` is the backend-neutral half of a load, shared by the transformers composer
(`expertlib.compose.ComposedModel`) and the vLLM engines (`expertlib.engine`). Its checks, in order:

1. full (non-expert) parameters: refused (PatchShapeError), slots hold routed experts only;
2. the base: the set was made for this base (identity, layers, expert ids and shapes, base digests);
3. verify: digests recomputed from the tensors, NaN/inf refused (`ExpertSet.verify`; with
   `verify_always` every load hashes the file again);
4. weight bounds (`expertlib.bounds`), before anything is evicted;
5. the name: a set resident under it with other tensors is refused (SlotError), the same set is
   touched (and pinned) instead of loaded twice.

1-3 depend on nothing resident (`check`; the async engine runs it on a thread), 4-5 and the
placement in the `SlotPool` on what is resident (`admit`; under the async engine's lock).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from expertlib.bounds import DEFAULT_FACTOR, WeightBounds, check_bounds, set_absmax
from expertlib.constants import PATCH_SUFFIX
from expertlib.errors import NotFoundError, PatchShapeError, SlotError
from expertlib.patch import ExpertSet, ExpertSetManifest
from expertlib.slots.pool import Placement, SlotPool


@dataclass(frozen=True)
class OpenedSet:
    """An expert set opened once, as a load keeps it: the set (opened lazily), the name it is loaded
    under, and the registry version it came from (None for a patch file or a set in memory)."""

    expert_set: ExpertSet
    name: str
    version: int | None = None

    @property
    def manifest(self) -> ExpertSetManifest:
        return self.expert_set.manifest

    @property
    def digest(self) -> str:
        """The content digest of its tensors (as the manifest states it; `check` recomputes it)."""
        return self.expert_set.manifest.content_digest


#: How a caller opens a name that is not a file: a registry's `open` among one base's sets, say.
OpenNamed = Callable[[str], "ExpertSet | OpenedSet"]


def open_expert_set(
    source: OpenedSet | ExpertSet | str | Path,
    *,
    name: str | None = None,
    open_named: OpenNamed | None = None,
) -> OpenedSet:
    """The set `source` names, opened once: an `OpenedSet` or `ExpertSet` as given, a patch file
    (a path ending in .safetensors, or any file that exists), or else a name `open_named` opens.
    `name`: the name to load it under (default: the opener's, else the set's task)."""
    if isinstance(source, OpenedSet):
        opened = source
    elif isinstance(source, ExpertSet):
        opened = OpenedSet(source, source.manifest.task)
    else:
        path = Path(source).expanduser()
        if path.suffix == PATCH_SUFFIX or path.is_file() or open_named is None:
            if not path.is_file():
                raise NotFoundError(
                    f"no expert set file {str(source)!r}",
                    hint="give a .safetensors path"
                    + ("" if open_named else ", or a registry name where the command takes --registry"),
                )
            es = ExpertSet.open(path)
            opened = OpenedSet(es, es.manifest.task)
        else:
            got = open_named(str(source))
            opened = got if isinstance(got, OpenedSet) else OpenedSet(got, got.manifest.task)
    return opened if name is None or name == opened.name else replace(opened, name=name)


def refuse_name_clash(name: str, resident: str, incoming: str, *, hint: str | None = None) -> None:
    """Check 5's rule, wherever a load finds `name` resident already: SlotError when the resident set
    holds other tensors (content digest `resident`) than the one being loaded (`incoming`); a load
    never keeps the old set while answering as if it had loaded the new one."""
    if resident != incoming:
        raise SlotError(
            f"another expert set is loaded as {name!r} (content {resident}); this one holds {incoming}",
            hint=hint or f"unload {name!r} first, or load this set under another name",
        )


class SetLedger:
    """Which expert sets a backend holds (a `SlotPool` and the `OpenedSet` of each resident set) and
    the checks every load runs, in the order the module docstring gives. A backend writes what
    `admit` placed; `check_base(es)` is its base check (BaseMismatchError/PatchShapeError)."""

    def __init__(
        self,
        pool: SlotPool,
        check_base: Callable[[ExpertSet], None],
        bounds: WeightBounds | None = None,
        *,
        verify_always: bool = False,
        on_evict: Callable[[str], None] | None = None,
    ):
        self.pool = pool
        self.check_base = check_base
        #: the weight bound (expertlib.bounds); an engine fills in its base statistics at start
        self.bounds = bounds if bounds is not None else WeightBounds({}, DEFAULT_FACTOR)
        #: hash every load in full (`--verify-loads always`), not once per unchanged file
        self.verify_always = verify_always
        self.sets: dict[str, OpenedSet] = {}
        self.on_evict = on_evict  # called with each set evicted to make room, once it is forgotten

    def check(self, opened: OpenedSet) -> OpenedSet:
        """Checks 1-3, which depend on nothing resident: full parameters, the base, verify."""
        es, name = opened.expert_set, opened.name
        extra = es.manifest.extra_params
        if extra:
            raise PatchShapeError(
                f"expert set {name!r} carries full parameters {sorted(extra)[:3]}; slots hold routed experts only",
                path=str(es.path) if es.path else None,
                hint="apply such a set in place (expertlib.apply.apply_expert_set) or serve a merged checkpoint",
            )
        self.check_base(es)
        es.verify(always=self.verify_always)  # digests recomputed, NaN/inf refused
        return opened

    def admit(self, opened: OpenedSet, *, pin: bool = False) -> Placement | None:
        """Checks 4-5, then slots and a set row reserved in the pool (evicting least recently used
        unpinned sets: `evicted` is told of each). None when this very set is resident already:
        it is touched (and pinned) instead. Call `check` first."""
        es, name = opened.expert_set, opened.name
        check_bounds(set_absmax(es), self.bounds, name=name)  # before anything is evicted
        if name in self.pool:
            refuse_name_clash(name, self.sets[name].digest, opened.digest)
            self.pool.touch(name)
            if pin:
                self.pin(name, True)
            return None
        # slots are shared only on digests recomputed from the tensors, never on the manifest's claims
        placement = self.pool.place(name, es.manifest.experts, es.verify(), pinned=pin)
        for gone in placement.evicted:
            self.evicted(gone)
        self.sets[name] = opened
        return placement

    def evicted(self, name: str) -> None:
        """`name` was evicted to make room (its slots are free in the pool already)."""
        self.forget(name)
        if self.on_evict is not None:
            self.on_evict(name)

    def forget(self, name: str) -> None:
        self.sets.pop(name, None)

    def release(self, name: str) -> int:
        """Free a resident set's slots and row; returns the row (for the backend to clear)."""
        set_row = self.pool.row_of(name)
        self.pool.release(name)
        self.forget(name)
        return set_row

    def pin(self, name: str, pinned: bool = True) -> None:
        self.pool.pin(name, pinned)


__all__ = ["OpenNamed", "OpenedSet", "SetLedger", "open_expert_set", "refuse_name_clash"]
