"""The reward-source table: one row per kind of reward a run can combine (the reward model, a Python
function, an HTTP server). The reward role, `rlhf-dist check` and the metrics read it; nothing else names a
source. Each row's `build` (in `rlhf_dist/rewards/`) makes a `RewardSource`: score a batch of prompts and
responses, return a score and an outcome (ok, timeout, error) per sample.

A new source is a row here, its module under rewards/, and its fields in the schema. (Torch-free on
purpose: the config loads without torch.)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RewardSourceSpec:
    name: str  # in metrics (reward_failed/<name>), logs and errors
    weight: str  # the field of its weight in the combined score; 0 turns it off
    switch: str | None  # the field that must be set to use it; None: on whenever its weight is not 0
    metric: str  # the metrics key of its mean score (over the samples it scored)
    build: str  # "module:function(cfg, ctx) -> RewardSource", imported only where it scores
    check: str | None = None  # "module:function(cfg) -> list[str]": errors only the running machine can tell

    def weight_of(self, cfg) -> float:
        return float(getattr(cfg, self.weight))

    def load(self, attr: str) -> Any:
        mod, name = getattr(self, attr).split(":")
        return getattr(importlib.import_module(mod), name)


REWARD_SOURCES: dict[str, RewardSourceSpec] = {s.name: s for s in (
    RewardSourceSpec("model", "reward_model_weight", None, "rm_score", "rlhf_dist.rewards.model:build"),
    RewardSourceSpec("function", "reward_fn_weight", "reward_fn", "fn_score", "rlhf_dist.rewards.function:build",
                     check="rlhf_dist.rewards.function:environment_errors"),
    RewardSourceSpec("url", "reward_url_weight", "reward_url", "url_score", "rlhf_dist.rewards.http:build",
                     check="rlhf_dist.rewards.http:environment_errors"),
)}


def active_sources(cfg) -> list[RewardSourceSpec]:
    """The sources a run scores with: weight not 0, and their switch field set."""
    return [s for s in REWARD_SOURCES.values()
            if s.weight_of(cfg) != 0 and (s.switch is None or getattr(cfg, s.switch))]


def environment_errors(cfg) -> list[str]:
    """What the config alone cannot tell (reward_fn imports here, reward_url's environment variable is set):
    `rlhf-dist check` and the start of the online stage ask."""
    return [e for s in active_sources(cfg) if s.check for e in s.load("check")(cfg)]
