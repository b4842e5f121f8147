"""`Registry`: the registry folder (`RegistryStore`) plus what builds on it, diff and transfers.

Kept apart so that dependencies run one way: `remotes` (push/pull) and `diff` use the store, and this
class uses them; nothing below imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from expertlib.patch import ExpertSet
from expertlib.registry.local import BaseArg, RegistryStore, translate_storage_errors
from expertlib.registry.names import parse_ref
from expertlib.registry.remotes import pull, push


class Registry(RegistryStore):
    """A local expert-set registry (see `RegistryStore`), which can also diff its sets and push them to,
    or pull them from, another registry folder, an HTTP registry or the Hugging Face Hub."""

    @translate_storage_errors
    def diff(self, refs: Sequence[str], *, base: BaseArg = None, base_dir: str | Path | None = None):
        """Compare expert sets of one base (see `expertlib.registry.diff.diff_expert_sets`)."""
        from expertlib.registry.diff import diff_expert_sets  # imports torch: only when diffing

        entries = [self.resolve(r, base=base) for r in refs]
        sets = [ExpertSet.open(self.blobs.path(e.digest)) for e in entries]
        return diff_expert_sets(sets, [str(e.ref) for e in entries], base_dir=base_dir)

    @translate_storage_errors
    def record_evals(self, ref: str, records, *, base: BaseArg = None):
        """Keep evaluation results with the version `ref` names (see `expertlib.registry.evals`)."""
        from expertlib.registry.evals import record_evals

        return record_evals(self, ref, records, base=base)

    @translate_storage_errors
    def evals(self, ref: str | None = None, *, base: BaseArg = None, entries=None):
        """Stored evaluation results per version: of `ref` (a bare name: every version), or of `entries`."""
        from expertlib.registry.evals import evals_of

        if entries is None:
            spec = parse_ref(ref)
            entries = (
                self.list(base=base, name=spec.name)
                if spec.selector is None
                else [self.resolve(spec, base=base)]
            )
        return evals_of(self, entries)

    @translate_storage_errors
    def push(self, ref: str, dest: str, **kw):
        """Copy `ref` (a name: every version; `name@x`: one) to a folder, HTTP registry or `hf://repo`."""
        return push(self, ref, dest, **kw)

    @translate_storage_errors
    def pull(self, source: str, refs: Sequence[str] = (), **kw):
        """Copy expert sets from a folder, HTTP registry or `hf://repo[@revision]` into this registry."""
        self._writable()
        return pull(self, source, refs, **kw)
