"""rollout: prompts -> responses, with a KV cache, left-padded batches and no work on finished rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import position_ids_from_mask


@dataclass
class Samples:
    """What the rollout role returns for a batch of prompts."""

    sequences: torch.Tensor  # (B, P+R) long: left-padded prompt, then right-padded response
    attention_mask: torch.Tensor  # (B, P+R) long: 1 on real prompt and response tokens
    action_mask: torch.Tensor  # (B, R) long: 1 on generated tokens, eos included
    rollout_logprobs: torch.Tensor  # (B, R) float: logprob of each sampled token under the rollout weights
    prompt_len: int  # P
    sample_ids: list[int]  # index of each row's prompt in the prompt file
    version: int  # weight version that generated the batch

    @property
    def responses(self) -> torch.Tensor:  # (B, R)
        return self.sequences[:, self.prompt_len:]

    def __len__(self) -> int:
        return self.sequences.shape[0]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, P), attention mask (B, P)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids, mask


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, V) -> token (N,), logprob (N,) of that token under softmax(logits / temperature).

    The logprob ignores top-k/top-p truncation, as the learner scores with the same plain softmax.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, V)
    filtered = logp
    if top_k and top_k < logp.shape[-1]:
        kth = torch.topk(filtered, top_k, dim=-1).values[:, -1:]  # (N, 1)
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(filtered, descending=True)  # (N, V)
        cum = sorted_lp.exp().cumsum(-1)
        drop = cum - sorted_lp.exp() > top_p  # keep the smallest prefix whose mass reaches top_p
        filtered = filtered.scatter(-1, order, sorted_lp.masked_fill(drop, float("-inf")))
    token = torch.multinomial(filtered.exp(), 1, generator=generator).squeeze(1)  # (N,)
    return token, logp.gather(1, token[:, None]).squeeze(1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, pad_id: int, eos_id: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None, sample_ids: list[int] | None = None,
             version: int = 0) -> Samples:
    """Sample one response per prompt. Finished rows leave the batch (their KV cache rows are dropped)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, attn = left_pad(prompts, pad_id)  # (B, P)
    ids, attn = ids.to(device), attn.to(device)
    B, P = ids.shape
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, R)
    logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)  # (B, R)
    lengths = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
    cache = DynamicCache()
    pos = position_ids_from_mask(attn)  # (B, P)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]  # (B, V)
    alive = torch.arange(B, device=device)  # (n,) rows still generating
    alive_attn = attn  # (n, P + t)
    next_pos = pos[:, -1] + 1  # (n,)
    for t in range(max_new_tokens):
        tok, lp = sample_token(logits, temperature, top_p, top_k, generator)  # (n,), (n,)
        tokens[alive, t] = tok
        logps[alive, t] = lp
        lengths[alive] = t + 1
        if t == max_new_tokens - 1:
            break
        keep = tok != eos_id  # (n,)
        if not bool(keep.all()):
            if not bool(keep.any()):
                break
            idx = keep.nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            alive, tok, alive_attn, next_pos = alive[idx], tok[idx], alive_attn[idx], next_pos[idx]
        alive_attn = torch.cat([alive_attn, alive_attn.new_ones((alive.numel(), 1))], dim=1)
        logits = model(input_ids=tok[:, None], attention_mask=alive_attn, position_ids=next_pos[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]  # (n, V)
        next_pos = next_pos + 1
    R = int(lengths.max())
    action_mask = (torch.arange(R, device=device)[None, :] < lengths[:, None]).long()  # (B, R)
    sequences = torch.cat([ids, tokens[:, :R]], dim=1)  # (B, P+R)
    return Samples(
        sequences=sequences.cpu(),
        attention_mask=torch.cat([attn, action_mask], dim=1).cpu(),
        action_mask=action_mask.cpu(),
        rollout_logprobs=(logps[:, :R] * action_mask).cpu(),
        prompt_len=P,
        sample_ids=list(sample_ids) if sample_ids is not None else list(range(B)),
        version=version,
    )


def merge_samples(parts: list[Samples], pad_id: int) -> Samples:
    """Concatenate rollouts of several workers, re-padding prompts (left) and responses (right)."""
    if len(parts) == 1:
        return parts[0]
    P = max(s.prompt_len for s in parts)
    R = max(s.action_mask.shape[1] for s in parts)

    def pad(s: Samples):
        lp, rp = P - s.prompt_len, R - s.action_mask.shape[1]
        seq = torch.nn.functional.pad(s.sequences, (lp, rp), value=pad_id)
        attn = torch.nn.functional.pad(s.attention_mask, (lp, rp), value=0)
        return seq, attn, torch.nn.functional.pad(s.action_mask, (0, rp)), torch.nn.functional.pad(s.rollout_logprobs, (0, rp))

    cols = list(zip(*(pad(s) for s in parts)))
    return Samples(torch.cat(cols[0]), torch.cat(cols[1]), torch.cat(cols[2]), torch.cat(cols[3]), P,
                   [i for s in parts for i in s.sample_ids], min(s.version for s in parts))


def slice_samples(s: Samples, start: int, end: int) -> Samples:
    return Samples(s.sequences[start:end], s.attention_mask[start:end], s.action_mask[start:end],
                   s.rollout_logprobs[start:end], s.prompt_len, s.sample_ids[start:end], s.version)
