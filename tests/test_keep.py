"""What an ESFT run keeps: --keep selection end to end, the manifest record, the base's own samples,
the --keep suggestion, --keep-mix training and the after-training fit verdict."""

from __future__ import annotations

import json
import random
import shlex

import pytest
import torch
from click.testing import CliRunner

from expertlib.cli.main import cli
from expertlib.errors import SelectionError
from expertlib.esft.data import load_samples, load_tokenizer
from expertlib.esft.keep import FitReport, resolve_keep, self_samples
from expertlib.esft.pipeline import DataConfig, RuntimeConfig, SelectionConfig, train_esft
from expertlib.esft.selection import ExpertConfig
from expertlib.esft.training import TrainConfig, mix_batch, train_experts
from expertlib.moe import load_model
from expertlib.patch import ExpertSet


def _rows(words, fmt="say {w}"):
    return [
        {"messages": [{"role": "user", "content": fmt.format(w=w)}, {"role": "assistant", "content": w}]}
        for w in words
    ]


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTLIB_CACHE", str(tmp_path / "cache"))
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in _rows("abcdefgh")))
    kept = tmp_path / "kept.jsonl"
    kept.write_text("".join(json.dumps(r) + "\n" for r in _rows(["12", "345", "67", "890"], "n {w}")))
    return task, kept


def _train(base, task, out, **selection):
    return train_esft(
        base,
        task,
        task="say",
        out=out,
        selection=SelectionConfig(top_p=0.5, **selection),
        config=TrainConfig(steps=1, lr=1e-3, batch_size=4),
        runtime=RuntimeConfig(device="cpu", progress=False),
    )


def test_keep_selection_is_recorded_and_stays_under_the_share(tmp_path, tiny_model_dir, data):
    base, (task, _) = tiny_model_dir("qwen2_moe"), data
    paper = _train(base, task, tmp_path / "paper.safetensors", keep=("none",))
    assert "keep" not in paper.manifest.provenance.extra or paper.manifest.provenance.extra["keep"] is None
    # keeping the task's own data: the budget keeps at most 0.3 of it per layer
    es = _train(
        base, task, tmp_path / "kept.safetensors", keep=(str(task),), keep_mode="budget", keep_share=0.3
    )
    rec = es.manifest.provenance.extra["keep"]
    assert rec["sources"][0]["name"] == str(task) and rec["sources"][0]["kind"] == "file"
    assert (
        rec["sources"][0]["digest"].startswith("sha256:") and rec["mode"] == "budget" and rec["share"] == 0.3
    )
    assert all(v[0] <= 0.3 + 1e-6 for v in rec["kept_share"].values()), rec
    assert max(v[0] for v in rec["paper_kept_share"].values()) >= 0.5 - 1e-6  # top-p 0.5 of its own routing
    assert rec["dropped"] and set(rec["dropped"]) == set(rec["dropped_task_share"])
    trained = {int(k): v for k, v in es.manifest.experts.items()}
    for layer, ids in rec["dropped"].items():
        assert not set(ids) & set(trained.get(int(layer), []))  # what was dropped did not train
    assert es.manifest.num_experts < paper.manifest.num_experts
    # a budget nothing fits: refused, naming the trade-off (nothing is written)
    with pytest.raises(
        SelectionError, match="every expert the task routes through carries kept routing"
    ) as e:
        _train(base, task, tmp_path / "none.safetensors", keep=(str(task),), keep_share=0.01)
    assert "--keep none" in e.value.hint and not (tmp_path / "none.safetensors").exists()
    # kept by default (auto): trained anyway, and recorded
    auto = _train(
        base, task, tmp_path / "auto.safetensors", keep=("auto",), keep_mode="budget", keep_share=0.001
    )
    assert auto.manifest.provenance.extra["keep"]["fallback"] is True
    assert auto.manifest.experts == paper.manifest.experts


def test_auto_keeps_the_base_own_samples_cached(tmp_path, tiny_model_dir, data, monkeypatch):
    base = tiny_model_dir("qwen2_moe")
    model, tok = load_model(base), load_tokenizer(base)
    kept = resolve_keep(["auto"], base, model, tok)
    assert [k.kind for k in kept] == ["self"] and kept[0].samples
    path = self_samples(model, tok)
    assert path.is_relative_to(tmp_path / "cache")
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows and all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)

    def no_generation(*a, **k):
        raise AssertionError("generated again: the cache was not used")

    monkeypatch.setattr(model, "generate", no_generation)
    assert resolve_keep(["self"], base, model, tok)[0].digest == kept[0].digest
    assert resolve_keep(["none"], base, model, tok) == []
    with pytest.raises(Exception, match="cannot be combined"):
        resolve_keep(["none", "auto"], base, model, tok)


def train_argv(base, task, *, steps: int, lr: float) -> list[str]:
    """`expertlib train` on a tiny base with the task `say`, batch 4 (the options the tests add follow)."""
    return [
        "train",
        str(base),
        str(task),
        "--task",
        "say",
        "--steps",
        str(steps),
        "--lr",
        str(lr),
        "--batch-size",
        "4",
    ]


def test_train_suggests_the_keep_command_when_the_check_flags_a_risk(tmp_path, tiny_model_dir, data):
    base, (task, general) = tiny_model_dir("qwen2_moe"), data
    args = train_argv(base, task, steps=1, lr=0.001)
    args += ["--out", str(tmp_path / "s.safetensors"), "--general", str(general)]
    res = CliRunner().invoke(cli, [*args, "--keep", "none"])
    assert res.exit_code == 0, res.output
    assert "retention risk: in layers" in res.stderr  # a tiny random base routes every token alike
    suggested = res.stderr.split("train with:\n  ", 1)[1].splitlines()[0]
    argv = shlex.split(suggested)
    assert argv[:2] == ["expertlib", "train"] and argv[-2:] == ["--keep", str(general)] and "none" not in argv
    assert all(a in argv for a in args[1:])  # every option the user gave, then the --keep that avoids it
    # the suggested command keeps the general data: it runs, and the selection no longer carries it
    res = CliRunner().invoke(cli, argv[1:])
    assert res.exit_code == 0, res.output
    assert "train with:" not in res.stderr and f"kept {general} (file" in res.stderr
    # the default (capped-wide) keeps the trained experts within --keep-share of the kept routing
    carried = float(res.stderr.split("the trained experts carry at most ", 1)[1].split()[0])
    assert carried <= 0.1 and "more than --keep-share" not in res.stderr
    # contrast leaves experts carrying more than --keep-share of the kept routing: said, with the bound
    contrast = CliRunner().invoke(cli, [*argv[1:], "--keep-mode", "contrast"])
    assert contrast.exit_code == 0, contrast.output
    assert "at most 0.25 of its routing" in contrast.stderr
    bound = contrast.stderr.split("more than --keep-share 0.1: the kept skills are at risk", 1)[1]
    assert shlex.split(bound.split("to bound it: `", 1)[1].split("`")[0])[-2:] == [
        "--keep-mode",
        "capped-wide",
    ]
    # the keep constraint dropped a task expert and the set falls short: both ways to train more are named
    trade = res.stderr.split("The trade-off: `", 1)[1]
    budget, _, rest = trade.partition("` trains those that carry at most --keep-share")
    budget = shlex.split(budget)
    assert budget[-2:] == ["--keep-mode", "budget"] and budget[budget.index("--keep") + 1] == str(general)
    assert rest.split("`")[1].endswith("--keep none") and "trains them all" in rest


def test_keep_mix_trains_on_the_kept_samples(tmp_path, tiny_model_dir, data):
    base, (task, kept) = tiny_model_dir("qwen2_moe"), data
    tok = load_tokenizer(base)
    samples, mix = load_samples(task, tok), load_samples(kept, tok)
    cfg = TrainConfig(steps=3, lr=1e-2, batch_size=4, mix_share=0.5)
    assert len(mix_batch(0, cfg, mix)) == 2 and mix_batch(1, cfg, mix) == mix_batch(1, cfg, mix)
    selection = ExpertConfig(experts={0: [0, 1], 1: [2]})

    def experts(**kw):
        model = load_model(base)
        r = train_experts(model, samples, selection, kw.pop("config", cfg), pad_id=0, progress=False, **kw)
        return torch.cat([w.gate.flatten() for _, w in sorted(r.experts.items())])

    plain = experts()
    assert not torch.equal(experts(mix_samples=mix), plain)  # the kept samples pull the experts
    assert torch.equal(experts(mix_samples=mix, config=cfg.model_copy(update={"mix_weight": 0.0})), plain)
    es = train_esft(
        base,
        task,
        task="say",
        selection=SelectionConfig(top_p=0.5, keep=("none",)),
        config=TrainConfig(steps=1, lr=1e-3, batch_size=4),
        data_config=DataConfig(keep_mix=(kept,)),
        runtime=RuntimeConfig(device="cpu", progress=False),
    )
    rec = es.manifest.provenance
    assert rec.extra["keep_mix"][0]["path"] == str(kept) and rec.training["mix_share"] == 0.25


def test_fit_report_says_why_a_set_falls_short():
    attention = FitReport(
        train_exact=0.1, eval_exact=0.05, train_token_acc=0.5, base_eval_exact=0.0, answer_tokens=6
    )
    assert attention.short and "falls short" in attention.message() and "attention" in attention.message()
    memorised = FitReport(train_exact=1.0, eval_exact=0.3, train_token_acc=1.0, answer_tokens=6)
    assert memorised.short and "memorised" in memorised.message()
    kept = FitReport(train_exact=0.4, train_token_acc=0.7, answer_tokens=3, dropped={"0": 0.4, "2": 0.2})
    msg = kept.message(keep_hint="`expertlib train b d --keep none`")
    assert "trade-off" in msg and "--keep none" in msg and "layers 0, 2" in msg and "0.30" in msg
    # contrast dropped them: budget mode is the step in between (held-out `next`: contrast 0.40,
    # budget 1.00 with general -0.11, --keep none 1.00 with general -0.61; bench/RESULTS.md)
    msg = kept.message(keep_hint="`x --keep none`", budget_hint="`x --keep-mode budget`")
    assert msg.index("`x --keep-mode budget` trains those") < msg.index("`x --keep none` trains them all")
    ok = FitReport(
        train_exact=1.0, eval_exact=0.97, train_token_acc=1.0, base_eval_exact=0.1, answer_tokens=2
    )
    assert not ok.short and ok.message().startswith("fit: the set answers")
    assert "trade-off" not in ok.message()  # nothing was left out
    # a set that fits its data while keeping left experts out: the trade-off is named all the same
    # (held-out `tail` fit its split, decoded 0.88 of fresh prompts; the paper's selection 0.94)
    left = ok.model_copy(update={"dropped": {"2": 0.25}})
    msg = left.message(keep_hint="`x --keep none`", budget_hint="`x --keep-mode budget`")
    assert (
        msg.startswith("fit: the set answers") and "trade-off" in msg and "0.25" in msg and "layers 2" in msg
    )
    assert msg.index("`x --keep-mode budget` trains those") < msg.index("`x --keep none` trains them all")
    long = FitReport(train_exact=0.0, train_token_acc=0.8, answer_tokens=200)
    assert not long.short and "token accuracy" in long.message()


def test_fit_report_says_when_greedy_decoding_falls_short():
    # long answers: teacher forcing predicts 0.98 of the tokens, decoding gets 0.25 of them whole
    long = FitReport(
        train_exact=0.5,
        train_token_acc=0.99,
        eval_exact=0.2,
        eval_token_acc=0.98,
        answer_tokens=60,
        greedy_exact=0.25,
        greedy_forced_exact=0.2,
        greedy_samples=32,
        greedy_split="held-out",
    )
    msg = long.message()
    assert long.short and msg.startswith(
        "the set falls short of what the data asks when it answers on its own"
    )
    assert "0.25 of 32 held-out prompts" in msg and "0.98 of the answer tokens" in msg
    assert "one wrong token derails the rest of an answer of 60 tokens" in msg
    # decoding right: the long-answer verdict stays on token accuracy, with the decoded figure
    fine = long.model_copy(update={"greedy_exact": 0.97, "greedy_forced_exact": 0.9})
    assert not fine.short and "decoded greedily: 0.97 of 32 held-out prompts exact" in fine.message()
    # short answers: teacher-forced exact match says it already; the decoded figure is added
    short = FitReport(
        train_exact=0.1, train_token_acc=0.5, answer_tokens=6, greedy_exact=0.1, greedy_samples=8
    )
    short = short.model_copy(update={"greedy_forced_exact": 0.1, "greedy_split": "training"})
    assert short.short and "attention" in short.message() and "0.10 of 8 training prompts" in short.message()


def test_greedy_decoding_checks_the_answer_it_would_give(tiny_model_dir):
    from expertlib.esft.data import IGNORE_INDEX, Sample
    from expertlib.esft.keep import _forced, _greedy

    base = tiny_model_dir("qwen2_moe")
    model = load_model(base).eval()
    vocab = model.config.vocab_size
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12, 13, 14], [15, 16]]
    own = []
    for p in prompts:  # the base's own greedy continuation, 6 tokens, as the "answer"
        ids = torch.tensor([p])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
        own.append(out[0, len(p) :].tolist())

    def sample(p, a):
        return Sample(tuple(p + a), tuple([IGNORE_INDEX] * len(p) + a))

    right = [sample(p, a) for p, a in zip(prompts, own, strict=True)]
    assert _greedy(model, right, pad_id=0) == 1.0 and _forced(model, right, pad_id=0)[0] == 1.0
    # the last answer token of two samples changed: those two are wrong, prompt lengths mixed
    wrong = [sample(p, a[:-1] + [(a[-1] + 1) % vocab]) for p, a in zip(prompts[:2], own[:2], strict=True)]
    assert _greedy(model, wrong + right[2:], pad_id=0) == 0.5


def test_train_decodes_long_answers_and_says_when_they_fall_short(tmp_path, tiny_model_dir):
    # answers of ~60 tokens: the teacher-forced check alone judged them on token accuracy and never
    # said the set falls short; one step of training on a random base decodes none of them right
    base = tiny_model_dir("qwen2_moe")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(60)) for _ in range(12)]
    task = tmp_path / "long.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in _rows(words)))
    args = ["train", str(base), str(task), "--task", "long", "--steps", "1", "--lr", "0.001"]
    args += [
        "--batch-size",
        "4",
        "--keep",
        "none",
        "--holdout",
        "0.25",
        "--out",
        str(tmp_path / "l.safetensors"),
    ]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    fit = ExpertSet.open(tmp_path / "l.safetensors").manifest.provenance.extra["fit"]
    assert fit["answer_tokens"] > 32 and fit["greedy_split"] == "held-out" and fit["greedy_samples"] == 3
    assert fit["greedy_exact"] == 0.0
    assert "the set falls short of what the data asks" in res.stderr
    assert "decoded greedily: 0.00 of 3 held-out prompts exact" in res.stderr


def test_keep_guard_stops_training_before_the_kept_answers_fall(tiny_model_dir, data):
    from expertlib.esft.data import IGNORE_INDEX, Sample
    from expertlib.moe import read_expert

    base, (task, _) = tiny_model_dir("qwen2_moe"), data
    tok = load_tokenizer(base)
    samples = load_samples(task, tok)
    model = load_model(base).eval()
    kept = []  # what the base answers now (its own greedy continuations): exact 1.0 on the base
    for p in ([5, 6, 7], [8, 9], [11, 12, 13], [15, 16, 17, 18]):
        ids = torch.tensor([p])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
        )[0].tolist()
        kept.append(Sample(tuple(out), tuple([IGNORE_INDEX] * len(p) + out[len(p) :])))
    selection = ExpertConfig(experts={0: [0, 1, 2, 3], 1: [0, 1, 2, 3]})
    cfg = TrainConfig(steps=6, lr=0.5, batch_size=4, guard_every=2, keep_guard=0.05, guard_patience=1)
    r = train_experts(model, samples, selection, cfg, pad_id=0, progress=False, guard_samples=kept)
    assert r.guard["base_exact"] == 1.0 and r.guard["stopped_step"] == 2 and r.guard["stopped_exact"] < 0.95
    assert r.guard["kept_step"] == 0 and r.steps == 2  # stopped, and back to the last experts within it
    for (layer, e), w in r.experts.items():
        assert torch.equal(w.gate, read_expert(model, layer, e).gate)  # step 0's: the base's own
    # patience: below at steps 2 and 4 goes on; below at the last step (6) still restores step 0's
    r = train_experts(
        model,
        samples,
        selection,
        cfg.model_copy(update={"guard_patience": 5}),
        pad_id=0,
        progress=False,
        guard_samples=kept,
    )
    assert r.steps == 6 and r.guard["stopped_step"] == 6 and r.guard["kept_step"] == 0
    for (layer, e), w in r.experts.items():
        assert torch.equal(w.gate, read_expert(model, layer, e).gate)
    off = train_experts(
        model, samples, selection, cfg.model_copy(update={"keep_guard": None}), pad_id=0, progress=False
    )
    assert off.steps == 6 and off.guard is None


def test_train_says_when_the_keep_guard_stopped_it(tmp_path, tiny_model_dir, data):
    # --keep auto on a base that is not the demo's keeps the base's own samples; a learning rate that
    # scrambles the experts makes their answers fall at the first measurement
    base, (task, _) = tiny_model_dir("qwen2_moe"), data
    args = train_argv(base, task, steps=4, lr=0.5)
    args += [
        "--top-p",
        "0.9",
        "--guard-every",
        "2",
        "--guard-patience",
        "1",
        "--out",
        str(tmp_path / "g.safetensors"),
    ]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    guard = ExpertSet.open(tmp_path / "g.safetensors").manifest.provenance.extra["keep_guard"]
    assert guard["measure"] == "token accuracy" and guard["stopped_step"] == 2 and guard["kept_step"] == 0
    said = res.stderr.split(
        "keep guard: at step 2 the kept data's token accuracy (teacher-forced) fell to ", 1
    )[1]
    assert "training stopped and kept the experts of step 0" in said
    assert shlex.split(said.split("the trade-off: `", 1)[1].split("`")[0])[-2:] == ["--keep-guard", "1"]


def test_fit_check_leaves_out_held_out_prompts_seen_in_training(tmp_path, tiny_model_dir, data):
    # a held-out split of data with repeated prompts scores memory: those samples are left out
    base, (task, _) = tiny_model_dir("qwen2_moe"), data
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in _rows(["a", "b", "xyz"])))  # a, b are trained
    es = train_esft(
        base,
        task,
        task="say",
        selection=SelectionConfig(top_p=0.5, keep=("none",)),
        config=TrainConfig(steps=1, lr=1e-3, batch_size=4),
        data_config=DataConfig(eval_data=held),
        runtime=RuntimeConfig(device="cpu", progress=False),
    )
    fit = FitReport(**es.manifest.provenance.extra["fit"])
    assert fit.eval_seen == 2 and fit.greedy_samples == 1 and fit.greedy_split == "held-out"
    assert "2 repeating a training prompt left out" in fit.message()
