"""A run's reward sources (the rows of `config.rewards.REWARD_SOURCES` it turns on), scored and combined."""

from __future__ import annotations

import logging

import torch

from ..algo import combine_scores
from ..config.rewards import active_sources
from .base import RewardBatch, RewardOutput, SourceContext

log = logging.getLogger(__name__)


class RewardSources:
    """Every active source, each with its weight: score = sum of weight x score, where all of them scored."""

    def __init__(self, cfg, ctx: SourceContext):
        self.specs = active_sources(cfg)
        self.weights = torch.tensor([s.weight_of(cfg) for s in self.specs])  # (S,)
        self.sources = {s.name: s.load("build")(cfg, ctx) for s in self.specs}

    def score(self, batch: RewardBatch) -> RewardOutput:
        parts = {name: src.score(batch) for name, src in self.sources.items()}
        for name, p in parts.items():
            if p.failed:
                log.warning("reward source %s: %d of %d samples failed: %s", name, p.failed, len(batch), p.detail)
        total, outcome = combine_scores(torch.stack([p.scores for p in parts.values()]),
                                        torch.stack([p.outcomes for p in parts.values()]), self.weights)
        return RewardOutput(batch.responses, total, outcome.to(torch.int8), parts)
