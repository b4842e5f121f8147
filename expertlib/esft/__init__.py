"""The ESFT pipeline (Expert-Specialized Fine-Tuning): task data in, a trained expert set out.

One module per step, in the order a run takes them (`expertlib train`, `train_esft`):

    data.py            jsonl (chat messages, prompt/completion, text) -> token ids + labels
    scoring.py         routing recorded on forward passes -> ESFT-Token / ESFT-Gate scores
    selection.py       top-p per layer -> ExpertConfig (the reference's expert_cfg.json)
    memory_plan.py     what a run needs in memory, from the config alone, checked before loading
    training.py        the selected experts in trainable slots, AdamW on them (`train_experts`)
    state.py           resumable training state (`--checkpoint-dir`): tensors, AdamW, RNG, losses
    distributed.py     data-parallel training under torchrun / accelerate launch
    pipeline.py        `train_esft`: the whole run; its settings in groups (data, selection,
                       optimisation, runtime) that the CLI's options are generated from
    diagnostics.py     does the premise hold: expert specialisation, retention risk of a selection
    reference.py       import/export of the deepseek-ai/ESFT adapter layout
    reference_logs.py  the reference code's routing logs read as scores

Nothing here imports the serving side (engine, vLLM plugin, server); the result is an
`expertlib.patch.ExpertSet`, which the registry stores and the engine serves. Import the
modules by their full names (`from expertlib.esft.training import train_experts`).
"""
