"""Real-shape benchmark: the per-layer shapes of DeepSeek-V2-Lite, Qwen3-30B-A3B and OLMoE-1B-7B,
random bf16 weights, truncated depth, on CPU; measured figures extrapolated to the full depth.

    python bench/scale.py [--models deepseek-v2-lite,qwen3-30b-a3b,olmoe-1b-7b] [--moe-layers 1]
                          [--batch 1 --seq 256] [--steps 2] [--no-write]

Per model, in one run: an ESFT step (1/8 of each layer's experts trained, AdamW) against a full
fine-tuning step of the same model, both timed and with their peak tensor memory measured
(`expertlib.esft.memory_plan.PeakTracker`, exact on CPU) and set against the memory plan's arithmetic.
The steps compute in float32: a CPU without AVX512-BF16/AMX multiplies bf16 matrices ~100x slower
than float32 (both measured and printed), which would time the fallback kernel, not the method.
Then, with the weights cast to bf16 (the checkpoints' dtype): the patch's bytes against the checkpoint's; hot load (patch file ->
slots) against a plain memcpy of the same bytes; registry publish and push/pull against a plain
file copy; slot memory per loaded set against the patch bytes. Then the full-depth table: the
memory plan for the real config (exact parameter counts from a weightless model), step time and
bytes scaled by the number of MoE layers. Writes its section of bench/RESULTS.md.

The vocabulary is cut to 8192 in the measured models (embedding and head only; the full-depth
figures use the real vocabulary). Mixed-batch throughput with 16 and 32 sets and the vLLM engine's
memory per set at these shapes are bench/serve_scale.py's (`make bench-scale-serve`, ~25 min on 2
CPUs, too long to add to these 15 minutes).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

SECTION = "## Real shapes (DeepSeek-V2-Lite, Qwen3-30B-A3B, OLMoE-1B-7B; CPU, truncated depth)"
MEASURED_VOCAB = 8192

#: Per-layer shapes of the real models (their config.json), and their full depth.
MODELS: dict[str, dict] = {
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2",
        num_hidden_layers=27,
        hidden_size=2048,
        vocab_size=102400,
        n_routed_experts=64,
        moe_intermediate_size=1408,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        intermediate_size=10944,
        num_attention_heads=16,
        num_key_value_heads=16,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rope_scaling=None,
        tie_word_embeddings=False,
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe",
        num_hidden_layers=48,
        hidden_size=2048,
        vocab_size=151936,
        num_experts=128,
        moe_intermediate_size=768,
        num_experts_per_tok=8,
        intermediate_size=6144,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    ),
    "olmoe-1b-7b": dict(
        model_type="olmoe",
        num_hidden_layers=16,
        hidden_size=2048,
        vocab_size=50304,
        num_experts=64,
        intermediate_size=1024,
        num_experts_per_tok=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    ),
}


def make_config(name: str, *, moe_layers: int | None = None):
    """The model's config; with `moe_layers`, truncated to that many MoE layers and the cut vocabulary."""
    from transformers import AutoConfig

    kw = dict(MODELS[name])
    model_type = kw.pop("model_type")
    if moe_layers is not None:
        kw["num_hidden_layers"] = moe_layers + kw.get("first_k_dense_replace", 0)
        kw["vocab_size"] = MEASURED_VOCAB
    return AutoConfig.for_model(model_type, **kw)


def matmul_gflops(dtype: torch.dtype) -> float:
    a, b = torch.randn(512, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    return 2 * 512 * 2048 * 2048 / timed(lambda: a @ b) / 1e9


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def mb_s(nbytes: int, seconds: float) -> float:
    return nbytes / 2**20 / max(seconds, 1e-9)


def esft_step(model, selection, batch: torch.Tensor, steps: int):
    """(median step seconds, peak bytes beyond the base, TrainResult) of ESFT (AdamW, float32)."""
    from expertlib.esft.data import Sample
    from expertlib.esft.memory_plan import PeakTracker
    from expertlib.esft.training import TrainConfig, train_experts

    samples = [Sample(tuple(r.tolist()), tuple(r.tolist()), 0) for r in batch]
    cfg = TrainConfig(lr=1e-5, steps=steps + 1, batch_size=len(samples))  # float32 (see the docstring)
    stamps: list[float] = []
    with PeakTracker() as tracker:
        res = train_experts(
            model, samples, selection, cfg, pad_id=0, progress=False,
            on_step=lambda s, loss: stamps.append(time.perf_counter()),
        )  # fmt: skip
    step_s = statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    return step_s, tracker.peak, res


def fft_step(model, batch: torch.Tensor, steps: int) -> tuple[float, int, float]:
    """Full fine-tuning in float32: (median forward+backward seconds with every parameter trained,
    peak bytes beyond the weights: gradients and activations, AdamW update seconds per parameter).

    AdamW's state (8 bytes a parameter in float32, exact: tests/test_memory_plan.py) is added by
    arithmetic and its update timed on a 32M-parameter slice: holding it for a whole layer of 64-128
    experts would not fit next to other jobs on the shared benchmark machine."""
    from baselines import trainable_baseline

    from expertlib.esft.memory_plan import PeakTracker

    model = trainable_baseline(model, "full")
    model.train()
    times = []
    with PeakTracker() as tracker:
        for _ in range(steps + 1):
            t = time.perf_counter()
            logits = model(input_ids=batch, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
            )
            loss.backward()
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    chunk = torch.nn.Parameter(torch.randn(32 * 2**20))
    chunk.grad = torch.randn_like(chunk)
    opt = torch.optim.AdamW([chunk], lr=1e-5)
    opt.step()
    adam_s = statistics.median(timed(opt.step) for _ in range(3)) / chunk.numel()
    del opt, chunk
    return statistics.median(times[1:]), tracker.peak, adam_s


def hot_load(model, patch_path: Path) -> tuple[float, float, int]:
    """(seconds to read the patch file into slots + remap, seconds of a memcpy of those bytes, bytes)."""
    from expertlib.patch import ExpertSet
    from expertlib.slots import install_slots, remove_slots, set_remap, write_slot

    es = ExpertSet.open(patch_path)
    per_layer: dict[int, list[int]] = es.manifest.experts
    install_slots(model, {layer: len(ids) for layer, ids in per_layer.items()}, max_sets=1)
    try:
        slot_bytes = sum(
            p.numel() * p.element_size() for n, p in model.named_parameters() if ".expertlib_slots." in n
        )

        def load() -> None:
            fresh = ExpertSet.open(patch_path)  # the file as the engine gets it: header, validation, tensors
            for layer, ids in per_layer.items():
                for slot, e in enumerate(ids):
                    write_slot(model, layer, slot, fresh.expert(layer, e))
                set_remap(model, 1, layer, {e: s for s, e in enumerate(ids)})

        load()  # page cache warm, as for a set pulled a moment ago
        t_load = statistics.median(timed(load) for _ in range(3))
        src = torch.empty(slot_bytes, dtype=torch.uint8).random_()
        dst = torch.empty_like(src)
        dst.copy_(src)
        t_copy = statistics.median(timed(lambda: dst.copy_(src)) for _ in range(5))
    finally:
        remove_slots(model)
    return t_load, t_copy, slot_bytes


def registry_io(patch_path: Path, root: Path) -> dict[str, float]:
    """MB/s of publish (validate + hash + store), push to a folder and pull back, and of a plain copy."""
    from expertlib.registry import Registry

    size = patch_path.stat().st_size
    out = {}
    reg = Registry(root / "reg")
    out["publish"] = mb_s(size, timed(lambda: reg.publish(patch_path, task="bench")))
    out["push"] = mb_s(size, timed(lambda: reg.push("bench", str(root / "remote"))))
    other = Registry(root / "reg2")
    out["pull"] = mb_s(size, timed(lambda: other.pull(str(root / "remote"))))
    out["copy"] = mb_s(size, timed(lambda: shutil.copyfile(patch_path, root / "plain.copy")))
    return out


def bench_model(name: str, args, root: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from expertlib.esft.memory_plan import plan_training
    from expertlib.esft.selection import ExpertConfig
    from expertlib.identity import base_identity
    from expertlib.moe import moe_layer_indices
    from expertlib.shape import ModelShape

    cfg = make_config(name, moe_layers=args.moe_layers)
    t = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    init_s = time.perf_counter() - t
    shape = ModelShape.from_config(cfg)
    layers = moe_layer_indices(model)
    per_layer = max(1, shape.num_experts // 8)
    selection = ExpertConfig(
        experts={layer: list(range(0, shape.num_experts, 8))[:per_layer] for layer in layers}
    )
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(1, MEASURED_VOCAB, (args.batch, args.seq), generator=g)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    esft_s, esft_peak, res = esft_step(model, selection, batch, args.steps)
    plan = plan_training(
        cfg, trained_experts=selection.num_experts, batch_size=args.batch, seq_len=args.seq, shape=shape
    )
    gc.collect()
    fft_s, fft_peak, adam_s = fft_step(model, batch, max(1, args.steps - 1))
    fft_plan = full_ft_plan(cfg, shape, args, dtype="float32")
    adam_state = 8 * shape.total_params
    fft_s += adam_s * shape.total_params
    gc.collect()
    model.to(torch.bfloat16)  # bytes, loads and copies in the checkpoints' dtype
    base_bytes_bf16 = sum(p.numel() * p.element_size() for p in model.parameters())
    es = res.expert_set(task="bench", base=base_identity(model), dtype=torch.bfloat16)
    patch = es.save(root / f"{name}.safetensors")
    patch_bytes = patch.stat().st_size
    ckpt_dir = root / f"{name}-base"
    save_s = timed(partial(model.save_pretrained, str(ckpt_dir)))
    ckpt_bytes = sum(f.stat().st_size for f in ckpt_dir.glob("*.safetensors"))
    load_s, copy_s, slot_bytes = hot_load(model, patch)
    reg = registry_io(patch, root / f"{name}-registry")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    n_trained = res.trainable_params
    del model, res, es
    gc.collect()

    full_cfg = make_config(name)
    full = ModelShape.from_config(full_cfg)
    n_full = len(full.moe_layers)
    scale = n_full / len(layers)
    full_esft = plan_training(
        full_cfg, trained_experts=per_layer * n_full, batch_size=args.batch, seq_len=args.seq,
        dtype="bfloat16", master_dtype="float32", shape=full,
    )  # fmt: skip
    full_fft = full_ft_plan(full_cfg, full, args)
    return dict(
        name=name,
        init_s=init_s,
        save_s=save_s,
        layers=len(layers),
        full_layers=full.num_layers,
        n_full_moe=n_full,
        experts=f"{per_layer}/{shape.num_experts}",
        trained_params=n_trained,
        base_bytes=base_bytes,
        esft_s=esft_s,
        esft_peak=base_bytes + esft_peak,
        esft_plan=plan.total,
        fft_s=fft_s,
        fft_peak=base_bytes + fft_peak + adam_state,
        base_bytes_bf16=base_bytes_bf16,
        fft_plan=fft_plan.total,
        patch_bytes=patch_bytes,
        ckpt_bytes=ckpt_bytes,
        load_s=load_s,
        copy_s=copy_s,
        slot_bytes=slot_bytes,
        reg=reg,
        full=dict(
            esft_s=esft_s * scale,
            fft_s=fft_s * scale,
            esft_mem=full_esft.total,
            esft_parts=full_esft.to_dict(),
            fft_mem=full_fft.total,
            fft_state=full_fft.gradients + full_fft.optimizer,
            patch=patch_bytes * scale,
            ckpt=full.total_params * 2,
            load_s=load_s * scale,
        ),
    )


def full_ft_plan(cfg, shape, args, dtype: str = "bfloat16"):
    """Full FT as a memory plan: every parameter trained (grads and AdamW state in `dtype`: pure bf16
    is the cheapest full FT), activations kept from the embedding on."""
    from expertlib.esft.memory_plan import plan_training

    return plan_training(
        cfg, trained_experts=0, extra_trained_params=shape.total_params, batch_size=args.batch,
        seq_len=args.seq, dtype=dtype, master_dtype=dtype, shape=shape,
    )  # fmt: skip


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def report(rows: list[dict], args, wall_s: float) -> str:
    import os

    lines = [
        SECTION,
        "",
        f"`make bench-scale` (bench/scale.py): {args.moe_layers} MoE layer(s) per model (DeepSeek-V2-Lite "
        f"also its dense layer 0), vocabulary cut to {MEASURED_VOCAB}, random weights, batch "
        f"{args.batch} x {args.seq} tokens, ESFT trains 1/8 of each layer's experts with AdamW; full FT "
        f"trains every parameter with AdamW. Steps compute in float32 (this CPU: "
        f"{args.gflops['float32']:.0f} GFLOPS float32, {args.gflops['bfloat16']:.1f} bf16 matmul, no bf16 "
        f"hardware); bytes, hot load and registry use the bf16 weights. Peak = weights + the tensors a "
        f"step allocates (exact, `PeakTracker`; full FT's AdamW state, 8 B/param, added by arithmetic and "
        f"its update timed on a slice). {os.cpu_count()} CPUs shared with other jobs (load average "
        f"{os.getloadavg()[0]:.1f} at the end); run took {wall_s / 60:.1f} min.",
        "",
        "Measured (truncated depth):",
        "",
        "| model | experts/layer trained | ESFT step (s) | full FT step (s) | ESFT peak (GiB) [plan] "
        "| full FT peak (GiB) [plan] | patch bf16 (MiB) | checkpoint bf16 (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['experts']} | {r['esft_s']:.2f} | {r['fft_s']:.2f} | {gib(r['esft_peak'])} "
            f"[{gib(r['esft_plan'])}] | {gib(r['fft_peak'])} [{gib(r['fft_plan'])}] | {mib(r['patch_bytes'])} "
            f"| {mib(r['ckpt_bytes'])} |"
        )
    lines += [
        "",
        "| model | hot load (ms) | hot load MB/s | memcpy MB/s | slot memory per set (MiB) / patch (MiB) "
        "| publish MB/s | push MB/s | pull MB/s | file copy MB/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r["reg"]
        lines.append(
            f"| {r['name']} | {r['load_s'] * 1e3:.0f} | {mb_s(r['slot_bytes'], r['load_s']):.0f} | "
            f"{mb_s(r['slot_bytes'], r['copy_s']):.0f} | {mib(r['slot_bytes'])} / {mib(r['patch_bytes'])} | "
            f"{g['publish']:.0f} | {g['push']:.0f} | {g['pull']:.0f} | {g['copy']:.0f} |"
        )
    lines += [
        "",
        "Extrapolated to full depth (memory: the memory plan on the real config, real vocabulary, same "
        "batch, bf16 base with fp32 master experts for ESFT, pure bf16 for full FT (its cheapest form); "
        "CPU float32 step times, patch bytes and hot load: x the number of MoE layers):",
        "",
        "| model | layers (MoE) | ESFT step (s) | full FT step (s) | ESFT memory (GiB) | full FT memory (GiB) "
        "| patch (MiB) | checkpoint (GiB) | hot load (s) | largest part of ESFT memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["full"]
        parts = {k: v for k, v in f["esft_parts"].items() if k not in ("total", "trained_params")}
        top = max(parts, key=parts.get)
        lines.append(
            f"| {r['name']} | {r['full_layers']} ({r['n_full_moe']}) | {f['esft_s']:.1f} | {f['fft_s']:.1f} | "
            f"{gib(f['esft_mem'])} | {gib(f['fft_mem'])} | {mib(f['patch'])} | {gib(f['ckpt'])} | "
            f"{f['load_s']:.2f} | {top} ({parts[top] / f['esft_mem']:.0%}) |"
        )
    lines += [
        "",
        "On CPU, transformers' grouped matmul copies a layer's fused expert tensor (transposed) on each "
        "call: the plan counts that transient as one layer's routed experts in the compute dtype.",
        "",
        *dominates(rows),
    ]
    lines += [
        "",
        "The slot memory per set above is the transformers slot pool's. Mixed-batch throughput with 16 "
        "and 32 sets vs plain vLLM and the vLLM engine's memory per loaded set at these shapes: section "
        "'Serving at real shapes' (`make bench-scale-serve`, too long to add to this run).",
    ]
    return "\n".join(lines) + "\n"


def dominates(rows: list[dict]) -> list[str]:
    """One line per model, computed from the figures: what dominates and the ratios."""
    out = []
    for r in rows:
        f = r["full"]
        parts = {k: v for k, v in f["esft_parts"].items() if k not in ("total", "trained_params")}
        top = max(parts, key=parts.get)
        out.append(
            f"- {r['name']}: at full depth ESFT needs {f['esft_mem'] / f['fft_mem']:.0%} of full FT's memory; "
            f"ESFT's is dominated by the {top} ({parts[top] / f['esft_mem']:.0%}), full FT's by its gradients "
            f"and AdamW state ({f['fft_state'] / f['fft_mem']:.0%}). An ESFT step takes "
            f"{r['esft_s'] / r['fft_s']:.2f}x a full FT step. The patch is {r['patch_bytes'] / r['ckpt_bytes']:.1%} "
            f"of the measured checkpoint, {f['patch'] / f['ckpt']:.2%} of the full one. Hot load runs at "
            f"{r['copy_s'] / r['load_s']:.0%} of memcpy speed (the rest: reading and validating the file)."
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--moe-layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = ap.parse_args()
    args.gflops = {str(d).split(".")[-1]: matmul_gflops(d) for d in (torch.float32, torch.bfloat16)}
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as d:
        for name in args.models.split(","):
            print(f"[{time.perf_counter() - t0:6.0f}s] {name}", file=sys.stderr)
            rows.append(bench_model(name, args, Path(d)))
            r = rows[-1]
            print(
                f"  init {r['init_s']:.0f}s, ESFT {r['esft_s']:.2f}s/step, full FT {r['fft_s']:.2f}s/step, "
                f"save {r['save_s']:.0f}s",
                file=sys.stderr,
            )
    text = report(rows, args, time.perf_counter() - t0)
    print(text)
    if not args.no_write:
        from results import RESULTS, write_section

        write_section(SECTION, text)
        print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
