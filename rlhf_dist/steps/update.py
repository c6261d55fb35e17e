"""The learner update: experience -> policy and value losses. Plain functions of a model and a mini-batch;
DeepSpeed wraps them.

A micro-batch's loss is divided by its whole mini-batch's count (tokens, or sequences: `loss_units`) and
scaled by the number of ranks DeepSpeed averages the gradients over (its accumulation adds micro-batches
up unscaled), so gradient accumulation, packing and data parallelism give the same step as one big batch.
"""

from __future__ import annotations

import torch

from ..algo import aggregate_loss, kl_penalty, masked_mean, ppo_policy_loss, ppo_value_loss
from ..models.packing import Packed
from .forwards import response_logprobs_entropy, response_values
from .records import Experience


def policy_loss(model, mb: Experience, *, clip_range: float, entropy_coef: float, temperature: float,
                agg: str = "token_mean", units: float | None = None, scale: float = 1.0, kl_coef: float = 0.0,
                kl_estimator: str = "k3", packed: Packed | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate, plus `kl_coef` x the KL to the reference (with kl_in: loss; 0 otherwise), minus
    the entropy bonus, each reduced by `agg` over `units` (the mini-batch's count; None = this batch's).
    Stats are 0-dim tensors (no host sync). With entropy_coef 0 the logged `entropy` is that of the first
    sequence only, without gradient: a sample, which spares a vocabulary pass over the whole micro-batch.
    `packed`: the forward runs over the micro-batch's packed layout (`packing.pack`)."""
    logp, entropy = response_logprobs_entropy(model, mb.sequences, mb.attention_mask, mb.prompt_len, temperature,
                                              entropy_rows=None if entropy_coef > 0 else 1,
                                              packed=packed)  # (B, R), (b, R)
    mask = mb.action_mask  # (B, R)
    loss, stats = ppo_policy_loss(logp, mb.old_logprobs, mb.advantages, mask, clip_range, agg, units)
    if kl_coef > 0:
        kl = kl_penalty(logp, mb.ref_logprobs.to(logp.dtype), kl_estimator)  # (B, R), differentiated
        kl_term = aggregate_loss(kl, mask, agg, units)
        loss = loss + kl_coef * kl_term
        stats["kl_loss"] = masked_mean(kl.detach(), mask)
    if entropy_coef > 0:
        loss = loss - entropy_coef * aggregate_loss(entropy, mask, agg, units)
    stats["entropy"] = masked_mean(entropy.detach(), mask[:entropy.shape[0]])
    stats["policy_loss"] = loss.detach() * scale  # its share of the mini-batch's loss (x ranks, as the loss)
    stats["ratio_dev_max"] = (logp.detach() - mb.old_logprobs).abs().masked_fill(mask == 0, 0).max().exp() - 1
    return loss * scale, stats


def value_loss(model, mb: Experience, *, clip_range: float, units: float | None = None, scale: float = 1.0,
               packed: Packed | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped value loss, a token mean over `units` tokens (the mini-batch's; None = this batch's).
    Stats are 0-dim tensors (no host sync)."""
    values = response_values(model, mb.sequences, mb.attention_mask, mb.prompt_len, packed)  # (B, R)
    loss, stats = ppo_value_loss(values, mb.values, mb.returns, mb.action_mask, clip_range, units)
    stats["value_loss"] = loss.detach() * scale  # its share of the mini-batch's loss, as policy_loss logs it
    return loss * scale, stats


def minibatches(n: int, mini_batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Index lists for `epochs` shuffled passes over n samples, deterministic in seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).tolist()
        out.extend(perm[i:i + mini_batch_size] for i in range(0, n, mini_batch_size))
    return out
