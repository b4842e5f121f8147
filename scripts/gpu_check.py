"""The GPU check without vLLM: ESFT, the transformers slot pool and the vLLM remap op on one CUDA GPU.

    python scripts/gpu_check.py --out DIR [--dry-run]     # normally through scripts/gpu_check.sh

Runs on a bare GPU machine (torch, transformers, accelerate, safetensors; pydantic from carried
wheels; no vLLM, no network). Each step prints its figures; one results table goes to the console,
DIR/gpu_check.md and DIR/gpu_check.json. Exit status: 0 every step passed, 1 a step failed, 2 no GPU
(without --dry-run).

Steps (docs/GPU.md): ESFT step time against full fine-tuning and peak GPU memory against the memory
plan at the per-layer shapes of Qwen3-30B-A3B and DeepSeek-V2-Lite (2 MoE layers, bf16); the CLI's
`score` and `train` with `--device cuda --dtype bfloat16`; the same selected experts on the GPU as on
the CPU; a mixed-set batch through the transformers slot pool equal to each set merged, and its
throughput against the base; hot load host-to-slots against a pinned copy; vLLM's remap op
(expertlib/vllm_plugin/routing.py loaded by path, no vLLM) captured in a CUDA graph and replayed after
the per-token set buffer and the remap table change; the per-step set-buffer copy from pinned and
pageable memory. `--dry-run` runs every step on tiny shapes on the CPU and skips only what needs
CUDA, saying so.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # bench/scale.py: the real models' per-layer shapes

#: Modules the GPU machine does not have; the check must not need them (gpu_check.sh blocks them).
ABSENT = ("vllm", "fastapi", "uvicorn", "starlette", "prometheus_client", "openai", "lm_eval", "matplotlib")


class Check:
    """The results table: one row per figure, and each step's status."""

    def __init__(self, device: str, dry: bool):
        self.device, self.dry = device, dry
        #: bf16 on the GPU; float32 in the dry run (CPUs without AVX512-BF16 multiply bf16 ~100x slower,
        #: and the dry run checks the code, not the speed)
        self.dtype = "float32" if dry else "bfloat16"
        self.torch_dtype = getattr(torch, self.dtype)
        self.rows: list[dict] = []
        self.steps: list[dict] = []

    def row(self, step: str, what: str, value: str, note: str = "") -> None:
        self.rows.append(dict(step=step, what=what, value=value, note=note))
        print(f"  {what}: {value}" + (f"  ({note})" if note else ""), flush=True)

    def skip(self, step: str, what: str, why: str) -> None:
        self.row(step, what, "skipped", why)

    def run(self, name: str, fn: Callable[[Check, str], None]) -> None:
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        try:
            fn(self, name)
            status = "ok"
        except Exception as exc:  # noqa: BLE001 - a failed step is reported, the others still run
            traceback.print_exc()
            status = f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.steps.append(dict(step=name, status=status, seconds=round(time.perf_counter() - t, 1)))
        print(f"   {status} ({time.perf_counter() - t:.1f} s)", flush=True)

    @property
    def failed(self) -> bool:
        return any(s["status"] != "ok" for s in self.steps)

    def table(self) -> str:
        lines = ["| step | figure | value | note |", "|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['what']} | {r['value']} | {r['note']} |" for r in self.rows]
        lines += ["", "| step | status | seconds |", "|---|---|---|"]
        lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in self.steps]
        return "\n".join(lines)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 3) -> float:
    """Median seconds of `fn` (one warm-up call first)."""
    fn()
    out = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# --- models -------------------------------------------------------------------------------------------

#: Dry run: the same architectures at toy widths (hidden a multiple of 32).
TINY = dict(
    hidden_size=64, moe_intermediate_size=32, intermediate_size=128, num_attention_heads=2,
    num_key_value_heads=2, vocab_size=512,
)  # fmt: skip
TINY_MODEL = {
    "qwen3-30b-a3b": dict(num_experts=16, num_experts_per_tok=4, head_dim=32),
    "deepseek-v2-lite": dict(
        n_routed_experts=16, num_experts_per_tok=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=32,
    ),
}  # fmt: skip


def real_config(name: str, dry: bool, moe_layers: int = 2):
    """Per-layer shapes of the real model (bench/scale.py), truncated to `moe_layers` MoE layers; tiny
    widths in the dry run."""
    from scale import MODELS
    from transformers import AutoConfig

    kw = dict(MODELS[name])
    model_type = kw.pop("model_type")
    kw["num_hidden_layers"] = moe_layers + kw.get("first_k_dense_replace", 0)
    kw["vocab_size"] = 8192
    if dry:
        kw.update(TINY, **TINY_MODEL[name])
    return AutoConfig.for_model(model_type, **kw)


def build(cfg, device: str, dtype: torch.dtype):
    """A random model made directly on `device` (no slow CPU initialisation of a billion weights)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


# --- steps --------------------------------------------------------------------------------------------


def step_environment(c: Check, step: str) -> None:
    import transformers

    c.row(
        step,
        "python / torch / transformers",
        f"{sys.version.split()[0]} / {torch.__version__} / {transformers.__version__}",
    )
    if c.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        c.row(step, "GPU", f"{p.name}, {gib(p.total_memory)}, sm_{p.major}{p.minor}")
    else:
        c.row(step, "GPU", "none", "dry run on the CPU: tiny shapes, CUDA-only figures skipped")
    import expertlib

    c.row(step, "expertlib imported from", str(Path(expertlib.__file__).parent.parent))
    import expertlib.cli.main  # noqa: F401 - the package mapping (cli/ -> expertlib.cli) works
    import expertlib.registry  # noqa: F401

    present = [m for m in ABSENT if m in sys.modules]
    assert not present, f"modules the GPU machine lacks were imported: {present}"


def step_esft_vs_fft(c: Check, step: str, name: str) -> None:
    """ESFT (1/8 of each layer's experts, bf16 base, fp32 master, AdamW) against full fine-tuning (bf16,
    AdamW on every parameter) on the same batch: step time and peak memory against the memory plans."""
    from expertlib.esft.data import Sample
    from expertlib.esft.memory_plan import PeakTracker, plan_training
    from expertlib.esft.selection import ExpertConfig
    from expertlib.esft.training import TrainConfig, train_experts
    from expertlib.moe import moe_layer_indices
    from expertlib.shape import ModelShape

    cuda = c.device.startswith("cuda")
    cfg = real_config(name, c.dry)
    batch, seq, steps = (4, 512, 4) if cuda else (2, 32, 3)
    model = build(cfg, c.device, c.torch_dtype)
    shape = ModelShape.from_config(cfg)
    layers = moe_layer_indices(model)
    per_layer = max(1, shape.num_experts // 8)
    selection = ExpertConfig(
        experts={layer: list(range(0, shape.num_experts, 8))[:per_layer] for layer in layers}
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, cfg.vocab_size, (batch, seq), generator=g)
    samples = [Sample(tuple(r.tolist()), tuple(r.tolist()), 0) for r in ids]
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    c.row(
        step,
        f"{name}: model",
        f"{len(layers)} MoE layers, {shape.num_experts} experts, hidden {cfg.hidden_size}, {gib(base_bytes)} {c.dtype}",
    )

    def peak_of(fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        with PeakTracker() as tracker:  # exact tensor bytes beyond what existed before
            fn()
        return base_bytes + tracker.peak

    stamps: list[float] = []
    cfg_train = TrainConfig(lr=1e-5, steps=steps, batch_size=batch, dtype=c.dtype, master_dtype="float32")

    def esft():
        train_experts(
            model, samples, selection, cfg_train, pad_id=0, progress=False,
            on_step=lambda s, loss: (sync(c.device), stamps.append(time.perf_counter())),
        )  # fmt: skip

    esft_peak = peak_of(esft)
    esft_s = statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    plan = plan_training(
        cfg, trained_experts=selection.num_experts, batch_size=batch, seq_len=seq, dtype=c.dtype,
        master_dtype="float32", shape=shape,
    )  # fmt: skip

    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-6)
    dev_ids = ids.to(c.device)
    times: list[float] = []

    def fft():
        for _ in range(steps):
            sync(c.device)
            t = time.perf_counter()
            logits = model(input_ids=dev_ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), dev_ids[:, 1:].reshape(-1)
            )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(c.device)
            times.append(time.perf_counter() - t)

    fft_peak = peak_of(fft)
    fft_s = statistics.median(times[1:])
    fft_plan = plan_training(
        cfg, trained_experts=0, extra_trained_params=shape.total_params, batch_size=batch, seq_len=seq,
        dtype=c.dtype, master_dtype=c.dtype, shape=shape,
    )  # fmt: skip
    tokens = f"batch {batch} x {seq}"
    c.row(
        step,
        f"{name}: ESFT step / full FT step",
        f"{esft_s * 1e3:.1f} ms / {fft_s * 1e3:.1f} ms = {esft_s / fft_s:.2f}",
        tokens,
    )
    c.row(
        step,
        f"{name}: ESFT peak / memory plan",
        f"{gib(esft_peak)} / {gib(plan.total)} = {esft_peak / plan.total:.2f}",
    )
    c.row(
        step,
        f"{name}: full FT peak / plan",
        f"{gib(fft_peak)} / {gib(fft_plan.total)} = {fft_peak / fft_plan.total:.2f}",
    )
    assert esft_s < fft_s or not cuda, "an ESFT step is not faster than a full fine-tuning step"
    assert 0.5 < esft_peak / plan.total < 1.6, "ESFT peak memory is far from the memory plan"


def step_cli(c: Check, step: str, scratch: Path) -> None:
    """`expertlib score` and `expertlib train` on a saved real-shape base, --device DEV --dtype bfloat16."""
    from expertlib.testing import make_tokenizer

    cfg = real_config("qwen3-30b-a3b", c.dry)
    model = build(cfg, c.device, c.torch_dtype)
    base = scratch / "cli-base"
    t = time.perf_counter()
    model.save_pretrained(str(base))
    make_tokenizer(base)
    del model
    c.row(
        step,
        "real-shape base written",
        gib(sum(f.stat().st_size for f in base.glob("*.safetensors"))),
        f"{time.perf_counter() - t:.1f} s",
    )
    rows = [
        {"prompt": f"say {w} twice", "completion": f"{w} {w}"}
        for w in ("alpha", "beta", "gamma", "delta") * 8
    ]
    data = scratch / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dev = "cuda" if c.device.startswith("cuda") else "cpu"
    cli = [sys.executable, "-m", "expertlib.cli.main"]
    for argv in (
        ["score", str(base), str(data), "--device", dev, "--dtype", c.dtype, "--out", str(scratch / "scores.json"), "--json"],
        ["train", str(base), str(data), "--task", "gpu", "--steps", "3", "--batch-size", "4", "--lr", "1e-4",
         "--device", dev, "--dtype", c.dtype, "--master-dtype", "float32", "--keep", "none", "--out", str(scratch / "gpu.safetensors"), "--json"],
    ):  # fmt: skip
        t = time.perf_counter()
        res = subprocess.run([*cli, *argv], capture_output=True, text=True, timeout=240)
        print(res.stdout[-2000:], res.stderr[-4000:], sep="\n")
        assert res.returncode == 0, f"expertlib {argv[0]} exited {res.returncode}"
        c.row(
            step,
            f"expertlib {argv[0]} --device {dev} --dtype {c.dtype}",
            "ok",
            f"{time.perf_counter() - t:.1f} s with start-up",
        )
    assert (scratch / "gpu.safetensors").is_file()


def step_same_selection(c: Check, step: str) -> None:
    """ESFT-Token and -Gate scores of a tiny float32 model on the GPU against the CPU: same experts selected."""
    from expertlib.esft.data import Sample
    from expertlib.esft.scoring import score_experts
    from expertlib.esft.selection import select_experts
    from expertlib.testing import make_tiny_model

    model = make_tiny_model("qwen2_moe")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (16, 24), generator=g)
    samples = [Sample(tuple(r.tolist()), tuple(r.tolist()), 0) for r in ids]
    cpu = score_experts(model, samples, pad_id=0, token_budget=None, progress=False)
    other = score_experts(model.to(c.device), samples, pad_id=0, token_budget=None, progress=False)
    where = "GPU" if c.device.startswith("cuda") else "CPU again (dry run)"
    for kind in ("token", "gate"):
        a, b = getattr(cpu, kind), getattr(other, kind)
        diff = max(abs(x - y) for layer in a for x, y in zip(a[layer], b[layer], strict=True))
        sel_a, sel_b = select_experts(a, 0.5).experts, select_experts(b, 0.5).experts
        c.row(
            step,
            f"ESFT-{kind} scores {where} vs CPU",
            f"max |diff| {diff:.2e}",
            f"selected: {sum(map(len, sel_a.values()))} experts",
        )
        if sel_a != sel_b:  # only a near-tie may flip
            flips = {
                layer: set(sel_a[layer]) ^ set(sel_b[layer])
                for layer in sel_a
                if sel_a[layer] != sel_b[layer]
            }
            assert diff < 1e-4, f"different experts selected: {flips}"
            c.row(step, f"ESFT-{kind} selection", f"differs at a near-tie: {flips}")


def step_slot_pool(c: Check, step: str) -> None:
    """The transformers slot pool on the device: a batch mixing 3 sets and the base equals each set
    merged into the model (float32)."""
    import copy

    from expertlib.apply import apply_expert_set
    from expertlib.compose import compose
    from expertlib.testing import make_tiny_model
    from expertlib.vllm_plugin.testing import BENCH_BASE, make_bench_sets

    base = make_tiny_model("qwen2_moe", **BENCH_BASE)
    sets = make_bench_sets(base, 3, experts_per_layer=4)
    names = ["task0", "task1", None, "task2"]
    composed = compose(copy.deepcopy(base).to(c.device), sets, slots=16, max_sets=4)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, base.config.vocab_size, (4, 32), generator=g).to(c.device)
    with torch.no_grad():
        mixed = composed(ids, expert_sets=names).logits
        worst = 0.0
        for i, name in enumerate(names):
            ref = copy.deepcopy(base)
            if name is not None:
                apply_expert_set(ref, sets[int(name[-1])])
            want = ref.to(c.device)(input_ids=ids[i : i + 1]).logits
            worst = max(worst, float((mixed[i : i + 1] - want).abs().max()))
    c.row(step, "mixed batch (3 sets + base) vs each set merged, float32", f"max |logit diff| {worst:.2e}")
    assert worst < 2e-3, "a mixed-set batch differs from the sets merged one at a time"


def step_slot_throughput(c: Check, step: str) -> None:
    """At Qwen3-30B-A3B widths: mixed-set / base forward time through the slot pool, and hot load
    (host experts -> slots) against one pinned and one pageable copy of the same bytes."""
    from expertlib.compose import compose
    from expertlib.vllm_plugin.testing import make_bench_sets

    cuda = c.device.startswith("cuda")
    g = torch.Generator().manual_seed(4)
    cfg = real_config("qwen3-30b-a3b", c.dry)
    model = build(cfg, c.device, c.torch_dtype)
    batch, seq = (16, 256) if cuda else (4, 32)
    per_layer = 8 if cuda else 2
    x = torch.randint(1, cfg.vocab_size, (batch, seq), generator=g).to(c.device)
    with torch.no_grad():
        base_s = timed(lambda: model(input_ids=x, use_cache=False), c.device)
        sets = make_bench_sets(model, 4, experts_per_layer=per_layer)
        pool = compose(model, [], slots=4 * per_layer, max_sets=4)
        t = time.perf_counter()
        for es in sets:
            pool.load(es)  # checks (base experts' digests, the set's own) + copies into the slots
        sync(c.device)
        load_s = time.perf_counter() - t
        mix = [f"task{i % 4}" if i % 5 else None for i in range(batch)]
        mixed_s = timed(lambda: pool(x, expert_sets=mix, use_cache=False), c.device)
    c.row(
        step, f"mixed / base forward, Qwen3-30B-A3B widths {c.dtype}",
        f"{mixed_s * 1e3:.1f} / {base_s * 1e3:.1f} ms: {base_s / mixed_s:.2f}x the base's throughput",
        f"batch {batch} x {seq}, 4 sets of {per_layer} experts a layer, 1 in 5 rows base",
    )  # fmt: skip
    from expertlib.moe import moe_layer_indices
    from expertlib.slots import write_slot

    one = sets[0]
    host = {
        (layer, e): one.expert(layer, e).map(lambda t: t.cpu())
        for layer, ids in one.manifest.experts.items()
        for e in ids
    }
    nbytes = sum(t.numel() * t.element_size() for w in host.values() for t in (w.gate, w.up, w.down))

    def write_all():
        for i, ((layer, _e), w) in enumerate(host.items()):
            write_slot(model, layer, i % per_layer, w)

    write_s = timed(write_all, c.device)
    c.row(
        step,
        "ComposedModel.load of 4 sets (checks + copy)",
        f"{load_s * 1e3:.0f} ms",
        f"{len(moe_layer_indices(model))} MoE layers",
    )
    c.row(
        step,
        "hot load: host experts -> slots (write_slot)",
        f"{nbytes / write_s / 1e9:.2f} GB/s",
        f"{gib(nbytes)} a set",
    )
    if cuda:
        src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        page = torch.empty(nbytes, dtype=torch.uint8)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=c.device)
        pinned_s = timed(lambda: dst.copy_(src, non_blocking=True), c.device)
        pageable_s = timed(lambda: dst.copy_(page), c.device)
        c.row(
            step,
            "same bytes, one pinned / one pageable copy",
            f"{nbytes / pinned_s / 1e9:.2f} / {nbytes / pageable_s / 1e9:.2f} GB/s",
            f"slot writes reach {pinned_s / write_s:.2f} of pinned",
        )
    else:
        c.skip(step, "pinned copy host -> GPU of the same bytes", "needs CUDA")
    host_cache_to_slots(c, step, host, per_layer)


def host_cache_to_slots(c: Check, step: str, host: dict, per_layer: int) -> None:
    """The vLLM workers' reload path (expertlib/vllm_plugin/worker.py, no vLLM needed): a set's
    experts as the host cache keeps them (rows in the kernel's layout, pinned on a GPU machine)
    copied into slot rows of w13 (n, 2I, H) / w2 (n, H, I) by `copy_rows`, on a side stream; target
    >= 0.8x one pinned host-to-device copy of the same bytes."""
    from types import SimpleNamespace

    from expertlib.vllm_plugin.worker import LayerRows, copy_rows

    cuda = c.device.startswith("cuda")
    experts = list(host.values())[:per_layer]  # one layer's worth
    rows = LayerRows(
        list(range(len(experts))),
        torch.stack([torch.cat([w.gate, w.up]) for w in experts]).to(c.torch_dtype),  # (n, 2I, H)
        torch.stack([w.down for w in experts]).to(c.torch_dtype),  # (n, H, I)
    )
    if cuda:
        rows.w13, rows.w2 = rows.w13.pin_memory(), rows.w2.pin_memory()
    n = len(experts)
    slots = SimpleNamespace(
        routed_experts=SimpleNamespace(
            w13_weight=torch.empty((2 * n, *rows.w13.shape[1:]), dtype=rows.w13.dtype, device=c.device),
            w2_weight=torch.empty((2 * n, *rows.w2.shape[1:]), dtype=rows.w2.dtype, device=c.device),
        )
    )
    ids = list(range(n, 2 * n))
    copy_s = timed(lambda: copy_rows(slots, ids, rows, rows.experts), c.device)
    dst = slots.routed_experts
    assert torch.equal(dst.w13_weight[n:].cpu(), rows.w13) and torch.equal(dst.w2_weight[n:].cpu(), rows.w2)
    nbytes = rows.nbytes
    if cuda:
        src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        flat = torch.empty(nbytes, dtype=torch.uint8, device=c.device)
        pinned_s = timed(lambda: flat.copy_(src, non_blocking=True), c.device)
        c.row(
            step,
            "host cache -> slots (pinned packed rows, side stream)",
            f"{nbytes / copy_s / 1e9:.2f} GB/s",
            f"{pinned_s / copy_s:.2f}x one pinned copy of the same bytes (target >= 0.8x); {gib(nbytes)}",
        )
    else:
        c.row(
            step,
            "host cache -> slots (packed rows, copy_rows)",
            f"{nbytes / copy_s / 1e9:.2f} GB/s",
            "CPU dry run: the copy path and its result, no pinned/side-stream figure",
        )


def load_routing():
    """expertlib/vllm_plugin/routing.py by its path: the remap op alone, no vLLM, no expertlib package."""
    spec = importlib.util.spec_from_file_location("slot_routing", ROOT / "expertlib/vllm_plugin/routing.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def step_remap_graph(c: Check, step: str) -> None:
    """vLLM's per-layer remap as vLLM runs it: captured once in a CUDA graph at a padded size, replayed
    after the per-token set buffer and the remap table change in place; the padded tail reads row 0."""
    mod = load_routing()
    cuda = c.device.startswith("cuda")
    E, S, K, T = 128, 16, 8, 64  # Qwen3-30B-A3B: 128 experts, top-8; a graph of 64 tokens
    ctx = mod.SlotContext(num_layers=2, num_experts=E, slots=S, max_sets=4, max_tokens=1024, device=c.device)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, E, (T, K), generator=g, dtype=torch.int32).to(c.device)
    if cuda:
        assert ctx._host.is_pinned(), "the per-token set buffer's staging copy is not pinned"
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ctx.remap_ids(1, ids)  # warm-up off the capture stream, as torch.cuda.graph asks
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ctx.remap_ids(1, ids)
        replay = graph.replay
    else:
        out = ctx.remap_ids(1, ids)

        def replay():
            out.copy_(ctx.remap_ids(1, ids))

    def expect(rows: list[int], counts: list[int]) -> torch.Tensor:
        token_rows = torch.repeat_interleave(torch.tensor(rows), torch.tensor(counts))
        token_rows = torch.cat(
            [token_rows, torch.zeros(T - len(token_rows), dtype=torch.long)]
        )  # padded tail
        table = ctx.remap[1].cpu()
        return torch.stack([table[r][i.long()] for r, i in zip(token_rows, ids.cpu(), strict=True)])

    ctx.remap[1, 2, :8] = torch.arange(E, E + 8, dtype=torch.int32)  # set row 2: experts 0..7 -> slots 0..7
    checks = 0
    for rows, counts in (([2, 0, 3], [10, 20, 30]), ([3], [5]), ([2, 2], [40, 24]), ([0], [7])):
        ctx.set_tokens(rows, counts)
        replay()
        sync(c.device)
        assert torch.equal(out.cpu(), expect(rows, counts).to(out.dtype)), (
            f"replay wrong for rows {rows} counts {counts}"
        )
        checks += 1
    ctx.remap[1, 3, 100:104] = torch.arange(
        E + 8, E + 12, dtype=torch.int32
    )  # a set loaded into row 3 in place
    ctx.set_tokens([3, 2], [32, 32])
    replay()
    sync(c.device)
    assert torch.equal(out.cpu(), expect([3, 2], [32, 32]).to(out.dtype)), (
        "replay missed a remap row written in place"
    )
    copies = ctx.copies
    ctx.set_tokens([3, 2], [32, 32])  # the same batch again: nothing to copy
    assert ctx.copies == copies
    c.row(
        step,
        "remap replays after buffer and table changes",
        f"{checks + 1} of {checks + 1} exact",
        "graph" if cuda else "eager on CPU (graph capture needs CUDA)",
    )
    if not cuda:
        c.skip(step, "remap op per MoE layer inside a graph", "needs CUDA")
        return
    layers, T2 = 48, 256  # a Qwen3-30B-A3B step: 48 MoE layers, 256 tokens
    ids2 = torch.randint(0, E, (T2, K), dtype=torch.int32, device=c.device)
    ctx48 = mod.SlotContext(
        num_layers=layers, num_experts=E, slots=S, max_sets=4, max_tokens=1024, device=c.device
    )
    ctx48.set_tokens([1, 2, 0], [100, 100, 56])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(layers):
            ctx48.remap_ids(layer, ids2)
    per = timed(graph.replay, c.device, repeat=20) / layers
    c.row(
        step,
        "remap op per MoE layer inside a graph (256 tokens, top-8)",
        f"{per * 1e6:.1f} us",
        f"x48 layers = {per * 48 * 1e3:.2f} ms a step",
    )


def step_buffer_copy(c: Check, step: str) -> None:
    """The per-step set-buffer copy (256 tokens, int64) from pinned and from pageable memory while the
    GPU is still busy with the previous step: host time of the copy call. A pageable source waits."""
    if not c.device.startswith("cuda"):
        c.skip(step, "pinned vs pageable set-buffer copy", "needs CUDA")
        return
    dst = torch.zeros(1024, dtype=torch.int64, device=c.device)
    pinned, pageable = torch.zeros(1024, dtype=torch.int64).pin_memory(), torch.zeros(1024, dtype=torch.int64)
    khz = getattr(torch.cuda.get_device_properties(0), "clock_rate", 0) or 1_980_000  # H200's boost clock
    busy_cycles = int(khz * 1e3 * 2e-3)  # ~2 ms of GPU work
    out = {}
    for name, src in (("pinned", pinned), ("pageable", pageable)):
        times = []
        for _ in range(20):
            torch.cuda._sleep(busy_cycles)  # the previous step still running
            t = time.perf_counter()
            dst[:256].copy_(src[:256], non_blocking=True)
            times.append(time.perf_counter() - t)
            torch.cuda.synchronize()
        out[name] = statistics.median(times)
    c.row(
        step,
        "copy call with the GPU busy ~2 ms: pinned / pageable",
        f"{out['pinned'] * 1e6:.0f} us / {out['pageable'] * 1e6:.0f} us",
        "pageable blocks the host until the GPU drains",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, default=None, help="folder for gpu_check.md/.json (default: a temp dir)"
    )
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes; CUDA-only figures skipped")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check."))
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU; use --dry-run for the CPU mode", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    torch.set_num_threads(min(torch.get_num_threads(), 4)) if args.dry_run else None
    c = Check(device, args.dry_run)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out, prefix="scratch.") as tmp:
        scratch = Path(tmp)
        c.run("environment", step_environment)
        for name in ("qwen3-30b-a3b", "deepseek-v2-lite"):
            c.run(f"ESFT vs full FT, {name}", lambda c, s, name=name: step_esft_vs_fft(c, s, name))
        c.run("CLI score + train", lambda c, s: step_cli(c, s, scratch))
        c.run("same selection as CPU", step_same_selection)
        c.run("slot pool (transformers)", step_slot_pool)
        c.run("slot pool throughput, hot load", step_slot_throughput)
        c.run("vLLM remap op in a CUDA graph", step_remap_graph)
        c.run("set-buffer copy", step_buffer_copy)
    present = [m for m in ABSENT if m in sys.modules]
    if present:
        c.steps.append(dict(step="no vLLM/server modules imported", status=f"FAIL: {present}", seconds=0))
    blocked_log = Path(os.environ.get("GPU_CHECK_BLOCKED_LOG", "/nonexistent"))
    if blocked_log.is_file():  # imports the code tried, found missing and went on without (its fallbacks)
        tried = sorted(set(blocked_log.read_text().split()))
        c.row("environment", "absent modules tried and done without", ", ".join(tried) or "none")
    wall = time.perf_counter() - t0
    head = f"# GPU check ({'dry run, CPU' if args.dry_run else 'CUDA'}), {wall:.0f} s\n\n"
    (out / "gpu_check.md").write_text(head + c.table() + "\n")
    (out / "gpu_check.json").write_text(
        json.dumps(dict(device=device, wall_s=wall, rows=c.rows, steps=c.steps), indent=1)
    )
    print("\n" + head + c.table())
    print(f"\ngpu_check: {'FAILED' if c.failed else 'all steps passed'}; results in {out}/gpu_check.md")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
