"""Measuring a task's routing profile (`expertlib.profile`): training records it; `expertlib profile`
adds it to a set made elsewhere (import-esft, older versions)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from expertlib.errors import DataError
from expertlib.profile import RoutingProfile

#: Prompt tokens a profile is measured on by default (a few hundred prompts).
PROFILE_TOKEN_BUDGET = 32_768


def prompt_part(sample):
    """The prompt of a training sample: its tokens before the first answer token."""
    from expertlib.esft.data import IGNORE_INDEX, Sample

    n = next((i for i, y in enumerate(sample.labels) if y != IGNORE_INDEX), len(sample.labels))
    return Sample(sample.input_ids[:n], sample.labels[:n], sample.line)


def prompt_profile(
    model,
    samples: Sequence,
    *,
    pad_id: int,
    token_budget: int | None = PROFILE_TOKEN_BUDGET,
    batch_size: int = 8,
    seed: int = 0,
) -> RoutingProfile:
    """The routing profile of `samples`' prompts under `model` (forward passes only)."""
    from expertlib.esft.scoring import score_experts

    prompts = [p for p in (prompt_part(s) for s in samples if s is not None) if len(p)]
    if not prompts:
        raise DataError("no prompt tokens to profile", hint="pass chat or prompt/completion records")
    scores = score_experts(
        model,
        prompts,
        pad_id=pad_id,
        token_budget=token_budget,
        batch_size=batch_size,
        count_prompt_tokens=True,
        seed=seed,
        progress=False,
    )
    return RoutingProfile.from_shares(scores.token, tokens=scores.tokens_scored)


def profile_file(
    patch: str | Path,
    base: str | Path,
    data: str | Path,
    *,
    output: str | Path | None = None,
    token_budget: int | None = PROFILE_TOKEN_BUDGET,
    max_length: int = 4096,
) -> tuple[Path, RoutingProfile]:
    """`expertlib profile`: measure `data`'s prompt routing under `base` and write the patch again
    (to `output`, default in place) with the profile in its manifest. The tensors, and so the
    content digest, are unchanged."""
    from expertlib.apply import check_compatible
    from expertlib.esft.data import load_samples, load_tokenizer, pad_token_id
    from expertlib.moe import load_model
    from expertlib.patch import ExpertSet

    es = ExpertSet.open(patch)
    es.verify()
    model = load_model(base)
    check_compatible(model, es)
    tok = load_tokenizer(base)
    samples = load_samples(data, tok, max_length=max_length, too_long="truncate")
    prof = prompt_profile(model, samples, pad_id=pad_token_id(tok), token_budget=token_budget)
    m = es.manifest
    manifest = m.model_copy(update={"provenance": m.provenance.model_copy(update={"routing_profile": prof})})
    out = ExpertSet(manifest, dict(es.tensors)).save(output or patch)
    return out, prof
