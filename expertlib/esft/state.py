"""Resumable training state: trainable tensors, AdamW state, RNG and loss history, written atomically.

This is what `--checkpoint-dir` holds and `--resume` reads back, so that a resumed run ends
exactly where an uninterrupted one would. (It is not the base model's checkpoint on disk:
that is `expertlib.checkpoint.BaseCheckpoint`.)

The saved state is a folder with `state.safetensors` (tensors only; never pickled) and
`trainer.json` (step, losses, and the run key: selection, settings and data digest, which
must match to resume). It is written to a temporary folder and swapped in, so a crash leaves
the previously saved state intact.

    state = load_training_state(folder, params, opt, key) if has_training_state(folder) else TrainingState()
    save_training_state(folder, params, opt, state, key)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from expertlib.errors import DataError

STATE_FILE = "state.safetensors"
TRAINER_FILE = "trainer.json"
_OPT_KEYS = ("step", "exp_avg", "exp_avg_sq")


@dataclass
class TrainingState:
    """Where a run is: optimizer steps done, the losses so far, the time it has taken."""

    step: int = 0
    train_losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    wall_time_s: float = 0.0


def _current(path: Path) -> Path | None:
    """The complete saved-state folder: `path`, or its `.old` twin if a swap was interrupted."""
    for p in (path, path.with_name(path.name + ".old")):
        if (p / TRAINER_FILE).is_file() and (p / STATE_FILE).is_file():
            return p
    return None


def has_training_state(path: str | Path) -> bool:
    """Whether `path` holds a complete saved state to resume from."""
    return _current(Path(path)) is not None


def save_training_state(
    path: str | Path,
    params: list[tuple[str, nn.Parameter]],
    opt: torch.optim.Optimizer,
    state: TrainingState,
    key: dict,
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params}
    for n, p in params:
        for k, v in opt.state.get(p, {}).items():
            if k in _OPT_KEYS:
                tensors[f"opt.{n}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / STATE_FILE))
        (tmp / TRAINER_FILE).write_text(json.dumps({"key": key, **asdict(state)}, indent=1))
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_training_state(
    path: str | Path,
    params: list[tuple[str, nn.Parameter]],
    opt: torch.optim.Optimizer,
    key: dict,
) -> TrainingState:
    """Restore tensors, optimizer and RNG in place; refuse a checkpoint of another run."""
    found = _current(Path(path))
    if found is None:
        raise DataError("no checkpoint to resume from", path=str(path), hint="drop --resume to start afresh")
    meta = json.loads((found / TRAINER_FILE).read_text())
    want = json.loads(json.dumps(key))  # as it would read back from JSON
    if meta["key"] != want:
        diff = _differences(meta["key"], want)
        raise DataError(
            f"the checkpoint belongs to another run (differs in {diff})",
            path=str(found),
            hint="resume with the same data, base, selection and settings, or use a fresh --checkpoint-dir",
        )
    tensors = load_file(str(found / STATE_FILE))
    with torch.no_grad():
        for n, p in params:
            p.copy_(tensors[f"param.{n}"])
            st = {k: tensors[f"opt.{n}.{k}"].clone() for k in _OPT_KEYS if f"opt.{n}.{k}" in tensors}
            if st:
                opt.state[p] = st
    torch.set_rng_state(tensors["rng.torch"])
    return TrainingState(
        step=meta["step"],
        train_losses=list(meta["train_losses"]),
        eval_losses=[(int(s), float(v)) for s, v in meta["eval_losses"]],
        wall_time_s=float(meta["wall_time_s"]),
    )


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ (one level into nested dicts)."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict) and not prefix:
            out += _differences(x, y, f"{k}.")
        else:
            out.append(prefix + k)
    return out
