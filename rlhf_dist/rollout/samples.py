"""What a rollout returns: `Samples`, and merging / slicing them across workers and mini-batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def trim_samples(s: Samples) -> Samples:
    """`s` without the columns none of its rows uses: prompt padding on the left, response padding on the
    right (a slice of a larger batch keeps the whole batch's). At least one response column stays."""
    P = s.prompt_len
    used_prompt = s.attention_mask[:, :P].bool().any(0)  # (P,)
    lead = int(used_prompt.long().argmax()) if bool(used_prompt.any()) else P
    used_resp = (s.attention_mask[:, P:].bool() | s.action_mask.bool()).any(0)  # (R,)
    R = int(used_resp.nonzero().max()) + 1 if bool(used_resp.any()) else 1
    return Samples(s.sequences[:, lead:P + R], s.attention_mask[:, lead:P + R], s.action_mask[:, :R],
                   s.rollout_logprobs[:, :R], P - lead, s.sample_ids, s.version)


def select_samples(s: Samples, rows: list[int]) -> Samples:
    """The given rows of `s`, in that order (paddings unchanged)."""
    idx = torch.tensor(rows, dtype=torch.long)  # (n,)
    return Samples(s.sequences[idx], s.attention_mask[idx], s.action_mask[idx], s.rollout_logprobs[idx],
                   s.prompt_len, [s.sample_ids[i] for i in rows], s.version)
