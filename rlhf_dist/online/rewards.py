"""An iteration's rewards: which samples stay in the update, the failure counts and each source's mean for
the metrics, and the stop when too many samples got no reward (reward_max_failed_fraction)."""

from __future__ import annotations

import torch

from ..algo import Outcome, kept_samples, outcome_counts
from ..config.algorithms import ALGORITHMS
from ..config.rewards import REWARD_SOURCES
from ..rewards.base import RewardOutput
from .health import HealthError


def kept_for(out: RewardOutput, cfg) -> torch.Tensor:  # (B,) bool
    """The samples that stay in the update: scored, and with group advantages, their whole group scored."""
    n = cfg.n_samples_per_prompt
    return kept_samples(out.outcome == Outcome.OK, n, ALGORITHMS[cfg.algorithm].groups)


def reward_metrics(out: RewardOutput, kept: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Failed samples (all sources, by kind, by source), those masked out (with their group), each source's
    mean over the samples it scored (its `metric` in the table: rm_score, fn_score, url_score)."""
    counts = outcome_counts(out.outcome)
    rec = {f"{prefix}reward_failed": float(sum(counts.values())), f"{prefix}reward_masked": float((~kept).sum()),
           **{f"{prefix}reward_failed_{k}": float(v) for k, v in counts.items()}}
    for name, sc in out.sources.items():
        ok = sc.outcomes == Outcome.OK  # (B,)
        rec[f"{prefix}{REWARD_SOURCES[name].metric}"] = float(sc.scores[ok].mean()) if ok.any() else None
        rec[f"{prefix}reward_failed/{name}"] = float(sc.failed)
    return rec


def check_failures(out: RewardOutput, limit: float, where: str) -> None:
    """HealthError naming the failing sources when more than `limit` of the samples got no reward."""
    failed = int((out.outcome != Outcome.OK).sum())
    if failed <= limit * len(out):
        return
    why = "; ".join(f"{name}: {sc.failed} failed ({', '.join(f'{v} {k}' for k, v in outcome_counts(sc.outcomes).items() if v)}"
                    f"{', ' + sc.detail if sc.detail else ''})" for name, sc in out.sources.items() if sc.failed)
    raise HealthError(f"ppo: {failed} of {len(out)} samples got no reward at {where}, over "
                      f"reward_max_failed_fraction {limit:g}: reward source {why}")
