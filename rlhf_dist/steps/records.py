"""`Experience`: the record the advantages phase builds and the learners' update reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Experience:
    """One PPO batch, ready for the learners. Response-aligned tensors are (B, R)."""

    sequences: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R)
    action_mask: torch.Tensor  # (B, R)
    prompt_len: int
    old_logprobs: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R)
    scores: torch.Tensor  # (B,) sequence-level reward
    kl: torch.Tensor  # (B, R) per-token KL estimate
    rewards: torch.Tensor  # (B, R) shaped token rewards
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R)
    sample_ids: list[int]
    version: int

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, idx: list[int] | torch.Tensor) -> "Experience":
        idx = torch.as_tensor(idx, dtype=torch.long)
        fields = {}
        for k, v in self.__dict__.items():
            if isinstance(v, torch.Tensor):
                fields[k] = v[idx]
            elif k == "sample_ids":
                fields[k] = [v[i] for i in idx.tolist()]
            else:
                fields[k] = v
        return Experience(**fields)
