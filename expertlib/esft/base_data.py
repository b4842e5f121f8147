"""Reference data a base model folder may ship beside its weights, which ESFT's steps read:

    reference_data/general/TASK.jsonl   its general skills: `--keep builtin`, `--general builtin`
    reference_data/anchors/TASK.jsonl   what it already does: the base anchors `model="auto"` weighs

Files in the training format, one per task, read in name order. The demo base ships both (its
general tasks' eval prompts and its pretraining tasks; `expertlib.demo.base.write_reference_data`);
any base folder may.

    shipped = reference_samples(base, GENERAL, tokenizer)      # {task: [Sample]}; {} when none
"""

from __future__ import annotations

from pathlib import Path

from expertlib.constants import REFERENCE_DATA_DIR

#: The kinds of reference data (sub-folders of `REFERENCE_DATA_DIR`).
GENERAL, ANCHORS = "general", "anchors"


def reference_files(base: str | Path, kind: str) -> dict[str, Path]:
    """Task name -> file of the `kind` reference data `base` ships (empty when it ships none)."""
    folder = Path(str(base)) / REFERENCE_DATA_DIR / kind
    return {p.stem: p for p in sorted(folder.glob("*.jsonl"))} if folder.is_dir() else {}


def reference_samples(
    base: str | Path, kind: str, tokenizer, *, n: int | None = None, max_length: int = 2048
) -> dict[str, list]:
    """Task name -> the first `n` (default: all) samples of each `kind` file `base` ships, encoded."""
    from expertlib.esft.data import load_samples

    return {
        task: load_samples(path, tokenizer, max_length=max_length)[:n]
        for task, path in reference_files(base, kind).items()
    }
