"""Training cost of ESFT-Token, ESFT-Gate, full fine-tuning and LoRA, side by side.

Same tiny MoE model (qwen2_moe, paper-like routing: 64 routed experts, top-6, one shared
expert of two experts' width), same data, same batches, same optimizer (AdamW), one process
per method. Prints per method: step time, peak memory, trainable parameters, output size,
and ratios to full fine-tuning; writes the table into the "## Training cost" section of
bench/RESULTS.md.

    python bench/train_cost.py                 # ~1-2 min on 2 CPU cores
    python bench/train_cost.py --no-write      # print only

Peak memory is the process's peak resident set during training (VmHWM, reset after the model
and data are ready), minus the resident set at that moment: the memory training adds on top of
the loaded model (activations, gradients, optimizer state).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("esft-token", "esft-gate", "full", "lora")
MODEL = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_experts=64,
    num_experts_per_tok=6,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=256,
    intermediate_size=512,
)
#: Paper learning rates per method (the step cost does not depend on them).
LR = {"esft-token": 1e-5, "esft-gate": 1e-5, "full": 3e-5, "lora": 1e-4}
SECTION = "## Training cost"


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _task_file(path: Path, n: int) -> Path:
    """A synthetic arithmetic task (answers depend on the prompt), ~100 characters per sample."""
    import random

    rnd = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rnd.randint(10, 999), rnd.randint(10, 999)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is {a} plus {b}? Show the sum."},
                    {"role": "assistant", "content": f"{a} + {b} = {a + b}. The answer is {a + b}."},
                ]
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def worker(method: str, args) -> dict:
    import torch

    torch.set_num_threads(1)  # one core per method: comparable CPU time on a shared machine
    from expertlib.esft.data import collate, load_samples
    from expertlib.esft.scoring import score_experts
    from expertlib.esft.selection import select_experts
    from expertlib.esft.training import TrainConfig, batch_indices, loss_sum, n_labels, train_experts
    from expertlib.identity import base_identity
    from expertlib.patch import ExpertSet
    from expertlib.testing import make_tiny_model, make_tokenizer

    torch.manual_seed(0)
    tmp = Path(args.tmp)
    tok = make_tokenizer()
    samples = load_samples(_task_file(tmp / "task.jsonl", args.samples), tok, max_length=args.seq)
    model = make_tiny_model("qwen2_moe", **MODEL)
    total_params = sum(p.numel() for p in model.parameters())
    steps = args.warmup + args.steps
    cfg = TrainConfig(lr=LR[method], steps=steps, batch_size=args.batch_size, schedule="constant")
    stamps: list[tuple[float, float]] = []  # (wall, process CPU) after each step

    def stamp(*_):
        stamps.append((time.perf_counter(), time.process_time()))

    info: dict = {"method": method}

    if method.startswith("esft"):
        score = method.split("-")[1]
        scores = score_experts(model, samples, pad_id=0, token_budget=args.budget, progress=False)
        top_p = 0.2 if score == "token" else 0.1
        sel = select_experts(scores.of(score), top_p)
        info["experts_per_layer"] = {str(k): len(v) for k, v in sel.experts.items()}
        rss0 = _rss_kib("VmRSS")
        reset = _reset_peak()
        stamp()
        res = train_experts(
            model,
            samples,
            sel,
            cfg,
            pad_id=0,
            progress=False,
            on_step=stamp,
        )
        peak = _rss_kib("VmHWM")
        es = res.expert_set(task="bench", base=base_identity(model))
        out = es.save(tmp / "patch.safetensors")
        ExpertSet.open(out)
        trainable = res.trainable_params
        size = out.stat().st_size
    else:
        from baselines import trainable_baseline

        trained = trainable_baseline(model, method)
        params = [p for p in trained.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        trained.train()
        rss0 = _rss_kib("VmRSS")
        reset = _reset_peak()
        stamp()
        for step in range(steps):  # the same step as expertlib.esft.training.train_experts
            batch = [samples[i] for i in batch_indices(step, 0, cfg, len(samples))]
            (loss_sum(trained, collate(batch, 0), cfg) / max(1, n_labels(batch))).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            stamp()
        peak = _rss_kib("VmHWM")
        trainable = sum(p.numel() for p in params)
        if method == "full":
            from safetensors.torch import save_model

            save_model(model, str(tmp / "full.safetensors"))
            size = (tmp / "full.safetensors").stat().st_size
        else:
            trained.save_pretrained(str(tmp / "lora"))
            size = (tmp / "lora" / "adapter_model.safetensors").stat().st_size
    pairs = list(zip(stamps[:-1], stamps[1:], strict=True))[args.warmup :]
    info.update(
        step_time_s=min(b[0] - a[0] for a, b in pairs),
        step_cpu_s=statistics.median(b[1] - a[1] for a, b in pairs),
        peak_mib=(peak - rss0) / 1024 if reset else None,
        rss_mib=peak / 1024,
        trainable_params=trainable,
        total_params=total_params,
        output_bytes=size,
    )
    return info


def run_all(args) -> list[dict]:
    """Each method in its own process, the whole round `--repeat` times; per method the best round."""
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for r in _round(args):
            b = best.setdefault(r["method"], r)
            for k in ("step_time_s", "step_cpu_s", "peak_mib"):
                if r[k] is not None and b[k] is not None:
                    b[k] = min(b[k], r[k])
    return [best[m] for m in METHODS]


def _round(args) -> list[dict]:
    rows = []
    for method in METHODS:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--worker", method, "--tmp", tmp, *_passthrough(args)]
            env = {
                **os.environ,
                "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": "1",
            }
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode:
                sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"  {method:<11} {r['step_time_s']:.3f} s/step, {r['step_cpu_s']:.3f} CPU s/step",
                file=sys.stderr,
            )
    return rows


def _passthrough(args) -> list[str]:
    keys = ("steps", "warmup", "batch_size", "seq", "samples", "budget")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


def table(rows: list[dict], args) -> str:
    full = next(r for r in rows if r["method"] == "full")
    lines = [
        "| method | step time (s) | x full | CPU time/step (s) | x full | train memory (MiB) | x full "
        "| trainable params | x full | output (MB) | x full checkpoint |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = r["peak_mib"]
        lines.append(
            f"| {r['method']} | {r['step_time_s']:.3f} | {r['step_time_s'] / full['step_time_s']:.2f} "
            f"| {r['step_cpu_s']:.3f} | {r['step_cpu_s'] / full['step_cpu_s']:.2f} "
            f"| {mem:.0f} | {mem / full['peak_mib']:.2f} "
            f"| {r['trainable_params']:,} | {r['trainable_params'] / full['trainable_params']:.3f} "
            f"| {r['output_bytes'] / 1e6:.2f} | {r['output_bytes'] / full['output_bytes']:.3f} |"
        )
    sel = {r["method"]: r.get("experts_per_layer") for r in rows if r["method"].startswith("esft")}
    m = MODEL
    return "\n".join(
        [
            SECTION,
            "",
            f"`python bench/train_cost.py` ({time.strftime('%Y-%m-%d')}, CPU, one thread per method, float32). "
            f"Model: tiny qwen2_moe, hidden {m['hidden_size']}, {m['num_hidden_layers']} MoE layers, "
            f"{m['num_experts']} routed experts (top-{m['num_experts_per_tok']}, intermediate "
            f"{m['moe_intermediate_size']}) + 1 shared expert, {full['total_params'] / 1e6:.1f}M parameters. "
            f"Data: synthetic arithmetic chat task, batch {args.batch_size} sequences (<= {args.seq} tokens), "
            f"AdamW (betas 0.9/0.95, wd 0.1), {args.steps} timed steps after {args.warmup} warm-up steps, "
            f"best of {args.repeat} round(s). Step time: fastest wall-clock step; CPU time/step: median "
            "user+system time of the process. The machine is shared (1-min load average at the end: "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores), so wall time is noisy; CPU time is the "
            "steadier measure of work per step. "
            "LoRA: PEFT rank 8 on attention, shared expert and the fused routed experts (`target_parameters`). "
            "Train memory: peak resident memory during training above the loaded model and data. "
            "Output: the file a method ships (ESFT patch, LoRA adapter, full safetensors checkpoint).",
            "",
            *lines,
            "",
            f"Experts selected per layer (of {m['num_experts']}): "
            + "; ".join(f"{k}: {v}" for k, v in sel.items())
            + ".",
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--budget", type=int, default=16384, help="scoring token budget")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over all methods; the best round counts")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    rows = run_all(args)
    text = table(rows, args)
    print(text)
    if not args.no_write:
        from results import RESULTS, write_section

        write_section(SECTION, text)
        print(f"wrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
