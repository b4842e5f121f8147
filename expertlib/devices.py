"""Where models run: `--device auto|cpu|cuda[:N]`, dtypes, device memory, and spreading a base over GPUs.

    device = resolve_device("auto")            # cuda:0 when CUDA is present, else cpu
    model = load_model(base, dtype=torch_dtype("bfloat16")).to(device)
    ids = ids.to(input_device(model))           # the embedding's device (first GPU of a device map)

A base larger than one GPU is spread layer by layer with accelerate's `device_map`
(`load_model(base, device_map="auto")`); `plan_device_map` shows the placement from the config
alone. Expert slots are created on their layer's device, so they live with their layers.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from expertlib.errors import DeviceError

DEVICE_HELP = "Where to run: auto (CUDA when present), cpu, cuda or cuda:N."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for `spec`: auto, cpu, cuda or cuda:N (checked against what is present).

    Under torchrun, `auto` and `cuda` mean this process's GPU (`LOCAL_RANK`).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"--device {spec}: CUDA is not available here",
                hint="use --device cpu or auto, or install the CUDA build of torch (make install ENGINE=gpu)",
            )
        index = local_rank if spec == "cuda" else _index(spec)
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise DeviceError(
                f"--device {spec}: there are {count} CUDA device(s)", hint=f"use cuda:0 .. cuda:{count - 1}"
            )
        return torch.device("cuda", index)
    raise DeviceError(f"unknown device {spec!r}", hint="use auto, cpu, cuda or cuda:N")


def _index(spec: str) -> int:
    try:
        return int(spec.split(":", 1)[1])
    except ValueError:
        raise DeviceError(f"unknown device {spec!r}", hint="use auto, cpu, cuda or cuda:N") from None


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise DeviceError(f"unknown dtype {name!r}", hint=f"use one of {sorted(DTYPES)}") from None


def device_capacity(device: torch.device | str) -> int:
    """Bytes a run may plan for on `device`: a GPU's total memory, or the RAM available now on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().available)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (its only device unless it is spread)."""
    return next(model.parameters()).device


def input_device(model: nn.Module) -> torch.device:
    """Where a batch must go: the input embedding's device (the first stage of a device map)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.device if emb is not None else model_device(model)


def plan_device_map(
    config: Any,
    max_memory: dict[int | str, int | str],
    *,
    dtype: str | torch.dtype = "bfloat16",
) -> dict[str, int | str]:
    """accelerate's placement of a model over devices (`{module: device}`), from the config alone.

    Whole decoder layers stay on one device (the model's `_no_split_modules`), so each layer's
    routed experts, router and (when training or serving sets) slots share a device.
    """
    from accelerate import infer_auto_device_map
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    return dict(
        infer_auto_device_map(
            model, max_memory=max_memory, no_split_module_classes=no_split, dtype=torch_dtype(dtype)
        )
    )


def layer_devices(device_map: dict[str, int | str], num_layers: int) -> dict[int, int | str]:
    """Decoder layer index -> device, from a device map (most specific prefix wins)."""
    out = {}
    for i in range(num_layers):
        name = f"model.layers.{i}"
        hits = [k for k in device_map if name == k or name.startswith(k + ".") or k.startswith(name + ".")]
        if not hits and "" in device_map:
            hits = [""]
        if not hits:
            hits = [k for k in device_map if name.startswith(k)]
        out[i] = device_map[max(hits, key=len)] if hits else "?"
    return out
