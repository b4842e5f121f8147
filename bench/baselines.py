"""The comparison methods the ESFT benchmarks share: full fine-tuning and LoRA (PEFT)."""

from __future__ import annotations

#: LoRA rank 8 on attention, dense/shared-expert MLPs and the fused routed experts.
LORA_KWARGS = dict(
    r=8,
    lora_alpha=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
)


def trainable_baseline(model, method: str):
    """`model` with every parameter trainable ("full"), or wrapped in a PEFT LoRA model ("lora")."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(**LORA_KWARGS))
    raise ValueError(f"unknown baseline {method!r}")
