"""What the safety filter's verdicts do to a batch of rollouts: a penalty on the score, or the rollout dropped."""

from __future__ import annotations

import torch


def safety_adjust(
    scores: torch.Tensor,  # (B,) sequence scores, groups of n consecutive rows
    flagged: torch.Tensor,  # (B,) bool: the filter's verdicts
    n: int,  # samples per prompt (a group)
    action: str,  # "penalize" | "drop"
    penalty: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # scores (B,), dropped (B,) bool
    """penalize: `penalty` is subtracted from each flagged rollout's score.
    drop: each flagged rollout's whole group leaves the update: the driver takes `dropped` out of the kept
    samples, as it does a failed reward (`algo.rewards.kept_samples`), so its rows keep their place (the batch
    still splits into the same mini-batches and groups) but carry no policy, value or KL term and no loss unit,
    and no group baseline (GRPO, RLOO, REINFORCE++) mixes a dropped score with kept ones (groups leave whole)."""
    flagged = flagged.to(torch.bool)
    if action == "penalize":
        return scores - penalty * flagged.to(scores.dtype), torch.zeros_like(flagged)
    if action != "drop":
        raise ValueError(f"unknown safety action {action!r}; expected penalize or drop")
    dropped = flagged.view(-1, n).any(dim=1, keepdim=True).expand(-1, n).reshape(-1)  # (B,)
    return scores, dropped
