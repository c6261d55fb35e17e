"""A Python function as a reward source (`reward_fn: module:function`).

Signature: `fn(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float | None]`, one
value per response. `prompts` are the last message before each response; `metadata` holds each sample's
prompt row less its prompt (e.g. {"answer": "42"}, as verl's ground_truth or TRL's dataset columns). The
metadata parameter is optional: a function with no parameter named `metadata` (and no **kwargs) is called
as fn(prompts, responses). None marks a response the function cannot score: an error outcome, masked out of
the update.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable

import torch

from ..algo import Outcome
from ..config import ConfigError
from .base import RewardBatch, Scored


def load_function(spec: str, field: str) -> Callable:
    """`module:function` -> the function; a ConfigError naming `field` when it cannot be imported."""
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name:
        raise ConfigError(f"{field}: {spec!r} is not of the form module:function")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{field}: {spec!r}: {e}") from None


def takes_metadata(fn: Callable) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.name == "metadata" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class FunctionSource:
    def __init__(self, spec: str, field: str = "reward_fn"):
        self.spec, self.field = spec, field
        self.fn = load_function(spec, field)
        self.with_metadata = takes_metadata(self.fn)

    def score(self, batch: RewardBatch) -> Scored:
        args = (batch.prompt_texts, batch.responses)
        vals = list(self.fn(*args, metadata=batch.metadata) if self.with_metadata else self.fn(*args))
        if len(vals) != len(batch):
            raise ValueError(f"{self.field} {self.spec} returned {len(vals)} values for {len(batch)} responses")
        scores = torch.tensor([math.nan if v is None else float(v) for v in vals], dtype=torch.float32)  # (B,)
        none = [v is None for v in vals]
        outcomes = torch.tensor([Outcome.ERROR if n else Outcome.OK for n in none], dtype=torch.int8)  # (B,)
        detail = f"{self.spec} returned None for {sum(none)} of {len(vals)} responses" if any(none) else None
        return Scored(scores, outcomes, detail)


def environment_errors(cfg) -> list[str]:
    try:
        load_function(cfg.reward_fn, "reward_fn")
    except ConfigError as e:
        return [str(e)]
    return []


def build(cfg, ctx) -> FunctionSource:
    return FunctionSource(cfg.reward_fn)
