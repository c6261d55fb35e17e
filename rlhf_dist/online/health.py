"""Health guards for a PPO run: non-finite values, a KL hard stop and gradient-spike alarms.

Plain Python and torch, no Ray: the driver feeds them each iteration's numbers and acts on the answer.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch


class HealthError(RuntimeError):
    """The run stopped itself; the message gives the reason and the checkpoint that is kept."""


def nonfinite_rows(**tensors: torch.Tensor) -> dict[str, list[int]]:
    """{name: row indices with any NaN/inf} for batch-first tensors, e.g. scores (B,), advantages (B, R).
    Names without bad rows are left out, so an empty dict means all finite."""
    out = {}
    for name, t in tensors.items():
        bad = ~torch.isfinite(t.float().reshape(t.shape[0], -1)).all(dim=1)  # (B,)
        if bad.any():
            out[name] = bad.nonzero().flatten().tolist()
    return out


class BadStepCounter:
    """Counts skipped updates; raises after `limit` in a row (one good step resets the streak)."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def record(self, bad: bool, why: str = "") -> None:
        if not bad:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise HealthError(f"{self.in_a_row} bad steps in a row (max_bad_steps={self.limit}); last: {why}")


def logprob_tolerance(setting: float | None, bf16: bool) -> float:
    """How far the rollout's log-probs may sit from the policy learner's on the same tokens and weights
    (`sync_logprob_tolerance`; unset: by precision). Float32 engines agree to ~1e-5 (tests/test_vllm.py,
    tests/test_ppo.py); in bf16 a decode and a training forward differ by rounding (up to ~0.1-0.5 on
    rare tokens), so only a gross mismatch is caught there."""
    if setting is not None:
        return setting
    return 1.0 if bf16 else 1e-3


class DriftGuard:
    """The weight sync's end-to-end check: raises after `limit` iterations in a row whose rollout-against-
    learner log-prob difference exceeds `tolerance` (a sync that delivered other weights, or none)."""

    def __init__(self, tolerance: float, limit: int):
        self.tolerance, self.limit, self.in_a_row = tolerance, limit, 0

    def record(self, diff: float, iteration: int) -> bool:
        """True when `diff` is over the tolerance; raises HealthError on the `limit`-th such in a row."""
        over = not diff <= self.tolerance  # NaN counts as over
        self.in_a_row = self.in_a_row + 1 if over else 0
        if self.in_a_row >= self.limit:
            raise HealthError(f"ppo: the rollout's log-probs differ from the policy learner's by {diff:.3g} "
                              f"(> sync_logprob_tolerance {self.tolerance:g}) for {self.in_a_row} iterations in a "
                              f"row, up to iteration {iteration}: the rollout is not generating with the "
                              f"learner's weights")
        return over


class SpikeDetector:
    """Flags a value above `factor` x the median of the last `window` finite values (after `warmup` of them).
    The median, unlike the mean, is not dragged up by the spikes it is meant to catch."""

    def __init__(self, factor: float, window: int = 20, warmup: int = 5):
        self.factor, self.warmup = factor, warmup
        self.history: deque[float] = deque(maxlen=window)

    def update(self, value: float) -> float | None:
        """Returns the running median when `value` is a spike, else None; then remembers `value`."""
        if not math.isfinite(value):
            return None  # non-finite values are the bad-step guard's business
        median = statistics.median(self.history) if len(self.history) >= self.warmup else None
        self.history.append(value)
        if median is not None and value > self.factor * max(median, 1e-12):
            return median
        return None
