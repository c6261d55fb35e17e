"""The health guards as plain functions: non-finite rows, bad-step streaks, gradient-spike alarms."""

import math

import pytest
import torch

from rlhf_dist.io.tracking import read_metrics, truncate_metrics
from rlhf_dist.online.health import BadStepCounter, HealthError, SpikeDetector, nonfinite_rows


def test_nonfinite_rows_names_tensors_and_rows():
    scores = torch.tensor([1.0, float("nan"), 0.0])  # (B,)
    adv = torch.zeros(3, 4)  # (B, R)
    adv[2, 3] = float("inf")
    assert nonfinite_rows(scores=scores, advantages=adv, values=torch.ones(3, 4)) == {
        "scores": [1], "advantages": [2]}
    assert nonfinite_rows(scores=torch.ones(3)) == {}


def test_bad_steps_abort_only_in_a_row():
    c = BadStepCounter(3)
    for bad in (True, True, False, True, True):
        c.record(bad, "x")
    assert (c.in_a_row, c.total) == (2, 4)
    with pytest.raises(HealthError, match="3 bad steps in a row.*last: nan reward"):
        c.record(True, "nan reward")


def test_spike_detector_uses_running_median():
    d = SpikeDetector(factor=10.0, window=20, warmup=5)
    assert [d.update(v) for v in (1.0, 2.0, 1.5, 50.0, 1.0)] == [None] * 5  # warm-up: no verdicts
    assert d.update(16.0) == 1.5  # the median of 1, 2, 1.5, 50, 1 is 1.5 (the mean, 11.1, would hide it)
    d2 = SpikeDetector(factor=10.0, window=20, warmup=5)
    for v in (1.0, 2.0, 1.5, 50.0, 1.0):
        d2.update(v)
    assert d2.update(14.9) is None
    assert d2.update(math.inf) is None  # non-finite norms are the bad-step guard's business
    assert len(d2.history) == 6


def test_truncate_metrics_drops_rows_to_be_redone(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(f'{{"iteration": {i}, "x": {i}}}\n' for i in range(1, 6)))
    truncate_metrics(p, "iteration", 2)
    assert [r["iteration"] for r in read_metrics(p)] == [1, 2]
    truncate_metrics(tmp_path / "missing.jsonl", "iteration", 0)  # nothing to do


def test_logprob_tolerance_by_precision():
    from rlhf_dist.online.health import logprob_tolerance

    assert logprob_tolerance(None, bf16=False) == 1e-3 and logprob_tolerance(None, bf16=True) == 1.0
    assert logprob_tolerance(0.05, bf16=True) == 0.05


def test_drift_guard_stops_after_k_iterations_in_a_row():
    """A rollout generating with other weights than the learner's (a sync that delivered nothing, as in
    review item 1.2) shows as log-probs off by more than the float32 tolerance every iteration."""
    from rlhf_dist.online.health import DriftGuard

    g = DriftGuard(1e-3, limit=3)
    assert [g.record(x, i) for i, x in enumerate([2e-6, 0.02, 3e-6, 0.02, 0.01], 1)] == [False, True, False, True, True]
    with pytest.raises(HealthError, match=r"differ from the policy learner's by 0.03 .* for 3 iterations in a row, "
                                          r"up to iteration 6"):
        g.record(0.03, 6)
    assert DriftGuard(1e-3, 1).record(1e-3, 1) is False
    with pytest.raises(HealthError):
        DriftGuard(1e-3, 1).record(float("nan"), 1)
