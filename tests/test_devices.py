"""Device selection, and spreading a base over GPUs with accelerate's device_map (planned on CPU)."""

from __future__ import annotations

import pytest
import torch

from expertlib.devices import input_device, layer_devices, plan_device_map, resolve_device, torch_dtype
from expertlib.errors import DeviceError
from expertlib.shape import ModelShape
from expertlib.testing import make_tiny_model, tiny_config


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(DeviceError, match="CUDA is not available") as err:
        resolve_device("cuda:1")
    assert "--device cpu" in str(err.value)
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun: auto is this process's GPU
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_dtype_names():
    assert torch_dtype("bfloat16") is torch.bfloat16 and torch_dtype(torch.float32) is torch.float32
    with pytest.raises(DeviceError):
        torch_dtype("int3")


def test_batches_go_to_the_embedding_device():
    model = make_tiny_model("qwen3_moe")
    assert input_device(model) == torch.device("cpu")


def test_device_map_spreads_whole_layers_over_gpus():
    cfg = tiny_config("qwen2_moe", num_hidden_layers=6)
    total = ModelShape.from_config(cfg).total_params * 2  # bf16 bytes
    dm = plan_device_map(cfg, {0: int(total * 0.7), 1: int(total * 0.7)}, dtype="bfloat16")
    assert set(dm.values()) == {0, 1}  # both GPUs used, nothing offloaded to the CPU or disk
    # whole decoder layers: experts, router and (when installed) slots of a layer share a device
    assert not any(k.startswith("model.layers.") and k.count(".") > 2 for k in dm)
    per_layer = layer_devices(dm, 6)
    assert list(per_layer.values()) == sorted(per_layer.values())  # first layers on GPU 0, then GPU 1
    assert per_layer[0] == 0 and per_layer[5] == 1


def test_gpu_check_stops_with_a_clear_message_without_a_gpu(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"  # a driver tool that lists no GPU
    smi.write_text("#!/bin/sh\necho 'No devices were found' >&2\nexit 6\n")
    smi.chmod(0o755)
    # shadows any real nvidia-smi: the check stops before running anything, its log under $OUT
    res = subprocess.run(
        ["bash", str(script)],
        env={"PATH": f"{fake}:/usr/bin:/bin", "OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    assert "no CUDA GPU here" in res.stderr and "make test" in res.stderr
    assert res.stdout == "" and [p.name for p in (tmp_path / "out").iterdir()] == ["gpu_check.log"]
