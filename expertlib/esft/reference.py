"""Import and export the ESFT reference adapter layout (deepseek-ai/ESFT).

A reference adapter is a folder holding
- `expert_cfg.json`: `{"experts": {"<layer>": [expert ids]}, "shared_experts": bool,
  "non_expert_modules": bool}`, every MoE layer a key;
- safetensors with full weights keyed like the base checkpoint, e.g.
  `model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight` (mixtral: `w1/w3/w2`), plus the
  shared-expert or non-expert tensors when those flags are set.

What the reference code really does, and what this module follows:
- Its loader (`esft.py`: `to_esft` then `model.load_state_dict(adapter)`, strict) raises
  KeyError on any MoE layer missing from the config, and demands exactly the trainable tensors:
  the listed experts, *all* shared experts when `shared_experts`, *all* other parameters when
  `non_expert_modules`. `export_esft` therefore needs the base checkpoint and writes all of that.
- Its loader renames legacy keys `layers.*` to `model.layers.*`; so does `import_esft`.
- Its trainer (`train.py`: `trainer.save_model(.../last_checkpoint)`) writes the trained
  tensors only, **no** `expert_cfg.json`. `import_esft` takes the config from
  `expert_config=`, or infers it from the tensor names (and records that it did).
- Expert-parallel training (`train_ep.py`) writes one folder per rank
  (`last_checkpoint_ep{r}`), each with its own experts; `import_esft` merges several folders,
  refusing a routed expert found twice and any other tensor found twice with different values.
Importing needs the base checkpoint (for its identity and the digests of the replaced experts);
it is read lazily, never loaded whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from expertlib.checkpoint import BaseCheckpoint
from expertlib.constants import ESFT_EXPERT_CFG, ESFT_WEIGHTS
from expertlib.errors import PatchFormatError, PatchShapeError
from expertlib.fsutil import atomic_path, atomic_write_text
from expertlib.moe import ArchSpec, ExpertWeights, arch_spec, tensor_digest
from expertlib.patch import ExpertSet, Provenance

#: Legacy key prefix the reference loader renames (`layers.*` -> `model.layers.*`).
LEGACY_PREFIX, MODEL_PREFIX = "layers.", "model.layers."
#: Provenance note when the expert config was inferred from tensor names.
INFERRED = "inferred from the tensor names"


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


# --- which checkpoint keys are what, for the reference loader ------------------------------------------


def _spec_with_keys(model_type: str) -> ArchSpec:
    spec = arch_spec(model_type)
    if spec.checkpoint_key is None:
        raise PatchFormatError(f"the ESFT reference layout has no per-expert keys for {spec.model_type}")
    return spec


def routed_key_pattern(spec: ArchSpec) -> re.Pattern:
    """Regex of one routed expert projection's checkpoint key: groups layer, expert, proj."""
    key = re.escape(spec.checkpoint_key)
    projs = "|".join(re.escape(p) for p in spec.proj_names)
    key = key.replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile("^" + key.replace(r"\{proj\}", f"(?P<proj>{projs})") + "$")


@dataclass
class ReferenceLayout:
    """The base checkpoint's keys as the reference loader sees them."""

    moe_layers: list[int]
    #: shared-expert tensors of the MoE layers (trainable with `shared_experts`)
    shared: list[str]
    #: every other tensor outside the routed experts (trainable with `non_expert_modules`)
    other: list[str]


def reference_layout(ckpt: BaseCheckpoint) -> ReferenceLayout:
    spec = _spec_with_keys(ckpt.spec.model_type)
    blocks = {
        layer: spec.checkpoint_key.split(".experts.")[0].format(layer=layer) for layer in ckpt.moe_layers
    }
    routed_prefixes = tuple(f"{b}.experts." for b in blocks.values())
    shared_prefixes = tuple(f"{b}.{spec.shared_attr}" for b in blocks.values()) if spec.shared_attr else ()
    shared, other = [], []
    for key in sorted(ckpt._key_to_file):
        if key.startswith(routed_prefixes):
            continue
        (shared if shared_prefixes and key.startswith(shared_prefixes) else other).append(key)
    return ReferenceLayout(moe_layers=list(ckpt.moe_layers), shared=shared, other=other)


# --- import ------------------------------------------------------------------------------------------


def read_adapter_tensors(folders: Sequence[str | Path], spec: ArchSpec) -> dict[str, torch.Tensor]:
    """All safetensors of one or more adapter folders (per-rank folders of expert-parallel
    training), legacy `layers.*` keys renamed; refuses a routed expert found twice and any other
    tensor found twice with different values."""
    routed = routed_key_pattern(spec)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for folder in map(Path, folders):
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise PatchFormatError(
                f"{folder} has no safetensors weights", hint="the adapter weights must be safetensors"
            )
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():  # noqa: SIM118
                    name = MODEL_PREFIX + key[len(LEGACY_PREFIX) :] if key.startswith(LEGACY_PREFIX) else key
                    t = h.get_tensor(key)
                    if name in tensors:
                        if routed.match(name) or not torch.equal(tensors[name], t):
                            what = "holds the same routed expert" if routed.match(name) else "disagrees on"
                            raise PatchShapeError(
                                f"{f} {what} {name} as {origin[name]}",
                                path=str(folder),
                                hint="pass the per-rank folders of one training run, each once",
                            )
                        continue
                    tensors[name], origin[name] = t, f
    return tensors


def infer_expert_cfg(tensors: dict[str, torch.Tensor], layout: ReferenceLayout, spec: ArchSpec) -> dict:
    """The expert config a trainer's output implies: its routed experts, and the flags its other
    tensors need."""
    routed = routed_key_pattern(spec)
    experts: dict[str, set[int]] = {}
    for key in tensors:
        m = routed.match(key)
        if m:
            experts.setdefault(m["layer"], set()).add(int(m["expert"]))
    if not experts:
        raise PatchFormatError(
            "no routed expert tensors (like "
            f"{spec.checkpoint_key.format(layer=1, expert=0, proj=spec.proj_names[0])}) in the adapter",
            hint="is the folder a trainer output for this architecture?",
        )
    shared = set(layout.shared)
    extras = [k for k in tensors if not routed.match(k)]
    return {
        "experts": {layer: sorted(ids) for layer, ids in sorted(experts.items(), key=lambda x: int(x[0]))},
        "shared_experts": any(k in shared for k in extras),
        "non_expert_modules": any(k not in shared for k in extras),
    }


def import_esft(
    folders: str | Path | Sequence[str | Path],
    base: str | Path | BaseCheckpoint,
    *,
    task: str | None = None,
    expert_config: str | Path | None = None,
) -> ExpertSet:
    """Turn reference adapter folder(s) into an ExpertSet for `base` (a model folder).

    The expert config is `expert_config` when given, else the folders' `expert_cfg.json`, else
    inferred from the tensor names (provenance `extra["expert_config"]` says which). Several
    folders (one per expert-parallel rank) are merged into one set.
    """
    folders = [Path(folders)] if isinstance(folders, str | Path) else [Path(f) for f in folders]
    if not folders:
        raise PatchFormatError("no adapter folder given", hint="pass the reference adapter folder(s)")
    ckpt = base if isinstance(base, BaseCheckpoint) else BaseCheckpoint(base)
    spec = _spec_with_keys(ckpt.spec.model_type)
    where = ", ".join(map(str, folders))
    tensors = read_adapter_tensors(folders, spec)
    layout = reference_layout(ckpt)
    if expert_config is not None:
        expert_map, raw = read_expert_cfg(expert_config)
        cfg_source = str(expert_config)
    else:
        found = [f / ESFT_EXPERT_CFG for f in folders if (f / ESFT_EXPERT_CFG).is_file()]
        configs = [read_expert_cfg(p) for p in found]
        if len({json.dumps(c[0], sort_keys=True) for c in configs}) > 1:
            raise PatchFormatError(
                f"the folders' {ESFT_EXPERT_CFG} files disagree: {', '.join(map(str, found))}",
                hint="pass the training's expert config with --expert-config",
            )
        if configs:
            (expert_map, raw), cfg_source = configs[0], str(found[0])
        else:
            raw = infer_expert_cfg(tensors, layout, spec)
            expert_map = {int(k): v for k, v in raw["experts"].items()}
            cfg_source = INFERRED
    experts, used = {}, set()
    for layer, ids in expert_map.items():
        for e in ids:
            keys = [spec.checkpoint_key.format(layer=layer, expert=e, proj=p) for p in spec.proj_names]
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise PatchShapeError(
                    f"adapter lacks {missing[0]} (the expert config lists expert {e} of layer {layer})",
                    path=where,
                    hint="the adapter folder is incomplete (all per-rank folders given?) or for another architecture",
                )
            experts[(layer, e)] = ExpertWeights(*(tensors[k] for k in keys))
            used.update(keys)
    routed = routed_key_pattern(spec)
    unlisted = sorted(k for k in tensors if k not in used and routed.match(k))
    if unlisted:
        raise PatchShapeError(
            f"adapter has routed experts the expert config does not list: {unlisted[:3]}",
            path=where,
            hint="pass the expert config the adapter was trained with (--expert-config)",
        )
    extra = {k: t for k, t in tensors.items() if k not in used}
    if extra and not (raw.get("shared_experts") or raw.get("non_expert_modules")):
        raise PatchShapeError(
            f"adapter has tensors outside the expert config: {sorted(extra)[:3]}",
            path=where,
            hint="set shared_experts / non_expert_modules in the expert config, or remove the extra tensors",
        )
    for layer, e in experts:
        want = ckpt.expert(layer, e)
        got = experts[(layer, e)]
        if [tuple(t.shape) for _, t in got.items()] != [tuple(t.shape) for _, t in want.items()]:
            raise PatchShapeError(
                f"layer {layer} expert {e}: adapter shapes do not match the base", path=where
            )
    return ExpertSet.build(
        task=task or folders[0].name,
        base=ckpt.identity,
        experts=experts,
        base_digests={p: ckpt.expert_digest(*p) for p in experts},
        extra_params=extra,
        base_param_digests={k: tensor_digest(ckpt.tensor(k)) for k in extra},
        provenance=Provenance(
            method="esft-reference",
            train_shared_experts=bool(raw.get("shared_experts")),
            train_non_expert_modules=bool(raw.get("non_expert_modules")),
            extra={"imported_from": [str(f) for f in folders], "expert_config": cfg_source},
        ),
    )


# --- export ------------------------------------------------------------------------------------------


def export_esft(es: ExpertSet, folder: str | Path, base: str | Path | BaseCheckpoint) -> Path:
    """Write `es` as a folder the reference loader takes (expert_cfg.json + model.safetensors).

    `base` is the checkpoint the set was made for (checked): it supplies the MoE layers (every
    one a key of `expert_cfg.json`) and, when the set trains shared experts or non-expert
    modules, the tensors of those groups the set does not hold, since the reference loads
    strictly and expects the whole group.
    """
    from expertlib.apply import check_against_base
    from expertlib.esft.selection import ExpertConfig

    m = es.manifest
    spec = _spec_with_keys(m.base.model_type)
    if any(k.endswith("_bias") for k in m.expert_shapes):
        raise PatchFormatError("the ESFT reference layout cannot hold expert biases")
    ckpt = base if isinstance(base, BaseCheckpoint) else BaseCheckpoint(base)
    check_against_base(
        es,
        identity=ckpt.identity,
        moe_layers=ckpt.moe_layers,
        num_experts=ckpt.num_experts,
        expert_digest=ckpt.expert_digest,
        hint="export against the base checkpoint the set was made for",
    )
    layout = reference_layout(ckpt)
    extra = es.extra_params()
    shared, other = set(layout.shared), set(layout.other)
    unknown = sorted(k for k in extra if k not in shared and k not in other)
    if unknown:
        raise PatchFormatError(
            f"the set holds parameters the base checkpoint does not name: {unknown[:3]}",
            hint="the reference layout keys extra tensors by their checkpoint names",
        )
    train_shared = m.provenance.train_shared_experts or any(k in shared for k in extra)
    train_other = m.provenance.train_non_expert_modules or any(k in other for k in extra)
    tensors = {}
    for (layer, e), w in es.experts():
        for proj, t in zip(spec.proj_names, (w.gate, w.up, w.down), strict=True):
            tensors[spec.checkpoint_key.format(layer=layer, expert=e, proj=proj)] = t.contiguous()
    for flag, group in ((train_shared, layout.shared), (train_other, layout.other)):
        if flag:
            for k in group:
                tensors[k] = (extra[k] if k in extra else ckpt.tensor(k)).contiguous()
    cfg = ExpertConfig(experts=m.experts, shared_experts=train_shared, non_expert_modules=train_other)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / ESFT_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(
        folder / ESFT_EXPERT_CFG, json.dumps(cfg.to_reference(ckpt.moe_layers), indent=2) + "\n"
    )
    return folder
