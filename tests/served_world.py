"""A real `expertlib serve` process on a tiny base with two expert sets, and the in-process
transformers reference it is checked against. Every module that serves a tiny world builds it here
(`build`, `serve_args`, `serve`); each module starts one server.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from server_process import ServerProcess, free_port, serve_argv

BASE_NAME = "tiny-moe"
CTX = 256
SETS = {"alpha": {0: [1, 3], 1: [0, 5]}, "beta": {0: [2], 1: [1, 6, 7]}}  # name -> experts replaced
SCALE = 2.0  # perturbation of the replaced experts: large, so the sets change answers


def build(
    root: Path,
    sets: dict[str, dict[int, list[int]]] = SETS,
    *,
    scale: float | None = SCALE,
    publish: tuple[str, ...] | None = None,
    edit=None,
    registry: str = "registry",
) -> tuple[Path, dict]:
    """A tiny qwen2_moe base at root/base and a random set per entry of `sets` (name -> experts it
    replaces; seeded by position, perturbed by `scale`, None: random_expert_set's own), saved as
    root/NAME.safetensors and published to root/`registry` (the names in `publish`, default all).
    `edit(name, expert_set, model)` may replace a set before it is saved. Returns (base folder, sets)."""
    from expertlib.moe import load_model
    from expertlib.registry import Registry
    from expertlib.vllm_plugin.testing import make_vllm_tiny_base, random_expert_set

    base_dir = root / "base"
    make_vllm_tiny_base("qwen2_moe", base_dir)
    model = load_model(base_dir)
    made = {}
    for i, (name, m) in enumerate(sets.items()):
        es = random_expert_set(model, name, m, seed=i + 1, **({} if scale is None else {"scale": scale}))
        made[name] = edit(name, es, model) if edit is not None else es
    reg = Registry(root / registry)
    for name, es in made.items():
        path = es.save(root / f"{name}.safetensors")
        if publish is None or name in publish:
            reg.publish(path, base=base_dir)
    return base_dir, made


def serve_args(root: Path, base_dir: Path, port: int, expert_sets=("alpha", "beta")) -> list[str]:
    """`expertlib serve` of the built world: its registry, these sets at start, float32, eager."""
    argv = serve_argv(str(base_dir), "--served-name", BASE_NAME, "--registry", str(root / "registry"))
    for name in expert_sets:
        argv += ["--expert-set", name]
    argv += ["--slots", "8", "--max-sets", "4", "--port", str(port)]
    argv += ["--engine-arg", "enforce_eager=true", "--engine-arg", "dtype=float32"]
    argv += ["--engine-arg", f"max_model_len={CTX}", "--engine-arg", "max_num_seqs=16"]
    return argv


@contextlib.contextmanager
def serve(root: Path, base_dir: Path, *extra: str):
    """`expertlib serve` with both sets loaded, float32, until the block ends; yields its URL."""
    port = free_port()
    with ServerProcess(
        [*serve_args(root, base_dir, port), *extra], port, root / f"server-{port}.log"
    ) as server:
        server.wait_ready()
        yield server.url


class Reference:
    """The same base in transformers (float32), a set applied in place: log-probabilities and greedy
    continuations computed offline."""

    def __init__(self, base_dir: Path, sets: dict):
        from transformers import AutoTokenizer

        from expertlib.moe import load_model

        self.model = load_model(base_dir)
        self.tok = AutoTokenizer.from_pretrained(str(base_dir))
        self.sets = sets
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def applied(self, expert_set: str | None):
        from expertlib.apply import apply_expert_set

        with self.lock:
            if expert_set is None:
                yield self.model
            else:
                with apply_expert_set(self.model, self.sets[expert_set]):
                    yield self.model

    def token_logprobs(self, ids: list[int], expert_set: str | None):
        """(T-1,) log p(ids[t] | ids[:t]) for t >= 1, and the (T-1, V) log-softmax rows."""
        import torch

        with torch.no_grad(), self.applied(expert_set) as model:
            logits = model(torch.tensor([ids])).logits[0].float()
        rows = torch.log_softmax(logits[:-1], dim=-1)
        return rows.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], rows

    def loglikelihood(self, context: list[int], continuation: list[int], expert_set: str | None) -> float:
        lp, _ = self.token_logprobs(context + continuation, expert_set)
        return float(lp[len(context) - 1 :].sum())

    def greedy(self, ids: list[int], expert_set: str | None, max_tokens: int) -> list[int]:
        import torch

        gen = dict(max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.tok.pad_token_id)
        with torch.no_grad(), self.applied(expert_set) as model:
            out = model.generate(torch.tensor([ids]), **gen)
        return out[0, len(ids) :].tolist()
