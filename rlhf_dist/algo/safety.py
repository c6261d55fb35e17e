"""What the safety filter's verdicts do to a batch of rollouts: a penalty on the score, or the rollout dropped."""

from __future__ import annotations

import torch


def safety_adjust(
    scores: torch.Tensor,  # (B,) sequence scores, groups of n consecutive rows
    action_mask: torch.Tensor,  # (B, R) response mask
    flagged: torch.Tensor,  # (B,) bool: the filter's verdicts
    n: int,  # samples per prompt (a group)
    action: str,  # "penalize" | "drop"
    penalty: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # scores (B,), action mask (B, R), dropped (B,) bool
    """penalize: `penalty` is subtracted from each flagged rollout's score.
    drop: each flagged rollout's whole group leaves the update, by its response mask: its rows keep their
    place, so the batch still splits into the same mini-batches and groups, but they carry no tokens, so no
    policy, value or KL term and no loss unit (`algo.losses.loss_units`), and no group baseline (GRPO, RLOO,
    REINFORCE++) mixes a dropped score with kept ones (groups leave whole)."""
    flagged = flagged.to(torch.bool)
    if action == "penalize":
        return scores - penalty * flagged.to(scores.dtype), action_mask, torch.zeros_like(flagged)
    if action != "drop":
        raise ValueError(f"unknown safety action {action!r}; expected penalize or drop")
    dropped = flagged.view(-1, n).any(dim=1, keepdim=True).expand(-1, n).reshape(-1)  # (B,)
    return scores, action_mask * (~dropped)[:, None].to(action_mask.dtype), dropped
