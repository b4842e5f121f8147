"""Import and export the ESFT reference adapter layout (deepseek-ai/ESFT).

A reference adapter is a folder holding
- `expert_cfg.json`: `{"experts": {"<layer>": [expert ids]}, "shared_experts": bool,
  "non_expert_modules": bool}`, every MoE layer a key;
- safetensors with full weights keyed like the base checkpoint, e.g.
  `model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight` (mixtral: `w1/w3/w2`), plus the
  shared-expert or non-expert tensors when those flags are set.
Importing needs the base checkpoint (for its identity and the digests of the replaced experts);
it is read lazily, never loaded whole.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from expertlib.checkpoint import BaseCheckpoint
from expertlib.constants import ESFT_EXPERT_CFG, ESFT_WEIGHTS
from expertlib.errors import PatchFormatError, PatchShapeError
from expertlib.moe import ExpertWeights, arch_spec, tensor_digest
from expertlib.patch import ExpertSet, Provenance


def read_expert_cfg(path: str | Path) -> tuple[dict[int, list[int]], dict]:
    """(expert map without empty layers, the raw JSON) of a reference `expert_cfg.json`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        experts = {int(k): sorted(int(e) for e in v) for k, v in raw["experts"].items() if v}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PatchFormatError(
            f"not a valid ESFT expert config: {exc}",
            path=str(path),
            hint='expected {"experts": {"<layer>": [ids]}, "shared_experts": bool, "non_expert_modules": bool}',
        ) from exc
    return experts, raw


def import_esft(
    folder: str | Path, base: str | Path | BaseCheckpoint, *, task: str | None = None
) -> ExpertSet:
    """Turn a reference adapter folder into an ExpertSet for `base` (a model folder)."""
    folder = Path(folder)
    ckpt = base if isinstance(base, BaseCheckpoint) else BaseCheckpoint(base)
    cfg_path = folder / ESFT_EXPERT_CFG
    if not cfg_path.is_file():
        raise PatchFormatError(
            f"{folder} has no {ESFT_EXPERT_CFG}", hint="pass a reference ESFT adapter folder"
        )
    expert_map, raw = read_expert_cfg(cfg_path)
    tensors = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PatchFormatError(
            f"{folder} has no safetensors weights", hint="the adapter weights must be safetensors"
        )
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118
                tensors[k] = h.get_tensor(k)
    spec = ckpt.spec
    if spec.checkpoint_key is None:
        raise PatchFormatError(f"the ESFT reference layout has no per-expert keys for {spec.model_type}")
    experts, used = {}, set()
    for layer, ids in expert_map.items():
        for e in ids:
            keys = [spec.checkpoint_key.format(layer=layer, expert=e, proj=p) for p in spec.proj_names]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise PatchShapeError(
                    f"adapter lacks {missing[0]} (expert_cfg.json lists expert {e} of layer {layer})",
                    path=str(folder),
                    hint="the adapter folder is incomplete or for another architecture",
                )
            experts[(layer, e)] = ExpertWeights(*(tensors[k] for k in keys))
            used.update(keys)
    extra = {k: t for k, t in tensors.items() if k not in used}
    if extra and not (raw.get("shared_experts") or raw.get("non_expert_modules")):
        raise PatchShapeError(
            f"adapter has tensors outside expert_cfg.json: {sorted(extra)[:3]}",
            path=str(folder),
            hint="set shared_experts / non_expert_modules in expert_cfg.json, or remove the extra tensors",
        )
    for layer, e in experts:
        want = ckpt.expert(layer, e)
        got = experts[(layer, e)]
        if [tuple(t.shape) for _, t in got.items()] != [tuple(t.shape) for _, t in want.items()]:
            raise PatchShapeError(
                f"layer {layer} expert {e}: adapter shapes do not match the base", path=str(folder)
            )
    return ExpertSet.build(
        task=task or folder.name,
        base=ckpt.identity,
        experts=experts,
        base_digests={p: ckpt.expert_digest(*p) for p in experts},
        extra_params=extra,
        base_param_digests={k: tensor_digest(ckpt.tensor(k)) for k in extra},
        provenance=Provenance(
            method="esft-reference",
            train_shared_experts=bool(raw.get("shared_experts")),
            train_non_expert_modules=bool(raw.get("non_expert_modules")),
            extra={"imported_from": str(folder)},
        ),
    )


def export_esft(es: ExpertSet, folder: str | Path, *, moe_layers: list[int] | None = None) -> Path:
    """Write `es` as a reference adapter folder (expert_cfg.json + model.safetensors)."""
    m = es.manifest
    spec = arch_spec(m.base.model_type)
    if spec.checkpoint_key is None:
        raise PatchFormatError(f"the ESFT reference layout has no per-expert keys for {spec.model_type}")
    if any(k.endswith("_bias") for k in m.expert_shapes):
        raise PatchFormatError("the ESFT reference layout cannot hold expert biases")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (layer, e), w in es.experts():
        for proj, t in zip(spec.proj_names, (w.gate, w.up, w.down), strict=True):
            tensors[spec.checkpoint_key.format(layer=layer, expert=e, proj=proj)] = t.contiguous()
    tensors.update(es.extra_params())
    layers = sorted(set(moe_layers or []) | set(m.experts))
    cfg = {
        "experts": {str(layer): m.experts.get(layer, []) for layer in layers},
        "shared_experts": m.provenance.train_shared_experts,
        "non_expert_modules": m.provenance.train_non_expert_modules,
    }
    save_file(tensors, str(folder / ESFT_WEIGHTS))
    (folder / ESFT_EXPERT_CFG).write_text(json.dumps(cfg, indent=2))
    return folder
