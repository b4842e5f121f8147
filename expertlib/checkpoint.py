"""Read a base model's routed experts straight from its checkpoint files, without loading the model.

The registry, the serving engine and the ESFT importer need the base's identity and the digests
of a few base experts. Loading a 16B-parameter model for that is absurd, so this opens the
safetensors files lazily (`safe_open`) and reads only the tensors asked for.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

from safetensors import safe_open

from expertlib.constants import BASE_DIGESTS_DIR
from expertlib.errors import ModelLoadError, PatchShapeError
from expertlib.fsutil import cache_dir
from expertlib.identity import BaseIdentity, base_identity, load_config
from expertlib.moe import (
    ArchSpec,
    ExpertWeights,
    arch_spec,
    expert_digest,
    expert_views,
    experts_module,
    moe_layer_indices,
)


class BaseCheckpoint:
    """A base model folder (config.json + *.safetensors), read lazily; one open handle per shard."""

    def __init__(self, path: str | Path):

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ModelLoadError(
                f"{self.path} has no config.json",
                hint="pass a local model folder written by save_pretrained",
            )
        self.config = load_config(self.path)
        self.spec: ArchSpec = arch_spec(self.config.model_type)
        self._handles: dict[Path, object] = {}
        self._digests: dict[tuple[int, int], str] | None = None  # read from the digest cache on first use

    @cached_property
    def identity(self) -> BaseIdentity:
        return base_identity(self.config, name=str(self.path))

    @cached_property
    def _layout(self) -> tuple[list[int], int]:
        """MoE layer indices and routed expert count, from a weightless (meta) instance of the model."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.config)
        layers = moe_layer_indices(skeleton)
        return layers, int(experts_module(skeleton, layers[0]).num_experts)

    @property
    def moe_layers(self) -> list[int]:
        return self._layout[0]

    @property
    def num_experts(self) -> int:
        return self._layout[1]

    @cached_property
    def _key_to_file(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {k: self.path / f for k, f in weight_map.items()}
        out = {}
        for f in sorted(self.path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out.update(dict.fromkeys(h.keys(), f))  # noqa: SIM118
        if not out:
            raise ModelLoadError(
                f"{self.path} has no safetensors weights", hint="save the model with safetensors"
            )
        return out

    def _tensor(self, key: str, index: int | None = None):
        try:
            f = self._key_to_file[key]
        except KeyError:
            raise PatchShapeError(
                f"{self.path}: checkpoint has no tensor {key!r}",
                hint="is this the base model the expert set was made for?",
            ) from None
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), framework="pt")
        h = self._handles[f]
        return h.get_slice(key)[index : index + 1] if index is not None else h.get_tensor(key)

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        """Routed expert `expert` of layer `layer`, in canonical form."""
        spec = self.spec
        if spec.checkpoint_key is not None:
            keys = [spec.checkpoint_key.format(layer=layer, expert=expert, proj=p) for p in spec.proj_names]
            if all(k in self._key_to_file for k in keys):
                gate, up, down = (self._tensor(k) for k in keys)
                return ExpertWeights(gate=gate, up=up, down=down)
        # fused on disk: gpt_oss always (transposed, interleaved, biases); others when saved fused
        prefix = (spec.checkpoint_key or "model.layers.{layer}.mlp.experts").split(".experts")[0]
        prefix = prefix.format(layer=layer) + ".experts."
        gpt_oss = spec.model_type == "gpt_oss"
        ns = SimpleNamespace(
            gate_up_proj=self._tensor(prefix + "gate_up_proj", expert),
            down_proj=self._tensor(prefix + "down_proj", expert),
            gate_up_proj_bias=self._tensor(prefix + "gate_up_proj_bias", expert) if gpt_oss else None,
            down_proj_bias=self._tensor(prefix + "down_proj_bias", expert) if gpt_oss else None,
            is_transposed=gpt_oss,
            is_concatenated=not gpt_oss,
            has_bias=gpt_oss,
        )
        return expert_views(ns, 0).map(lambda t: t.contiguous())

    @cached_property
    def expert_shapes(self) -> dict[str, list[int]]:
        """Canonical part -> shape of a routed expert (the same for every expert of the model)."""
        return {part: list(t.shape) for part, t in self.expert(self.moe_layers[0], 0).items()}

    def expert_digest(self, layer: int, expert: int) -> str:
        """The digest of a base expert (`expertlib.moe.expert_digest`), what a set's
        `base_expert_digests` are checked against. Hashing a real-size expert takes ~45 ms, so each
        is computed once and kept in a small file under the user cache dir (`digest_cache_file`),
        whose name covers the checkpoint's files as they are now: any change to them (content,
        inode, mtime, ctime) gives another file, and the digests are computed again."""
        if self._digests is None:
            self._digests = _read_digests(self.digest_cache_file)
        key = (layer, expert)
        if key not in self._digests:
            self._digests[key] = self.expert(layer, expert).digest()
            _append_digest(self.digest_cache_file, key, self._digests[key])
        return self._digests[key]

    @cached_property
    def digest_cache_file(self) -> Path | None:
        """`$EXPERTLIB_CACHE/base-digests/<sha256 of the checkpoint's identity>.jsonl`: the identity is
        the resolved folder, every weight file's name and state (device, inode, size, mtime_ns,
        ctime_ns: ctime cannot be set back by hand) and the digest rule itself (the digest of a
        fixed expert), so a cache is never read for other bytes or by code that digests otherwise.
        None (no cache) when a weight file cannot be stat'ed."""
        from expertlib.verify import FileKey

        files = sorted(set(self._key_to_file.values()))
        keys = [FileKey.of(f) for f in files]
        if any(k is None for k in keys):
            return None
        ident = {
            "path": str(self.path.resolve()),
            "files": [[f.name, *k] for f, k in zip(files, keys, strict=True)],
            "rule": _digest_rule(),
        }
        name = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        return cache_dir() / BASE_DIGESTS_DIR / f"{name}.jsonl"

    def tensor(self, name: str):
        """Any full tensor by its checkpoint key."""
        return self._tensor(name)


def _digest_rule() -> str:
    """The digest of a fixed tiny expert: changes whenever `expert_digest` hashes otherwise."""
    import torch

    w = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    return expert_digest(ExpertWeights(gate=w, up=-w, down=w.T.contiguous()))


def _read_digests(path: Path | None) -> dict[tuple[int, int], str]:
    """The digests kept in `path`, one JSON line [layer, expert, digest] each; lines that do not
    parse (a write cut short) are skipped and computed again."""
    out: dict[tuple[int, int], str] = {}
    if path is None:
        return out
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            layer, expert, digest = json.loads(line)
        except (ValueError, TypeError):
            continue
        if isinstance(layer, int) and isinstance(expert, int) and isinstance(digest, str):
            out[(layer, expert)] = digest
    return out


def _append_digest(path: Path | None, key: tuple[int, int], digest: str) -> None:
    """Add one digest to the cache file: one short append (whole lines even when several processes
    append at once); a cache that cannot be written is no error, only slower next time."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps([key[0], key[1], digest]) + "\n")
    except OSError:
        pass
