"""The demo base model: a small fine-grained Qwen2-MoE pretrained here on the general task mix.

No weights can be downloaded, so the project makes its own: many small routed experts, top-k > 1,
one shared expert, hidden size a multiple of 32 (vLLM's CPU kernels), the character-level
tokenizer of `expertlib.demo.tokenizer`. Pretraining is deterministic (seeded), shows a progress bar,
masks prompt tokens in the loss (label -100), nudges each domain's tokens towards its own group
of routed experts (`domain_groups`: the premise of ESFT, built in at toy scale the way DEMix and
Branch-Train-MiX build domain experts, then measured), and is cached under `$EXPERTLIB_CACHE/demo/`
keyed by every setting, as a normal `save_pretrained` folder with the tokenizer and a
`demo_base.json` report (settings, losses, wall time, accuracy per general task).

    path = build_demo_base()                 # the shipped base, digest-checked, copied to the cache
    path = build_demo_base(quick=True)       # the same shipped base (CI trains less on it)
    path = build_demo_base(TINY_CONFIG)      # any other config: pretrained here on first use
    info = demo_base_info(path)              # the report

The default base ships with the package (`expertlib/demo/assets/base/`, float32 safetensors,
~8 MB) so the demo starts in seconds and prints the same numbers everywhere. Its weights'
sha256 (`SHIPPED_DIGEST`) is checked on every use. It is rebuilt bit for bit, on one thread
(torch's float reductions depend on the thread count), by

    python -m expertlib.demo.base --rebuild       # 8-18 min on one shared core; prints the digest
    python -m expertlib.demo.base --check         # rebuild into a temp folder, compare digests

The specialised tasks (`expertlib.demo.tasks.SPECIALISED_TASKS`) are never shown to the base.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from expertlib.constants import DEMO_INFO_FILE, REFERENCE_DATA_DIR
from expertlib.demo.tasks import (
    GENERAL_TASKS,
    PRETRAIN_TASKS,
    collate,
    encode,
    get_task,
    mixture,
    write_jsonl,
)
from expertlib.fsutil import cache_dir  # also imported from here by the demo and its benches

#: The shipped demo base (package data) and the sha256 of its model.safetensors.
SHIPPED_DIR = Path(__file__).parent / "assets" / "base"
#: Eval prompts per general task in the general reference data the base ships (`write_reference_data`).
GENERAL_PROMPTS = 40
SHIPPED_DIGEST = "b4598f9060d9ea7d8513f3ae0dc559b78314ab65f38d9ba05cf2a4b3f57ea7ac"
#: Torch threads of the reproducible pretraining (the result depends on the thread count).
PRETRAIN_THREADS = 1


@dataclass(frozen=True)
class DemoBaseConfig:
    """Architecture and pretraining settings of the demo base (all of them key the cache)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 32
    top_k: int = 4
    moe_intermediate_size: int = 32
    shared_expert_intermediate_size: int = 32
    router_aux_loss_coef: float = 0.02
    #: weight of the domain-routing prior (0 = free routing); see `domain_groups`
    domain_routing: float = 0.1
    tasks: tuple[str, ...] = tuple(PRETRAIN_TASKS)
    n_per_task: int = 4000
    steps: int = 1500
    batch_size: int = 48
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    n_eval: int = 100

    def __post_init__(self) -> None:
        head_dim, rest = divmod(self.hidden_size, self.num_heads)
        if rest or self.hidden_size % 32 or head_dim < 32:
            raise ValueError(
                f"hidden_size {self.hidden_size} / {self.num_heads} heads: vLLM's CPU kernels need the hidden size "
                "a multiple of 32 and attention heads of size 32 or more"
            )

    def key(self) -> str:
        """Short digest of every setting (the cache folder name)."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


#: The reduced-size base for CI and `--quick` (2 layers, 16 experts, a few hundred steps).
QUICK_CONFIG = DemoBaseConfig(
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    num_experts=16,
    top_k=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
    n_per_task=1000,
    steps=300,
    batch_size=32,
    n_eval=50,
)

#: A test-sized base (1 layer, 8 experts, 40 steps): seconds to build, solves nothing well.
TINY_CONFIG = DemoBaseConfig(
    hidden_size=64,
    num_layers=1,
    num_heads=2,
    num_experts=8,
    top_k=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    tasks=("copy", "upper"),
    n_per_task=200,
    steps=40,
    batch_size=16,
    lr=5e-3,
    warmup=5,
    n_eval=8,
)


def domain_groups(config: DemoBaseConfig) -> dict[str, list[int]]:
    """The routed experts each pretraining domain is nudged towards: equal contiguous groups.

    A small MoE pretrained briefly on a few tasks does not split its routed experts by domain by
    itself (measured on the previous demo base: a domain's answer tokens and the general tasks'
    answer tokens went through the same few experts in every layer). Large models get there
    from data diversity; at toy scale the demo base gets a prior instead, the way DEMix layers
    and Branch-Train-MiX build domain experts: during pretraining each token of a sample from
    domain d adds `-log(router probability mass on d's group)` (weight `domain_routing`) to the
    loss. Routing stays learned and soft (top-k over all experts, load balancing on), the held-out
    specialised tasks get no prior at all, and how specialised the result is gets measured
    (`expertlib.esft.diagnostics`), not assumed.
    """
    domains = sorted({get_task(t).domain for t in config.tasks})
    size = config.num_experts // len(domains)
    return {d: list(range(i * size, (i + 1) * size)) for i, d in enumerate(domains)}


def domain_prior_loss(router_logits, attention_mask: torch.Tensor, group_masks: torch.Tensor) -> torch.Tensor:
    """Mean over layers and real tokens of -log(router mass on the token's domain group).

    `group_masks` is [batch, experts] (1 on the sample's domain group); router logits are
    [batch * length, experts] per layer, as transformers returns them.
    """
    b, n = attention_mask.shape
    mask = attention_mask.reshape(-1).bool()
    groups = group_masks.repeat_interleave(n, dim=0)[mask]
    total = torch.zeros(())
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)[mask]
        total = total - torch.log((probs * groups).sum(-1).clamp_min(1e-9)).mean()
    return total / len(router_logits)


def demo_base_path(config: DemoBaseConfig) -> Path:
    return cache_dir() / "demo" / f"base-{config.key()}"


def make_config(config: DemoBaseConfig):
    from transformers import Qwen2MoeConfig

    from expertlib.demo.tokenizer import make_tokenizer

    tok = make_tokenizer()
    return Qwen2MoeConfig(
        vocab_size=128,
        hidden_size=config.hidden_size,
        intermediate_size=config.shared_expert_intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        num_experts=config.num_experts,
        num_experts_per_tok=config.top_k,
        moe_intermediate_size=config.moe_intermediate_size,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size,
        norm_topk_prob=True,
        router_aux_loss_coef=config.router_aux_loss_coef,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def pick_threads(threads: int | None = None) -> int:
    """Torch threads for training: `threads`, else all cores on an idle machine and 1 on a busy one.

    On a shared machine, more threads than free cores make torch's thread pool spin against other
    processes: with two threads and no free core a step takes several times longer than with one.
    """
    if threads:
        return threads
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 1 if busy > cores - 0.5 else torch.get_num_threads()


def pretrain(
    config: DemoBaseConfig,
    out: str | Path | None = None,
    *,
    progress: bool = True,
    steps: int | None = None,
    threads: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Initialise and pretrain the demo base on the general mix; returns (model, stats).

    With `out`, the model and tokenizer are saved there (`save_pretrained`). `threads` sets torch's
    thread count for the run (default: `pick_threads()`); it does not change the result's key.
    Results are bit-reproducible for the same settings and thread count.
    """
    steps = config.steps if steps is None else steps
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(pick_threads(threads))
    try:
        return _pretrain(config, out, progress=progress, steps=steps)
    finally:
        torch.set_num_threads(prev_threads)


def _pretrain(config: DemoBaseConfig, out, *, progress: bool, steps: int) -> tuple[Any, dict[str, Any]]:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from expertlib.demo.tokenizer import make_tokenizer

    tok = make_tokenizer()
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(make_config(config), dtype=torch.float32)
    model.train()
    examples = mixture(config.tasks, config.n_per_task, seed=config.seed)
    data = encode(tok, examples)
    groups = domain_groups(config)
    group_of = {
        d: torch.zeros(config.num_experts).index_fill_(0, torch.tensor(g), 1.0) for d, g in groups.items()
    }
    sample_groups = [group_of[get_task(ex.task).domain] for ex in examples]
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        t = (step - config.warmup) / max(1, steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses: list[float] = []
    priors: list[float] = []
    order = torch.randperm(len(data), generator=gen).tolist()
    pos = 0
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="pretraining demo base", disable=not progress, unit="step")
    for _ in bar:
        if pos + config.batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=gen).tolist(), 0
        idx = order[pos : pos + config.batch_size]
        batch = collate([data[i] for i in idx], tok.pad_token_id)
        pos += config.batch_size
        out_ = model(**batch, output_router_logits=True)
        loss = out_.loss
        if config.domain_routing:
            prior = domain_prior_loss(
                out_.router_logits, batch["attention_mask"], torch.stack([sample_groups[i] for i in idx])
            )
            loss = loss + config.domain_routing * prior
            priors.append(prior.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out_.loss.item())
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}")
    wall = time.perf_counter() - t0
    model.eval()
    stats = {
        "steps": steps,
        "threads": torch.get_num_threads(),
        "train_time_s": round(wall, 1),
        "first_loss": round(sum(losses[:10]) / max(1, len(losses[:10])), 4),
        "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
        "domain_groups": groups,
        "final_domain_prior": round(sum(priors[-20:]) / max(1, len(priors[-20:])), 4),
        "loss_curve": [
            round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4) for i in range(0, steps, 50)
        ],
    }
    if out is not None:
        out = Path(out)
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
    return model, stats


def build_demo_base(
    config: DemoBaseConfig | None = None,
    *,
    quick: bool = False,
    force: bool = False,
    progress: bool = True,
    path: str | Path | None = None,
    threads: int | None = None,
) -> Path:
    """The demo base's folder: pretrained and evaluated on first use, then reused from the cache.

    The default config (also with `quick=True`) is the shipped base: its digest is checked and
    it is copied into the cache. `path` overrides the cache location. `force` pretrains anew.
    """
    from expertlib.demo.evaluate import evaluate_model

    config = config or DemoBaseConfig()
    target = Path(path) if path is not None else demo_base_path(config)
    if (target / DEMO_INFO_FILE).is_file() and not force:
        if not (target / REFERENCE_DATA_DIR).is_dir():  # built before bases shipped their data
            write_reference_data(target, config.tasks)
        return target
    if config == DemoBaseConfig() and not force:
        return install_shipped_base(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model, stats = pretrain(config, tmp, progress=progress, threads=threads)
        from expertlib.demo.tokenizer import make_tokenizer

        acc = evaluate_model(
            model,
            make_tokenizer(),
            list(config.tasks),
            n_eval=config.n_eval,
            seed=config.seed,
            progress=progress,
        )
        info = {"config": asdict(config), "key": config.key(), **stats, "accuracy": acc}
        write_reference_data(tmp, config.tasks)
        (tmp / DEMO_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_reference_data(folder: str | Path, tasks=PRETRAIN_TASKS) -> Path:
    """The reference data the demo base ships (`expertlib.esft.base_data`): its general tasks' eval
    prompts (`--keep builtin`; never trained on) and prompts of each of its pretraining `tasks` (the
    base anchors of `model="auto"`). Written into a temp folder, then moved into place."""
    from expertlib.esft.base_data import ANCHORS, GENERAL
    from expertlib.esft.profiling import ANCHOR_PROMPTS

    target = Path(folder) / REFERENCE_DATA_DIR
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for task in GENERAL_TASKS:
            exs = get_task(task).split(n_train=0, n_eval=GENERAL_PROMPTS, seed=0).eval
            write_jsonl(exs, tmp / GENERAL / f"{task}.jsonl")
        for task in tasks:
            exs = get_task(task).split(n_train=ANCHOR_PROMPTS, n_eval=0, seed=0).train
            write_jsonl(exs, tmp / ANCHORS / f"{task}.jsonl")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_shipped_base(folder: str | Path = SHIPPED_DIR) -> Path:
    """The shipped base's folder, after checking its weights against `SHIPPED_DIGEST`."""
    from expertlib.errors import ModelLoadError

    folder = Path(folder)
    weights = folder / "model.safetensors"
    hint = "reinstall expertlib, or rebuild the base: python -m expertlib.demo.base --rebuild"
    if not weights.is_file() or not (folder / DEMO_INFO_FILE).is_file():
        raise ModelLoadError(f"the shipped demo base is missing from {folder}", hint=hint)
    got = file_digest(weights)
    if got != SHIPPED_DIGEST:
        raise ModelLoadError(
            f"the shipped demo base {weights} has sha256 {got[:16]}..., expected {SHIPPED_DIGEST[:16]}...",
            hint=hint,
        )
    info = demo_base_info(folder)
    if info.get("key") != DemoBaseConfig().key():
        raise ModelLoadError(
            f"the shipped demo base was built with other settings (key {info.get('key')}, "
            f"expected {DemoBaseConfig().key()})",
            hint=hint,
        )
    return folder


def install_shipped_base(target: str | Path) -> Path:
    """Copy the digest-checked shipped base to `target` (atomically); returns `target`."""
    src = check_shipped_base()
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp)
        if file_digest(tmp / "model.safetensors") != SHIPPED_DIGEST:
            raise OSError(f"copying the demo base to {tmp} changed its bytes")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def rebuild_shipped_base(out: str | Path = SHIPPED_DIR, *, progress: bool = True) -> str:
    """Pretrain the default base on `PRETRAIN_THREADS` thread(s) into `out`; returns its digest."""
    build_demo_base(DemoBaseConfig(), path=out, force=True, progress=progress, threads=PRETRAIN_THREADS)
    return file_digest(Path(out) / "model.safetensors")


def demo_base_info(path: str | Path) -> dict[str, Any]:
    """The report written beside a demo base (settings, losses, time, general-task accuracy)."""
    return json.loads((Path(path) / DEMO_INFO_FILE).read_text())


def config_with(**overrides) -> DemoBaseConfig:
    return replace(DemoBaseConfig(), **overrides)


def main(argv: list[str] | None = None) -> int:
    """`python -m expertlib.demo.base --rebuild | --check`: rebuild or verify the shipped base."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="Rebuild or verify the shipped demo base (one thread).")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--rebuild", action="store_true", help="pretrain into --out (default: the package)")
    group.add_argument("--check", action="store_true", help="pretrain into a temp folder, compare digests")
    ap.add_argument("--out", default=str(SHIPPED_DIR))
    args = ap.parse_args(argv)
    if args.rebuild:
        digest = rebuild_shipped_base(args.out)
        print(f"{Path(args.out) / 'model.safetensors'}: sha256 {digest}")
        print(
            "ok: matches SHIPPED_DIGEST" if digest == SHIPPED_DIGEST else "set SHIPPED_DIGEST to this digest"
        )
        return 0
    with tempfile.TemporaryDirectory() as d:
        digest = rebuild_shipped_base(Path(d) / "base")
    same = digest == SHIPPED_DIGEST
    print(f"rebuilt sha256 {digest}: {'identical to' if same else 'DIFFERS from'} the shipped base")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
