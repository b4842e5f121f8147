"""The slot trainer equals a plain-PyTorch ESFT: same loss curve, same trained experts, nothing else moves.

The plain version trains the fused expert tensors of the model itself: every other parameter is
frozen, the gradient rows of unselected experts are zeroed before the step, and after each AdamW
step every unselected row is put back (AdamW's weight decay would otherwise shrink them). Same
batches (`batch_indices`), loss (`loss_sum`), schedule and clipping as `train_experts`.
"""

from __future__ import annotations

import copy

import torch

from expertlib.esft.data import Sample
from expertlib.esft.selection import ExpertConfig
from expertlib.esft.training import TrainConfig, batch_indices, loss_sum, n_labels, train_experts
from expertlib.moe import experts_module, moe_layer_indices, read_expert
from expertlib.testing import make_tiny_model


def _samples(n: int = 24, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(4, 90, (length,), generator=g).tolist()
        plen = length // 2
        out.append(Sample(ids, [-100] * plen + ids[plen:], i + 1))
    return out


def _plain_esft(model, samples, selection: ExpertConfig, cfg: TrainConfig, pad_id: int) -> list[float]:
    from expertlib.esft.data import collate

    torch.manual_seed(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    fused = []  # (layer, tensor, mask of unselected rows)
    for layer in moe_layer_indices(model):
        ex = experts_module(model, layer)
        for p in ex.parameters(recurse=False):
            p.requires_grad_(True)
            keep = torch.ones(p.shape[0], dtype=torch.bool)
            keep[selection.experts.get(layer, [])] = False
            fused.append((p, keep))
    params = [p for p, _ in fused]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps)
    losses = []
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        batch = [samples[i] for i in batch_indices(step, 0, cfg, len(samples))]
        loss = loss_sum(model, collate(batch, pad_id), cfg) / max(1, n_labels(batch))
        loss.backward()
        frozen = [p.detach()[keep].clone() for p, keep in fused]
        for p, keep in fused:
            p.grad[keep] = 0
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for (p, keep), old in zip(fused, frozen, strict=True):
                p[keep] = old
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def test_slot_trainer_matches_plain_pytorch_esft():
    base = make_tiny_model("qwen2_moe", seed=0)
    base.float()
    plain = copy.deepcopy(base)
    layers = moe_layer_indices(base)
    selection = ExpertConfig(experts={layer: [1, 3] if i % 2 == 0 else [0] for i, layer in enumerate(layers)})
    cfg = TrainConfig(lr=1e-2, steps=12, batch_size=4, warmup_steps=2, weight_decay=0.1, seed=3)
    samples = _samples()

    result = train_experts(base, samples, selection, cfg, pad_id=0, progress=False)
    plain_losses = _plain_esft(plain, samples, selection, cfg, pad_id=0)

    torch.testing.assert_close(
        torch.tensor(result.train_losses), torch.tensor(plain_losses), rtol=1e-4, atol=1e-5
    )
    assert plain_losses[-1] < plain_losses[0]  # it trained
    for layer in layers:
        for e in range(base.config.num_experts):
            plain_e = read_expert(plain, layer, e)
            if e in selection.experts[layer]:
                slot_e = result.experts[(layer, e)]
                for name in ("gate", "up", "down"):
                    # float noise only: Adam's normalisation magnifies last-bit differences of
                    # near-zero gradients to ~1e-5 on a few elements; the mean stays far below
                    a, b = getattr(slot_e, name), getattr(plain_e, name)
                    torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-5)
                    assert (a - b).abs().mean() < 1e-6
                assert not torch.equal(plain_e.gate, read_expert(base, layer, e).gate)  # it moved
            else:
                base_e = read_expert(base, layer, e)  # the slot trainer never touches the base
                assert torch.equal(plain_e.gate, base_e.gate) and torch.equal(plain_e.down, base_e.down)
    # everything that is not a routed expert is unchanged in both
    for (n, p), (_, q) in zip(base.named_parameters(), plain.named_parameters(), strict=True):
        if ".experts." not in n:
            assert torch.equal(p, q), n


def test_early_stopping_keeps_the_best_held_out_loss():
    model = make_tiny_model("qwen2_moe", seed=1)
    model.float()
    layers = moe_layer_indices(model)
    selection = ExpertConfig(experts={layer: [0, 1, 2] for layer in layers})
    # a learning rate far too high: the held-out loss soon rises, and training must stop there
    cfg = TrainConfig(lr=0.3, steps=40, batch_size=4, eval_every=2, early_stop=2, seed=0, weight_decay=0.0)
    res = train_experts(
        model, _samples(24, 0), selection, cfg, pad_id=0, eval_samples=_samples(8, 9), progress=False
    )
    evals = [loss for _, loss in res.eval_losses]
    assert res.steps < cfg.steps, res.eval_losses
    assert evals[-1] == min(evals)  # the kept weights are the best ones seen
    # without early stopping the same run goes on to the end
    off = cfg.model_copy(update={"early_stop": 0, "steps": 6})
    assert train_experts(model, _samples(24, 0), selection, off, pad_id=0, progress=False).steps == 6
