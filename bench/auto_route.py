"""`model="auto"` and `model="a+b"` on the demo world, measured side by side in one run (issue 24).

    python bench/auto_route.py                  # the demo's training (train's defaults), ~10 min on 2 CPUs
    python bench/auto_route.py --steps 100 --n 30

1. The demo base and its sum/fill/cross sets, trained as `expertlib demo` trains them
   (`expertlib.demo.run.train_task_set`: train's defaults; training records each set's routing
   profile and base anchors). Sets already trained with the same steps and batch in the work folder are reused.
2. Offline, in transformers: every held-out prompt's routing under the base (chat template applied,
   as the server tokenizes it) scored against each set's profile and each base anchor the sets carry
   (`expertlib.profile.similarity`, what the server computes): the similarity of the intended
   candidate, its margin over the best other, and the pick at every threshold, from which
   `--auto-threshold` is calibrated. Also why `sum+fill` can answer sum worse than sum alone
   (`composition_loss`: sum's routing on fill's experts; accuracy alone, composed, and composed
   without fill's experts of one layer, on every sum prompt there is).
3. Served: one `expertlib serve` with the three sets (float32, eager); every held-out prompt of the
   demo tasks and of the base's pretraining tasks (general and domain) asked with `model="auto"` and
   with the set (or the base) named; `sum+fill` asked the sum and fill prompts. Picks are the
   response's `model`.
4. Latency: the same prompts streamed one at a time, auto and explicit alternating: time to first
   token and decode tokens/s (a fixed number of tokens, `ignore_eos`), medians of per-pair ratios.
5. The routing capture's cost: a base-only batch decoded in one in-process engine three ways per
   round, rotating: the capture as shipped, always counted (as before it was gated), off.

Prints a table and writes bench/auto_route.json. Nothing is downloaded; servers listen on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
THRESHOLDS = [round(x, 2) for x in np.arange(0.30, 1.0001, 0.05)]


def train_sets(base: Path, workdir: Path, steps: int | None, log) -> dict[str, Path]:
    """The demo's sets, trained as `expertlib demo` does (reused when trained with the same steps and
    batch; `steps` None: the demo's)."""
    from expertlib.demo.run import DemoSettings, train_task_set
    from expertlib.demo.tasks import DEMO_TASKS
    from expertlib.patch import ExpertSet

    s = DemoSettings(steps=steps, server=False, progress=False, workdir=str(workdir))
    stamp = workdir / "trained.json"
    done = json.loads(stamp.read_text()) if stamp.exists() else {}
    paths = {}
    for task in DEMO_TASKS:
        out = workdir / "sets" / f"{task}.safetensors"
        fresh = done.get(task) == [s.steps, s.batch_size] and out.exists()
        prov = ExpertSet.open(out).manifest.provenance if fresh else None
        if prov is not None and prov.routing_profile is not None and prov.base_anchors:
            paths[task] = out
            log(f"  {task}: reusing {out}")
            continue
        t0 = time.perf_counter()
        paths[task], _ = train_task_set(base, task, workdir, s, log=log)
        done[task] = [s.steps, s.batch_size]
        stamp.write_text(json.dumps(done))
        log(f"  {task}: trained in {time.perf_counter() - t0:.0f} s")
    return paths


def heldout(tasks: list[str], n: int) -> dict[str, list]:
    """Each task's first `n` eval prompts (the demo's held-out split) and its answer budget."""
    from expertlib.demo.tasks import get_task

    return {t: get_task(t).split(n_train=0, n_eval=n, seed=0).eval for t in tasks}


def offline_scores(base: Path, sets: dict[str, Path], prompts: dict[str, list]) -> dict[str, list[dict]]:
    """task -> per prompt {candidate: similarity} of its routing under the base to each set's profile
    and to each base anchor the sets carry (keys `base:NAME`), as the server scores them."""
    from expertlib.esft.data import Sample, load_tokenizer, pad_token_id
    from expertlib.esft.profiling import prompt_profile
    from expertlib.moe import load_model
    from expertlib.patch import ExpertSet
    from expertlib.profile import similarity
    from expertlib.server.sets import ANCHOR_PREFIX

    model = load_model(base)
    tok = load_tokenizer(base)
    provs = {t: ExpertSet.open(p).manifest.provenance for t, p in sets.items()}
    candidates = {t: p.routing_profile.arrays() for t, p in provs.items()}
    for p in provs.values():
        for name, prof in p.base_anchors.items():
            candidates.setdefault(ANCHOR_PREFIX + name, prof.arrays())
    out: dict[str, list[dict]] = {}
    for task, exs in prompts.items():
        rows = []
        for ex in exs:
            text = tok.apply_chat_template(
                [{"role": "user", "content": ex.prompt}], add_generation_prompt=True, tokenize=False
            )
            ids = tok.encode(text, add_special_tokens=False)  # as the server tokenizes a chat request
            prof = prompt_profile(model, [Sample(tuple(ids), (-100,) * len(ids))], pad_id=pad_token_id(tok))
            rows.append({s: similarity(prof.arrays(), p) for s, p in candidates.items()})
        out[task] = rows
    return out


def pick(scores: dict[str, float], threshold: float) -> str | None:
    """The server's decision: the best candidate if it is a set and reaches `threshold`, else None."""
    from expertlib.server.sets import ANCHOR_PREFIX

    best = max(scores, key=lambda n: (scores[n], n))
    return best if scores[best] >= threshold and not best.startswith(ANCHOR_PREFIX) else None


def calibrate(
    scores: dict[str, list[dict]], intended: dict[str, str | None]
) -> dict[float, dict[str, float]]:
    """threshold -> task -> share of prompts picked as intended (offline)."""
    return {
        th: {t: float(np.mean([pick(r, th) == intended[t] for r in rows])) for t, rows in scores.items()}
        for th in THRESHOLDS
    }


def composition_loss(base: Path, sets: dict[str, Path], a: str, b: str, n: int = 100) -> dict:
    """Why `a+b` can answer `a` worse than `a` alone, measured in transformers on `n` held-out prompts
    of each (100: every sum prompt there is): the share of `a`'s top-k picks under the base (prompt
    and answer tokens, teacher-forced) that land on the experts `b` replaces, per layer; `a`'s and
    `b`'s greedy accuracy alone and composed, the prompts `a+b` gets wrong; and, as the policies one
    remap row allows, the composition without `b`'s experts of one layer (`a`'s tokens there get the
    base's expert back, `b`'s lose theirs)."""
    import torch

    from expertlib.apply import apply_expert_set
    from expertlib.compose import compose_sets
    from expertlib.demo.evaluate import answer_budget, generate_answers
    from expertlib.demo.tasks import get_task
    from expertlib.esft.data import Sample, load_tokenizer, pad_token_id
    from expertlib.esft.profiling import prompt_profile
    from expertlib.moe import load_model
    from expertlib.patch import ExpertSet, pair_key

    model = load_model(base)
    tok = load_tokenizer(base)
    prompts = heldout([a, b], n)
    sa, sb = ExpertSet.open(sets[a]), ExpertSet.open(sets[b])
    samples = []
    for ex in prompts[a]:
        msgs = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer}]
        ids = tok.encode(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)
        samples.append(Sample(tuple(ids), (-100,) * len(ids)))  # every token counted
    shares = prompt_profile(model, samples, pad_id=pad_token_id(tok), token_budget=None).arrays()
    on_b = {layer: float(shares[layer][ids].sum()) for layer, ids in sb.manifest.experts.items() if ids}

    def accuracy(task: str, es) -> tuple[float, list[str]]:
        exs = prompts[task]
        with apply_expert_set(model, es):
            preds = generate_answers(model, tok, [ex.prompt for ex in exs], max_new_tokens=answer_budget(exs))
        ok = [bool(get_task(task).score(p, ex.answer)) for p, ex in zip(preds, exs, strict=True)]
        wrong = [f"{ex.prompt} -> {p}" for p, ex, k in zip(preds, exs, ok, strict=True) if not k]
        return float(np.mean(ok)), wrong

    def without_layer(es: ExpertSet, layer: int) -> ExpertSet:
        m = es.manifest
        kept = [pair for pair in m.pairs() if pair[0] != layer]
        return ExpertSet.build(
            task=f"{m.task}-without-{layer}",
            base=m.base,
            experts={pair: es.expert(*pair) for pair in kept},
            base_digests={pair: m.base_expert_digests[pair_key(*pair)] for pair in kept},
            dtype=getattr(torch, m.dtype),
        )

    both = compose_sets([sa, sb])
    a_both, wrong = accuracy(a, both)
    out = {
        "prompts": {a: len(prompts[a]), b: len(prompts[b])},
        "share_on_b_experts": {str(layer): round(v, 4) for layer, v in sorted(on_b.items())},
        f"{a}_alone": accuracy(a, sa)[0],
        f"{a}+{b}": a_both,
        f"{a}+{b}_wrong": wrong,
        f"{b}_alone": accuracy(b, sb)[0],
        f"{b}_in_{a}+{b}": accuracy(b, both)[0],
        "without_b_layer": {},
    }
    for layer, ids in sorted(sb.manifest.experts.items()):
        if ids and sb.manifest.num_experts > len(ids):
            trimmed = compose_sets([sa, without_layer(sb, layer)])
            out["without_b_layer"][str(layer)] = {a: accuracy(a, trimmed)[0], b: accuracy(b, trimmed)[0]}
    return out


# --- served ---------------------------------------------------------------------------------------


def start(base: Path, sets: list[Path], log_path: Path, *, threshold: float):
    """`expertlib serve` on the demo base with `sets` (float32 and eager, for a short start), as its
    own process group. Returns (process, url)."""
    import subprocess

    from expertlib.demo.serving import BASE_NAME
    from expertlib.server import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "expertlib.cli.main", "serve", str(base), "--served-name", BASE_NAME]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--max-sets", "6", "--auto-threshold", str(threshold)]
    for p in sets:
        cmd += ["--expert-set", str(p)]
    cmd += ["--engine-arg", "dtype=float32", "--engine-arg", "enforce_eager=true"]
    cmd += ["--engine-arg", "max_num_seqs=32"]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    logf = open(log_path, "w")  # noqa: SIM115 - the child's log, closed by stop_server
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    proc._expertlib_log = logf  # type: ignore[attr-defined]
    return proc, f"http://127.0.0.1:{port}"


async def ask(client, url: str, model: str, prompt: str, budget: int) -> tuple[str, str]:
    r = await client.post(
        url + "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": budget,
            "temperature": 0.0,
        },
    )
    r.raise_for_status()
    body = r.json()
    return body["choices"][0]["message"]["content"] or "", body["model"]


async def accuracy_phase(
    url: str, base_name: str, prompts: dict[str, list], demo: list[str], concurrency: int
):
    """Per task and model ('auto', the set or base named, 'sum+fill'): answers correct and picks."""
    import httpx

    from expertlib.demo.evaluate import answer_budget
    from expertlib.demo.tasks import get_task

    sem = asyncio.Semaphore(concurrency)
    results: dict[str, dict[str, list]] = {}

    async with httpx.AsyncClient(timeout=300) as client:

        async def one(task, model, ex, budget):
            async with sem:
                text, served = await ask(client, url, model, ex.prompt, budget)
            ok = bool(get_task(task).score(text, ex.answer))
            results.setdefault(task, {}).setdefault(
                model if model in ("auto", "sum+fill") else "explicit", []
            ).append((ok, served))

        # the composition's first request loads it; concurrent first requests can race that load
        # (one answered 404 in a run here: reported, not measured), so it is loaded before the rest
        await ask(client, url, "sum+fill", prompts["sum"][0].prompt, 4)
        jobs = []
        for task, exs in prompts.items():
            budget = answer_budget(exs)
            models = ["auto", task if task in demo else base_name]
            if task in ("sum", "fill"):
                models.append("sum+fill")
            jobs += [one(task, m, ex, budget) for ex in exs for m in models]
        await asyncio.gather(*jobs)
    return results


async def stream_one(client, url: str, model: str, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(time to first token s, decode tokens/s after it, tokens) of one streamed request."""
    t0 = time.perf_counter()
    first = last = None
    n = 0
    async with client.stream(
        "POST",
        url + "/v1/completions",
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
        },
    ) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                continue
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
    ttft = (first or time.perf_counter()) - t0
    rate = (n - 1) / (last - first) if n > 1 and last > first else float("nan")
    return ttft, rate, n


async def latency_phase(url: str, prompts: dict[str, list], demo: list[str], per_task: int, tokens: int):
    """auto vs the set named, alternating, one request at a time: TTFT and decode tokens/s."""
    import httpx

    out = {"auto": [], "explicit": []}
    async with httpx.AsyncClient(timeout=300) as client:
        for task in demo:
            for ex in prompts[task][:per_task]:
                for model, key in (("auto", "auto"), (task, "explicit")):
                    out[key].append(await stream_one(client, url, model, ex.prompt, tokens))
    return out


def capture_cost(base: Path, prompts: list[str], tokens: int, rounds: int) -> dict:
    """The routing capture's cost on a base-only batch, in one in-process engine (eager), so the
    machine's load moves every arm alike: each round decodes the batch three ways in rotating order,
    the capture as shipped (counted only in steps holding a `model="auto"` request: none here),
    always counted (the capture before that), and switched off. Completion tokens/s per batch."""
    from vllm import SamplingParams

    from expertlib.engine import ExpertEngine
    from expertlib.vllm_plugin import routing

    shipped = routing.SlotContext.counting
    arms = {"shipped": (True, shipped), "always": (True, lambda self: True), "off": (False, shipped)}
    rates: dict[str, list[float]] = {k: [] for k in arms}
    eng = ExpertEngine(base, dtype="float32", enforce_eager=True, max_num_seqs=32)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    try:
        eng.generate(prompts, None, params)  # warm-up
        names = list(arms)
        for i in range(rounds):
            for k in names[i % 3 :] + names[: i % 3]:
                routing.ROUTING_CAPTURE, routing.SlotContext.counting = arms[k]
                t0 = time.perf_counter()
                outs = eng.generate(prompts, None, params)
                wall = time.perf_counter() - t0
                rates[k].append(sum(len(o.outputs[0].token_ids) for o in outs) / wall)
    finally:
        routing.ROUTING_CAPTURE, routing.SlotContext.counting = True, shipped
        eng.shutdown()
    ratio = {
        k: float(np.median([x / y for x, y in zip(rates[k], rates["off"], strict=True)]))
        for k in ("shipped", "always")
    }
    # what the count itself costs a decode step of this batch, against the fastest step seen: both
    # minima, which the machine's load can only raise
    count_s = count_cost(base, len(prompts))
    step_s = len(prompts) / max(rates["off"])
    return {
        "tok_s": rates,
        "ratio_to_off": ratio,
        "count_us_per_step": count_s * 1e6,
        "fastest_step_ms": step_s * 1e3,
        "count_share_of_step": count_s / step_s,
    }


def count_cost(base: Path, tokens: int, repeats: int = 2000) -> float:
    """Seconds the routing count takes in one step of `tokens` tokens (`SlotContext.count_routing` on
    every MoE layer of `base`'s shape), the minimum over `repeats`."""
    import torch

    from expertlib.identity import load_config
    from expertlib.shape import ModelShape
    from expertlib.vllm_plugin import routing

    shape = ModelShape.from_config(load_config(base))
    layers = len(shape.moe_layers)
    ctx = routing.SlotContext(
        num_layers=layers, num_experts=shape.num_experts, slots=1, max_sets=1, max_tokens=tokens, device="cpu"
    )
    ids = torch.randint(0, shape.num_experts, (tokens, shape.top_k), dtype=torch.int32)  # (T, K)
    ctx.set_capture([1], [tokens])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for layer in range(layers):
            ctx.count_routing(layer, ids)
        best = min(best, time.perf_counter() - t0)
    return best


def _share(rows, want) -> float:
    return float(np.mean([x == want for x in rows])) if rows else float("nan")


def main(argv: list[str] | None = None) -> int:
    from expertlib.demo.base import build_demo_base, cache_dir, pick_threads
    from expertlib.demo.run import DemoSettings
    from expertlib.demo.serving import BASE_NAME, stop_server
    from expertlib.demo.tasks import DEMO_TASKS, PRETRAIN_TASKS
    from expertlib.server import wait_ready
    from expertlib.server.settings import ServerSettings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per set (default: the demo's, train's defaults)",
    )
    ap.add_argument("--n", type=int, default=40, help="held-out prompts per task")
    ap.add_argument(
        "--threshold", type=float, default=None, help="--auto-threshold served (default: the server's)"
    )
    ap.add_argument(
        "--latency-prompts", type=int, default=16, help="streamed prompts per demo task and model"
    )
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded per streamed request")
    ap.add_argument(
        "--batch-tokens", type=int, default=64, help="tokens per request of the capture-cost rows"
    )
    ap.add_argument("--batch", type=int, default=16, help="base-only batch of the capture-cost rows")
    ap.add_argument("--rounds", type=int, default=15, help="rotating rounds of the capture-cost rows")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workdir", default=None, help="default: the cache's demo/auto-bench folder")
    ap.add_argument("--out", default=str(ROOT / "bench" / "auto_route.json"))
    a = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the capture-cost engine runs in process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    threshold = (
        a.threshold if a.threshold is not None else ServerSettings.model_fields["auto_threshold"].default
    )
    workdir = Path(a.workdir) if a.workdir else cache_dir() / "demo" / "auto-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(pick_threads())
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    demo, general = list(DEMO_TASKS), list(PRETRAIN_TASKS)
    intended = {**{t: t for t in demo}, **{t: None for t in general}}
    a.steps = DemoSettings(steps=a.steps, server=False).steps
    report: dict = {"steps": a.steps, "n": a.n, "threshold": threshold, "load_before": os.getloadavg()}

    log(f"[1/5] demo base and sets ({a.steps} steps each)")
    base = build_demo_base(progress=False)
    sets = train_sets(base, workdir, a.steps, log)
    report["train_s"] = round(time.perf_counter() - t_start, 1)

    log("[2/5] server starting; offline routing scores and the sum+fill analysis meanwhile")
    proc, url = start(base, list(sets.values()), workdir / "server.log", threshold=threshold)
    try:
        prompts = heldout(demo + general, a.n)
        t0 = time.perf_counter()
        scores = offline_scores(base, sets, prompts)
        cal = calibrate(scores, intended)
        report["offline_s"] = round(time.perf_counter() - t0, 1)
        report["calibration"] = {str(th): v for th, v in cal.items()}
        report["similarity"] = {
            t: {
                "intended_mean": float(np.mean([r[t] for r in rows])) if t in demo else None,
                "intended_min": float(min(r[t] for r in rows)) if t in demo else None,
                "best_set_max": float(max(max(v for k, v in r.items() if k in demo) for r in rows)),
                "own_anchor_min": float(min(r.get("base:" + t, 0.0) for r in rows)) if t in general else None,
                "margin_min": float(min(_margin(r, t if t in demo else "base:" + t) for r in rows)),
            }
            for t, rows in scores.items()
        }
        report["sum+fill"] = composition_loss(base, sets, "sum", "fill")
        t0 = time.perf_counter()
        wait_ready(url, timeout_s=900, proc=proc, log_path=workdir / "server.log")
        report["ready_wait_s"] = round(time.perf_counter() - t0, 1)

        log("[3/5] served accuracy and picks: auto vs named, sum+fill")
        t0 = time.perf_counter()
        res = asyncio.run(accuracy_phase(url, BASE_NAME, prompts, demo, a.concurrency))
        report["accuracy_s"] = round(time.perf_counter() - t0, 1)
        rows = {}
        for t in demo + general:
            r = res[t]
            want = t if t in demo else BASE_NAME
            rows[t] = {
                "auto_pick": _share([served.split("@")[0] for _, served in r["auto"]], want),
                "offline_pick": _share([pick(s, threshold) for s in scores[t]], intended[t]),
                "auto_acc": _share([ok for ok, _ in r["auto"]], True),
                "explicit_acc": _share([ok for ok, _ in r["explicit"]], True),
                "picked": sorted({served for _, served in r["auto"]}),
            }
            if "sum+fill" in r:
                rows[t]["sum+fill_acc"] = _share([ok for ok, _ in r["sum+fill"]], True)
        report["rows"] = rows

        log("[4/5] time to first token and decode, auto vs named (one request at a time, in pairs)")
        lat = asyncio.run(latency_phase(url, prompts, demo, a.latency_prompts, a.tokens))
        pairs = list(zip(lat["auto"], lat["explicit"], strict=True))
        report["latency"] = {
            **{
                k: {
                    "ttft_ms": float(np.median([x[0] for x in v]) * 1e3),
                    "decode_tok_s": float(np.nanmedian([x[1] for x in v])),
                    "requests": len(v),
                }
                for k, v in lat.items()
            },
            "ttft_ratio": float(np.median([x[0] / y[0] for x, y in pairs])),
            "decode_ratio": float(np.nanmedian([x[1] / y[1] for x, y in pairs])),
        }
    finally:
        stop_server(proc)

    log("[5/5] the routing capture's cost: a base-only batch, one in-process engine, three arms")
    batch = [ex.prompt for t in general for ex in prompts[t]][: a.batch]
    report["capture"] = capture_cost(base, batch, a.batch_tokens, a.rounds)
    report["load_after"] = os.getloadavg()
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    Path(a.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print_report(report, demo, general)
    return 0


def _margin(row: dict[str, float], own: str) -> float:
    """A prompt's similarity to its own candidate less the best other candidate's."""
    return row[own] - max(v for k, v in row.items() if k != own)


def print_report(r: dict, demo: list[str], general: list[str]) -> None:
    print(
        f"\nthreshold {r['threshold']}, {r['n']} held-out prompts per task, sets trained {r['steps']} steps"
    )
    print(
        f"{'task':8} {'auto picks':>10} {'offline':>8} {'auto acc':>8} {'named':>6} {'ratio':>6} "
        f"{'sum+fill':>8}  picked"
    )
    for t in demo + general:
        x = r["rows"][t]
        ratio = x["auto_acc"] / x["explicit_acc"] if x["explicit_acc"] else float("nan")
        sf = f"{x['sum+fill_acc']:.2f}" if "sum+fill_acc" in x else ""
        print(
            f"{t:8} {x['auto_pick']:10.2f} {x['offline_pick']:8.2f} {x['auto_acc']:8.2f} "
            f"{x['explicit_acc']:6.2f} {ratio:6.2f} {sf:>8}  {', '.join(x['picked'])}"
        )
    la = r["latency"]
    print(
        f"TTFT ms (median): auto {la['auto']['ttft_ms']:.1f}, named {la['explicit']['ttft_ms']:.1f} "
        f"(median of per-pair ratios x{la['ttft_ratio']:.2f}); decode tok/s: auto "
        f"{la['auto']['decode_tok_s']:.1f}, named {la['explicit']['decode_tok_s']:.1f} (x{la['decode_ratio']:.2f})"
    )
    c = r["capture"]
    med = {k: np.median(v) for k, v in c["tok_s"].items()}
    print(
        f"base-only batch tok/s (median): shipped {med['shipped']:.1f}, always counted {med['always']:.1f}, "
        f"off {med['off']:.1f}; median per-round ratio to off: shipped x{c['ratio_to_off']['shipped']:.3f}, "
        f"always x{c['ratio_to_off']['always']:.3f}"
    )
    print(
        f"the count itself: {c['count_us_per_step']:.0f} us per decode step of the batch, "
        f"{c['count_share_of_step']:.2%} of the fastest step seen ({c['fastest_step_ms']:.1f} ms)"
    )
    print(f"sum+fill analysis: {json.dumps(r['sum+fill'])}")
    print("offline pick rate per threshold (min over demo tasks / min over general tasks):")
    for th, v in r["calibration"].items():
        print(f"  {th}: {min(v[t] for t in demo):.2f} / {min(v[t] for t in general):.2f}")
    print(f"load average before {r['load_before']}, after {r['load_after']}; total {r['total_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
