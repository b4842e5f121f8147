"""Data-parallel training: 2 CPU processes (torchrun, gloo) equal one process on the combined batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expertlib.checkpoint import BaseCheckpoint
from expertlib.esft.distributed import DistContext, all_reduce_gradients
from expertlib.esft.selection import ExpertConfig
from expertlib.patch import ExpertSet

WORKER = Path(__file__).with_name("dp_worker.py")


def test_shard_splits_a_global_batch_in_rank_order():
    items = list(range(8))
    assert DistContext(0, 2).shard(items) == [0, 1, 2, 3]
    assert DistContext(1, 2).shard(items) == [4, 5, 6, 7]
    assert DistContext().shard(items) == items


def test_all_reduce_is_a_no_op_in_one_process():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    all_reduce_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def _run(args: list[str], nproc: int, tmp: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    else:
        cmd = [sys.executable]
    res = subprocess.run(
        [*cmd, str(WORKER), *args], env=env, cwd=tmp, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one_on_the_combined_batch(tmp_path, tiny_model_dir):
    base = tiny_model_dir("qwen2_moe")
    data = tmp_path / "task.jsonl"
    words = ["abc", "hello", "q", "zebra", "mno", "catdog", "x", "longer word"]
    # uneven lengths: each process pads its share differently from the combined batch
    rows = [{"prompt": f"twice {w}", "completion": w + w} for w in words * 2]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sel = tmp_path / "experts.json"
    ExpertConfig(experts={0: [1, 4], 1: [2]}).save(sel)
    common = [str(base), str(data), str(sel)]
    _run([*common, str(tmp_path / "dp.safetensors"), "2"], 2, tmp_path)  # 2 x 2 sequences per micro-batch
    _run([*common, str(tmp_path / "one.safetensors"), "4"], 1, tmp_path)  # 1 x 4: the combined batch
    dp, one = (ExpertSet.open(tmp_path / f"{n}.safetensors") for n in ("dp", "one"))
    dp_t, one_t = _tensors(dp), _tensors(one)
    assert dp_t.keys() == one_t.keys() and len(dp_t) > 0
    # Adam moves each weight by ~lr (3e-3) per step: 1e-5 is float noise, a rank training on its
    # own half (no all-reduce) or a wrong token normalisation differs by far more
    worst = max(float((dp_t[k] - one_t[k]).abs().max()) for k in dp_t)
    assert worst < 1e-5, worst
    before = BaseCheckpoint(base).expert(0, 1).gate
    assert float((dp.expert(0, 1).gate.float() - before.float()).abs().max()) > 1e-3  # it trained
    p_dp, p_one = dp.manifest.provenance, one.manifest.provenance
    assert p_dp.final_train_loss == pytest.approx(p_one.final_train_loss, rel=1e-5)


def _tensors(es: ExpertSet) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(es.path)).items()}
