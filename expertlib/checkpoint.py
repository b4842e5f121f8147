"""Read a base model's routed experts straight from its checkpoint files, without loading the model.

The registry, the serving engine and the ESFT importer need the base's identity and the digests
of a few base experts. Loading a 16B-parameter model for that is absurd, so this opens the
safetensors files lazily (`safe_open`) and reads only the tensors asked for.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

from safetensors import safe_open

from expertlib.errors import ModelLoadError, PatchShapeError
from expertlib.identity import BaseIdentity, base_identity, load_config
from expertlib.moe import ArchSpec, ExpertWeights, arch_spec, expert_views, experts_module, moe_layer_indices


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
        self._digests: dict[tuple[int, int], str] = {}

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
        key = (layer, expert)
        if key not in self._digests:
            self._digests[key] = self.expert(layer, expert).digest()
        return self._digests[key]

    def tensor(self, name: str):
        """Any full tensor by its checkpoint key."""
        return self._tensor(name)
