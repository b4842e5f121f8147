"""lm-evaluation-harness, the field's standard evaluation client, against a real `expertlib serve`
(tiny base, two expert sets), on the custom tasks in tests/lm_eval_tasks: a log-likelihood
multiple-choice task and a generation task. Every log-likelihood lm-eval receives equals the one
transformers computes with the set applied, and every generated answer equals the set's greedy
answer computed offline.

One server, shared with other modules that only ask it (conftest's `shared_server`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("vllm")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm_eval[api]: the API models need it

from served_world import BASE_NAME, Reference  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TASKS = Path(__file__).parent / "lm_eval_tasks"
ATOL = 1e-4  # summed float32 log-probabilities; measured differences are ~1e-6
MODELS = [(BASE_NAME, None), ("alpha", "alpha"), ("beta@1", "beta")]
MAX_GEN = 8  # expertlib_gen.yaml's max_gen_toks


@pytest.fixture(scope="module")
def world(tmp_path_factory, shared_server):
    ref = shared_server["ref"]
    tasks = tmp_path_factory.mktemp("lm-eval") / "tasks"
    shutil.copytree(TASKS, tasks)
    for yaml in tasks.glob("*.yaml"):  # data files by absolute path: lm-eval resolves them from the cwd
        text = yaml.read_text()
        for data in tasks.glob("*.jsonl"):
            text = text.replace(f"test: {data.name}", f"test: {data}")
        yaml.write_text(text)
    # the generation task's answers are alpha's (as if alpha had been trained on this task)
    docs = [json.loads(line) for line in (tasks / "gen.jsonl").read_text().splitlines()]
    for doc in docs:
        doc["answer"] = completion_answer(ref, doc["question"], "alpha")
    (tasks / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return dict(url=shared_server["url"], ref=ref, base_dir=shared_server["base_dir"], tasks=tasks)


def _until_newline(ref: Reference, ids: list[int], expert_set: str | None) -> str:
    text = ref.tok.decode(ref.greedy(ids, expert_set, MAX_GEN), skip_special_tokens=True)
    return text.split("\n")[0]


def completion_answer(ref: Reference, prompt: str, expert_set: str | None) -> str:
    return _until_newline(ref, ref.tok.encode(prompt, add_special_tokens=False), expert_set)


def chat_answer(ref: Reference, prompt: str, expert_set: str | None) -> str:
    msgs = [{"role": "user", "content": prompt}]
    text = ref.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return _until_newline(ref, ref.tok.encode(text, add_special_tokens=False), expert_set)


def loglikelihood(ref: Reference, context: str, continuation: str, expert_set: str | None) -> float:
    """What lm-eval asks for, tokenized as lm-eval does (trailing spaces move to the continuation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = ref.tok(context + continuation, add_special_tokens=False).input_ids
    ctx = ref.tok(context, add_special_tokens=False).input_ids
    return ref.loglikelihood(ctx, whole[len(ctx) :], expert_set)


def evaluate(world, model: str, kind: str, tasks: list[str]) -> dict:
    from lm_eval.tasks import TaskManager

    if kind == "local-completions":
        args = f"model={model},base_url={world['url']}/v1/completions,tokenizer={world['base_dir']}"
        args += ",tokenizer_backend=huggingface,max_retries=1"
    else:
        args = f"model={model},base_url={world['url']}/v1/chat/completions,max_retries=1"
    return lm_eval.simple_evaluate(
        model=kind,
        model_args=args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(world["tasks"])),
        log_samples=True,
        apply_chat_template=kind == "local-chat-completions",
    )


def test_local_completions_both_task_types_per_set(world):
    ref = world["ref"]
    scores = {}
    for model, es in MODELS:
        out = evaluate(world, model, "local-completions", ["expertlib_mc", "expertlib_gen"])
        right = []
        for sample in out["samples"]["expertlib_mc"]:
            got = [ll for ll, _greedy in sample["filtered_resps"]]
            want = [loglikelihood(ref, ctx, cont, es) for ctx, cont in sample["arguments"]]
            assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < ATOL, (model, sample["doc_id"])
            right.append(max(range(len(want)), key=want.__getitem__) == sample["target"])
        mc = out["results"]["expertlib_mc"]["acc,none"]
        assert mc == pytest.approx(sum(right) / len(right))
        for sample in out["samples"]["expertlib_gen"]:
            prompt = sample["arguments"][0][0]
            assert sample["filtered_resps"][0] == completion_answer(ref, prompt, es), (model, prompt)
        scores[model] = (mc, out["results"]["expertlib_gen"]["exact_match,none"])
    assert scores["alpha"][1] == 1.0 and scores[BASE_NAME][1] < 1.0  # the set changes the answers
    assert scores["alpha"][0] != scores[BASE_NAME][0]  # and the multiple-choice score
    print("lm-eval scores (acc, exact_match):", scores)


def test_local_chat_completions_generation(world):
    ref = world["ref"]
    for model, es in [(BASE_NAME, None), ("alpha", "alpha")]:
        out = evaluate(world, model, "local-chat-completions", ["expertlib_gen"])
        samples = out["samples"]["expertlib_gen"]
        for sample in samples:
            prompt = json.loads(sample["arguments"][0][0][0])[-1]["content"]
            assert sample["filtered_resps"][0] == chat_answer(ref, prompt, es), (model, prompt)
        want = sum(chat_answer(ref, s["doc"]["question"], es) == s["target"] for s in samples) / len(samples)
        assert out["results"]["expertlib_gen"]["exact_match,none"] == pytest.approx(want)
