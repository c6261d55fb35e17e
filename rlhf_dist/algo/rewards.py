"""Reward outcomes: which samples have a score, how weighted sources combine, and which samples stay in the
update when some scores failed. Pure torch, no sources or configs here (those are `rlhf_dist.rewards`)."""

from __future__ import annotations

from enum import IntEnum

import torch


class Outcome(IntEnum):
    """Each sample's score from a reward source. A failed one (timeout, error) has no score: it is masked
    out of the update, never scored 0. Ordered by precedence when sources combine (`combine_scores`)."""

    OK = 0
    TIMEOUT = 1
    ERROR = 2


def combine_scores(
    scores: torch.Tensor,  # (S, B) each source's score of each sample (anything where it failed)
    outcomes: torch.Tensor,  # (S, B) int, `Outcome` of each
    weights: torch.Tensor,  # (S,) each source's weight
) -> tuple[torch.Tensor, torch.Tensor]:  # score (B,), 0 where failed; outcome (B,)
    """score_b = sum_s w_s * score_sb where every source scored sample b. A sample is only as good as its worst
    source: any error makes it an error, else any timeout a timeout (a weighted sum with a term missing
    would be a different reward, so it is dropped, not summed without that term)."""
    outcome = outcomes.amax(dim=0)  # (B,)
    ok = outcome == Outcome.OK  # (B,)
    total = (weights.to(torch.float32)[:, None] * scores.float()).sum(dim=0)  # (B,)
    return torch.where(ok, total, torch.zeros((), dtype=total.dtype)), outcome


def kept_samples(
    ok: torch.Tensor,  # (B,) bool: the sample has a score; groups of n consecutive rows
    n: int,  # samples per prompt
    whole_groups: bool,  # the advantages compare a prompt's samples (GRPO, RLOO, REINFORCE++ with n > 1)
) -> torch.Tensor:  # (B,) bool: the samples that stay in the advantages and the losses
    """A failed sample is dropped; with group advantages its whole group is: a group baseline over the
    samples that happened to come back would be a different estimator for that prompt (and a group of one
    has no baseline at all), as verl and TRL drop such groups rather than re-weight them."""
    if not whole_groups or n == 1:
        return ok.bool()
    if ok.shape[0] % n:
        raise ValueError(f"{ok.shape[0]} samples do not split into groups of {n}")
    return ok.bool().reshape(-1, n).all(dim=1).repeat_interleave(n)


def outcome_counts(outcome: torch.Tensor) -> dict[str, int]:  # (B,) -> {"timeout": k, "error": k}
    """Failed samples by kind (one host read)."""
    counts = torch.bincount(outcome.long().flatten(), minlength=len(Outcome)).tolist()
    return {o.name.lower(): counts[o] for o in Outcome if o != Outcome.OK}
