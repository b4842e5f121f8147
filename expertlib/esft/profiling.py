"""Measuring a task's routing profile (`expertlib.profile`): training records it; `expertlib profile`
adds it to a set made elsewhere (import-esft, older versions).

Beside it, the base anchors (`base_anchors`): profiles of what the base already does, which
`model="auto"` weighs against the sets so that the base keeps its own prompts. Their data
(`anchor_samples`): the anchor data the base ships (`expertlib.esft.base_data`; on the demo base,
each of its pretraining tasks); on any other, each data source `train --keep` kept (the base's own
samples by default), and any data given to `expertlib profile --anchor`."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

from expertlib.errors import DataError
from expertlib.profile import RoutingProfile

#: Prompt tokens a profile is measured on by default (a few hundred prompts).
PROFILE_TOKEN_BUDGET = 32_768
#: Prompts per base anchor (`anchor_samples`) and the prompt tokens each is measured on at most.
ANCHOR_PROMPTS, ANCHOR_TOKEN_BUDGET = 64, 8_192


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


def anchor_samples(
    base: str | Path, model, tokenizer, *, keep: Sequence[str | Path] = ("auto",), max_length: int = 2048
) -> dict[str, list]:
    """Anchor name -> samples of what the base already does (module docstring)."""
    from expertlib.esft.base_data import ANCHORS, reference_samples
    from expertlib.esft.keep import resolve_keep

    shipped = reference_samples(base, ANCHORS, tokenizer, n=ANCHOR_PROMPTS, max_length=max_length)
    if shipped:
        return shipped
    kept = resolve_keep(keep, base, model, tokenizer, max_length=max_length)
    return {(Path(k.name).stem if k.kind == "file" else k.kind): k.samples for k in kept}


def base_anchors(model, named: dict[str, Sequence], *, pad_id: int) -> dict[str, RoutingProfile]:
    """Anchor name -> the routing profile of its samples' prompts (`prompt_profile`)."""
    return {
        name: prompt_profile(model, samples, pad_id=pad_id, token_budget=ANCHOR_TOKEN_BUDGET, batch_size=64)
        for name, samples in named.items()
        if samples
    }


def profile_file(
    patch: str | Path,
    base: str | Path,
    data: str | Path | None,
    *,
    anchors: Sequence[str | Path] = (),
    output: str | Path | None = None,
    token_budget: int | None = PROFILE_TOKEN_BUDGET,
    max_length: int = 4096,
) -> tuple[Path, RoutingProfile]:
    """`expertlib profile`: measure `data`'s prompt routing under `base` and write the patch again
    (to `output`, default in place) with the profile in its manifest; each of `anchors` (data of
    what the base already does) is added as a base anchor named by its file's stem. `data` may be
    None when the set has a profile already. The tensors, and so the content digest, are unchanged."""
    from expertlib.apply import check_compatible
    from expertlib.esft.data import load_samples, load_tokenizer, pad_token_id
    from expertlib.moe import load_model
    from expertlib.patch import ExpertSet

    es = ExpertSet.open(patch)
    es.verify()
    m = es.manifest
    if data is None and m.provenance.routing_profile is None:
        raise DataError(
            f"{patch} has no routing profile yet", hint="pass --data with the set's task data to measure it"
        )
    model = load_model(base)
    check_compatible(model, es)
    tok = load_tokenizer(base)
    pad = pad_token_id(tok)
    read = partial(load_samples, tokenizer=tok, max_length=max_length, too_long="truncate")
    prof = m.provenance.routing_profile
    if data is not None:
        prof = prompt_profile(model, read(data), pad_id=pad, token_budget=token_budget)
    named = {Path(a).stem: read(a) for a in anchors}
    update = {
        "routing_profile": prof,
        "base_anchors": {**m.provenance.base_anchors, **base_anchors(model, named, pad_id=pad)},
    }
    manifest = m.model_copy(update={"provenance": m.provenance.model_copy(update=update)})
    out = ExpertSet(manifest, dict(es.tensors)).save(output or patch)
    return out, prof
