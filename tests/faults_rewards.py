"""Reward functions that go bad, for the health-guard tests (run inside the reward actor)."""

from rlhf_dist.demo import positivity_reward

_calls = [0]


def positivity_or_nan(prompts, responses):
    """The demo reward, except NaN for every response of this process's third call."""
    _calls[0] += 1
    scores = positivity_reward(prompts, responses)
    return [float("nan")] * len(scores) if _calls[0] == 3 else scores

