"""The critic-free estimators, loss aggregation, DPO's losses and the running reward moments, each on a
worked example (numbers by hand in the comments)."""

import math

import pytest
import torch

from rlhf_dist.algo import (
    RunningMoments,
    aggregate_loss,
    dpo_loss,
    group_baseline,
    grpo_advantages,
    kl_penalty,
    loss_units,
    reinforce_pp_advantages,
    reward_to_go,
    rloo_advantages,
)


def test_grpo_normalises_within_each_group():
    scores = torch.tensor([2.0, 4.0, 6.0, 1.0, 1.0, 1.0])  # two prompts x 3 samples
    # group 1: mean 4, unbiased std 2 -> (-1, 0, 1); group 2: all equal -> 0, not NaN
    torch.testing.assert_close(grpo_advantages(scores, 3), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
                               atol=1e-5, rtol=0)
    # Dr. GRPO: no division by the std
    torch.testing.assert_close(grpo_advantages(scores, 3, norm_std=False), torch.tensor([-2.0, 0, 2, 0, 0, 0]))


def test_rloo_leaves_one_out():
    # 1: baseline (2 + 6) / 2 = 4 -> -3; 2: (1 + 6) / 2 = 3.5 -> -1.5; 6: (1 + 2) / 2 = 1.5 -> 4.5
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), torch.tensor([-3.0, -1.5, 4.5]))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.tensor([1.0]), 1)
    with pytest.raises(ValueError, match="do not split into groups of 2"):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_reward_to_go_and_reinforce_pp():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0]])  # the last column is padding
    mask = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(reward_to_go(rewards, mask), torch.tensor([[6.0, 5.0, 3.0, 0.0]]))
    # gamma 0.5: t2 = 3, t1 = 2 + 1.5 = 3.5, t0 = 1 + 1.75 = 2.75
    torch.testing.assert_close(reward_to_go(rewards, mask, 0.5), torch.tensor([[2.75, 3.5, 3.0, 0.0]]))
    # REINFORCE++: returns (6, 5, 3) whitened over the batch: mean 14/3, unbiased std sqrt(7/3)
    mean, std = 14 / 3, math.sqrt(7 / 3)
    want = torch.tensor([[(6 - mean) / std, (5 - mean) / std, (3 - mean) / std, 0.0]])
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(group_baseline(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2), torch.tensor([-1.0, 1, 0, 0]))


@pytest.mark.parametrize("mode, want", [
    ("token_mean", 2.5),  # (1 + 2 + 3 + 4) / 4 tokens
    ("seq_mean_token_mean", 3.0),  # (mean(1, 2, 3) = 2, mean(4) = 4) -> 3
    ("seq_mean_token_sum", 5.0),  # (6, 4) -> 5
])
def test_loss_aggregation(mode, want):
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert float(aggregate_loss(per_token, mask, mode)) == pytest.approx(want)
    # Micro-batches divided by the whole batch's units add up to the batch's loss (gradient accumulation).
    units = loss_units(mask, mode)
    parts = sum(float(aggregate_loss(per_token[i:i + 1], mask[i:i + 1], mode, units)) for i in range(2))
    assert parts == pytest.approx(want)


def test_dpo_losses_and_implicit_rewards():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
    # h = (pc - rc) - (pr - rr) = 1 - (-1) = 2
    loss, st = dpo_loss(pc, pr, rc, rr, beta=0.5, kind="sigmoid")
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1.0)))  # -log sigmoid(0.5 * 2)
    assert (float(st["reward_chosen"]), float(st["reward_rejected"])) == (0.5, -0.5)
    assert float(st["reward_margin"]) == 1.0 and float(st["reward_accuracy"]) == 1.0
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, kind="ipo")
    assert float(loss) == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)  # (h - 1 / (2 beta))^2 = 1


def test_k2_estimator():
    # log r = ref - logp = -1: k1 = 1, k2 = 0.5, k3 = e^-1 - 1 + 1 = e^-1
    logp, ref = torch.tensor([[0.0]]), torch.tensor([[-1.0]])
    assert float(kl_penalty(logp, ref, "k1")) == pytest.approx(1.0)
    assert float(kl_penalty(logp, ref, "k2")) == pytest.approx(0.5)
    assert float(kl_penalty(logp, ref, "k3")) == pytest.approx(math.exp(-1))


def test_running_moments_match_one_pass():
    m = RunningMoments()
    m.update(torch.tensor([1.0, 2.0, 3.0]))
    m.update(torch.tensor([4.0, 5.0]))
    assert m.mean == pytest.approx(3.0) and m.std == pytest.approx(math.sqrt(2.5))
    again = RunningMoments()
    again.load_state_dict(m.state_dict())
    assert again.state_dict() == m.state_dict()


def test_overlong_penalty_normalisation_and_clip():
    """Two responses of 3 new tokens at most: the first ends with eos (2), the second is cut off without it."""
    from types import SimpleNamespace

    from rlhf_dist.online.experience import process_scores, truncated
    from rlhf_dist.rollout.samples import Samples

    seq = torch.tensor([[9, 5, 2, 0], [9, 5, 6, 7]])  # prompt 9, then the responses
    s = Samples(seq, torch.ones_like(seq), torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.zeros(2, 3), 1, [0, 1], 0)
    assert truncated(s, eos_id=2, max_new_tokens=3).tolist() == [False, True]
    cfg = SimpleNamespace(overlong_penalty=0.5, gen_max_new_tokens=3, reward_clip=None)
    torch.testing.assert_close(process_scores(torch.tensor([1.0, 1.0]), s, cfg, 2, None), torch.tensor([1.0, 0.5]))
    moments = RunningMoments()
    cfg = SimpleNamespace(overlong_penalty=0.0, gen_max_new_tokens=3, reward_clip=0.5)
    # (1, 3): mean 2, unbiased std sqrt(2) -> -0.707, 0.707 -> clipped to -0.5, 0.5
    torch.testing.assert_close(process_scores(torch.tensor([1.0, 3.0]), s, cfg, 2, moments), torch.tensor([-0.5, 0.5]))
    assert moments.count == 2 and moments.mean == 2.0
