"""Unit tests for rlhf_dist.algo: hand-worked values (arithmetic in the comments) and a plain-Python
reference for GAE. CPU only, no Ray, fast."""

from __future__ import annotations

import ast
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_dist.algo import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    pairwise_ranking_loss,
    ppo_policy_loss,
    ppo_value_loss,
    response_lengths,
    shape_rewards,
)

REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64


def as_mask(rows, kind):
    """Build the same mask as bool or float."""
    t = torch.tensor(rows, dtype=torch.bool)
    return t if kind == "bool" else t.float()


def ragged_mask(lengths, T):  # -> (B, T) bool, right-padded
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


# ---------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------

X = [[1.0, 2.0, 100.0], [4.0, -50.0, 7.0]]
M = [[1, 1, 0], [1, 0, 1]]


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masked_sum_and_mean_ignore_masked_entries(kind):
    x, m = torch.tensor(X), as_mask(M, kind)
    # valid entries: 1, 2, 4, 7 -> sum 14, mean 14 / 4 = 3.5 (100 and -50 ignored)
    assert masked_sum(x, m).item() == pytest.approx(14.0)
    assert masked_mean(x, m).item() == pytest.approx(3.5)
    # per row: (1 + 2) / 2 = 1.5 and (4 + 7) / 2 = 5.5
    assert torch.allclose(masked_mean(x, m, dim=1), torch.tensor([1.5, 5.5]))
    assert torch.allclose(masked_sum(x, m, dim=1), torch.tensor([3.0, 11.0]))
    # per column: (1 + 4) / 2 = 2.5, 2 / 1 = 2, 7 / 1 = 7
    assert torch.allclose(masked_mean(x, m, dim=0), torch.tensor([2.5, 2.0, 7.0]))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masked_mean_empty_mask_is_zero_not_nan(kind):
    x = torch.tensor(X)
    assert masked_mean(x, as_mask([[0, 0, 0], [0, 0, 0]], kind)).item() == 0.0
    # one empty row: that row's mean is 0, the other is (1 + 2) / 2
    per_row = masked_mean(x, as_mask([[1, 1, 0], [0, 0, 0]], kind), dim=1)
    assert torch.equal(per_row, torch.tensor([1.5, 0.0]))
    # NaN / inf in masked-out positions must not leak
    y = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]])
    assert masked_mean(y, as_mask([[1, 0], [0, 1]], kind)).item() == pytest.approx(2.0)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masked_var_hand(kind):
    x, m = torch.tensor(X), as_mask(M, kind)
    # valid 1, 2, 4, 7, mean 3.5; squared deviations 6.25 + 2.25 + 0.25 + 12.25 = 21
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(21 / 4)  # 5.25
    assert masked_var(x, m, unbiased=True).item() == pytest.approx(21 / 3)  # 7.0, Bessel n/(n-1)
    # a single valid entry: no Bessel correction (would divide by 0), variance 0
    one = as_mask([[0, 1, 0], [0, 0, 0]], kind)
    assert masked_var(x, one, unbiased=True).item() == 0.0
    assert masked_var(x, as_mask([[0, 0, 0], [0, 0, 0]], kind)).item() == 0.0


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masked_whiten(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=F64) * 3 + 5
    m = ragged_mask([7, 3, 0, 5], 7)
    m = m if kind == "bool" else m.float()
    w = masked_whiten(x, m)
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(w, m).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(w[~m.bool()] == 0)
    # shift_mean=False: unit variance but the original mean is kept
    w2 = masked_whiten(x, m, shift_mean=False)
    assert masked_mean(w2, m).item() == pytest.approx(masked_mean(x, m).item(), abs=1e-9)
    assert masked_var(w2, m).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(w2[~m.bool()] == 0)


def test_masked_whiten_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, -50.0, 7.0]], dtype=F64)
    m = torch.tensor(M)
    # mean 3.5, unbiased var 7 -> (x - 3.5) / sqrt(7)
    s = math.sqrt(7 + 1e-8)
    want = torch.tensor([[-2.5 / s, -1.5 / s, 0.0], [0.5 / s, 0.0, 3.5 / s]], dtype=F64)
    assert torch.allclose(masked_whiten(x, m), want)


# ---------------------------------------------------------------------------------------
# Log-probs and entropy
# ---------------------------------------------------------------------------------------

def test_logprobs_from_logits_hand():
    # logits (0, ln 3): softmax (1/4, 3/4) -> log p = (ln 1/4, ln 3/4)
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    labels = torch.tensor([[0, 1]])
    out = logprobs_from_logits(logits, labels)
    assert out.shape == (1, 2)
    assert torch.allclose(out, torch.tensor([[math.log(0.25), math.log(0.75)]]))


def test_logprobs_from_logits_matches_log_softmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    labels = torch.randint(0, 11, (3, 5), generator=g)
    want = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    got = logprobs_from_logits(logits, labels)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5)
    # bf16 logits: upcast to float32, same answer as float32 maths on the bf16 values
    lb = logits.bfloat16()
    got_b = logprobs_from_logits(lb, labels)
    want_b = torch.log_softmax(lb.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    assert got_b.dtype == torch.float32
    assert torch.allclose(got_b, want_b, atol=1e-5)


def test_logprobs_from_logits_gradient():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 7, generator=g, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3), generator=g)
    torch.autograd.gradcheck(lambda z: logprobs_from_logits(z, labels), (logits,))


def test_entropy_uniform_is_log_v():
    for V in (2, 7, 50):
        logits = torch.full((2, 3, V), 1.234)
        assert torch.allclose(entropy_from_logits(logits), torch.full((2, 3), math.log(V)))


def test_entropy_hand_and_random():
    # p = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351...
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(logits).item() == pytest.approx(h, rel=1e-6)
    # a -inf logit (banned token) contributes 0: (0, 0, -inf) is uniform over 2 -> ln 2
    banned = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    assert entropy_from_logits(banned).item() == pytest.approx(math.log(2.0))
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 9, generator=g) * 5
    logp = torch.log_softmax(z, -1)
    assert torch.allclose(entropy_from_logits(z), -(logp.exp() * logp).sum(-1), atol=1e-5)
    assert entropy_from_logits(z.bfloat16()).dtype == torch.float32


# ---------------------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------------------

def test_kl_hand():
    # pi = 1/2, ref = 1/4: k1 = ln(1/2) - ln(1/4) = ln 2 = 0.693147
    # log r = ln(ref/pi) = ln(1/2), r = 1/2: k3 = (1/2 - 1) - ln(1/2) = -0.5 + 0.693147 = 0.193147
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2), rel=1e-6)
    # reverse: pi = 1/4, ref = 1/2: r = 2, k3 = (2 - 1) - ln 2 = 0.306853; k1 = -ln 2 (negative)
    assert kl_penalty(ref, logp, "k3").item() == pytest.approx(1 - math.log(2), rel=1e-6)
    assert kl_penalty(ref, logp, "k1").item() == pytest.approx(-math.log(2))


def test_kl_zero_when_equal_and_k3_nonnegative():
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(4, 6, generator=g) * 5
    for est in ("k1", "k3"):
        assert torch.all(kl_penalty(logp, logp.clone(), est) == 0)
    ref = -torch.rand(4, 6, generator=g) * 5
    k3 = kl_penalty(logp, ref, "k3")
    assert k3.shape == (4, 6)
    assert torch.all(k3 >= 0)


def test_kl_unknown_estimator():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(x, x, "k4")


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 1000)
    assert c.value == 0.05
    d = json.loads(json.dumps(c.state_dict()))
    c2 = FixedKLController(1.0)
    c2.load_state_dict(d)
    assert c2.value == 0.05


def test_adaptive_kl_controller():
    # err = clip(kl / target - 1, -0.2, 0.2); value *= 1 + err * n_steps / horizon
    def fresh():
        return AdaptiveKLController(0.1, target=6.0, horizon=10000)

    c = fresh()
    c.update(6.6, 1000)  # err = 6.6/6 - 1 = 0.1 -> 0.1 * (1 + 0.1 * 0.1) = 0.101
    assert c.value == pytest.approx(0.101)
    c = fresh()
    c.update(9.0, 1000)  # err = 0.5 clipped to 0.2 -> 0.1 * (1 + 0.2 * 0.1) = 0.102
    assert c.value == pytest.approx(0.102)
    c = fresh()
    c.update(600.0, 10000)  # err clipped to 0.2, n/h = 1 -> at most +20%: 0.12
    assert c.value == pytest.approx(0.12)
    c = fresh()
    c.update(3.0, 1000)  # err = -0.5 clipped to -0.2 -> 0.1 * (1 - 0.02) = 0.098
    assert c.value == pytest.approx(0.098)
    c = fresh()
    c.update(0.0, 10000)  # err = -1 clipped to -0.2, n/h = 1 -> at most -20%: 0.08
    assert c.value == pytest.approx(0.08)
    c = fresh()
    c.update(6.0, 1000)  # on target: unchanged
    assert c.value == pytest.approx(0.1)


def test_adaptive_kl_controller_state_round_trip():
    c = AdaptiveKLController(0.2, target=3.0, horizon=500)
    c.update(5.0, 100)
    d = c.state_dict()
    assert set(d) == {"value", "target", "horizon"}
    assert type(d["value"]) is float and type(d["target"]) is float and type(d["horizon"]) is int
    d = json.loads(json.dumps(d))
    c2 = AdaptiveKLController(1.0, target=1.0, horizon=1)
    c2.load_state_dict(d)
    assert (c2.value, c2.target, c2.horizon) == (c.value, c.target, c.horizon)
    c.update(1.0, 50)
    c2.update(1.0, 50)
    assert c2.value == c.value


# ---------------------------------------------------------------------------------------
# Rewards, GAE
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bool", "float"])
def test_shape_rewards_ragged(kind):
    scores = torch.tensor([10.0, 20.0, 30.0])
    kl = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 3)
    m = as_mask([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], kind)
    out = shape_rewards(scores, kl, m, kl_coef=0.5)
    # row 0 (len 4): -0.5 * (1, 2, 3, 4) = (-0.5, -1, -1.5, -2), +10 on index 3 -> 8
    # row 1 (len 2): (-0.5, -1) + 20 on index 1 -> 19, padding 0
    # row 2 (empty): all 0, the score is dropped
    want = torch.tensor([[-0.5, -1.0, -1.5, 8.0], [-0.5, 19.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(out, want)
    # the inputs are not modified
    assert torch.equal(kl, torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 3))


def test_shape_rewards_empty_row_only_kl():
    kl = torch.tensor([[1.0, 2.0]])
    out = shape_rewards(torch.tensor([5.0]), kl, torch.zeros(1, 2), kl_coef=0.1)
    assert torch.equal(out, torch.zeros(1, 2))


def gae_reference(rewards, values, lengths, gamma, lam):
    """Plain Python double loop over rows and (reversed) time; the step after a row's last valid
    token is terminal."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        L = lengths[b]
        gae = 0.0
        for t in reversed(range(L)):
            next_v = values[b][t + 1] if t + 1 < L else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            gae = delta + gamma * lam * gae
            adv[b][t] = gae
            ret[b][t] = gae + values[b][t]
    return torch.tensor(adv, dtype=F64), torch.tensor(ret, dtype=F64)


def test_gae_hand():
    # T = 2, r = (0, 1), V = (0.5, 0.2), gamma 0.9, lam 0.8
    # t=1 (last): delta = 1 + 0 - 0.2 = 0.8; A1 = 0.8
    # t=0: delta = 0 + 0.9 * 0.2 - 0.5 = -0.32; A0 = -0.32 + 0.9 * 0.8 * 0.8 = 0.256
    # returns = A + V = (0.756, 1.0)
    r = torch.tensor([[0.0, 1.0]], dtype=F64)
    v = torch.tensor([[0.5, 0.2]], dtype=F64)
    adv, ret = compute_gae(r, v, torch.ones(1, 2), gamma=0.9, lam=0.8)
    assert torch.allclose(adv, torch.tensor([[0.256, 0.8]], dtype=F64))
    assert torch.allclose(ret, torch.tensor([[0.756, 1.0]], dtype=F64))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0), (1.0, 0.7)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_gae_matches_reference(gamma, lam, kind):
    rng = random.Random(hash((gamma, lam)) & 0xFFFF)
    B, T = 6, 9
    lengths = [T, 0, 1, 4, 7, rng.randint(0, T)]
    rewards = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)]
    values = [[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)]
    m = ragged_mask(lengths, T)
    m = m if kind == "bool" else m.float()
    r_t, v_t = torch.tensor(rewards, dtype=F64), torch.tensor(values, dtype=F64)
    adv, ret = compute_gae(r_t, v_t, m, gamma, lam)
    want_adv, want_ret = gae_reference(rewards, values, lengths, gamma, lam)
    assert adv.shape == ret.shape == (B, T)
    assert torch.allclose(adv, want_adv, atol=1e-10)
    assert torch.allclose(ret, want_ret, atol=1e-10)
    assert torch.all(adv[~m.bool()] == 0) and torch.all(ret[~m.bool()] == 0)
    if gamma == 1.0 and lam == 1.0:
        # A_t = sum_{k >= t, k < L} r_k - V_t (reward-to-go minus value); returns = reward-to-go
        for b, L in enumerate(lengths):
            for t in range(L):
                rtg = sum(rewards[b][t:L])
                assert adv[b, t].item() == pytest.approx(rtg - values[b][t], abs=1e-10)
                assert ret[b, t].item() == pytest.approx(rtg, abs=1e-10)


def test_gae_ignores_padding_junk_and_has_no_grad():
    m = ragged_mask([2, 3], 4)
    r = torch.tensor([[1.0, 2.0, float("nan"), 1e30], [1.0, 1.0, 1.0, float("inf")]], dtype=F64)
    v = torch.tensor([[0.5, 0.5, float("nan"), 7.0], [0.0, 0.0, 0.0, 1e30]], dtype=F64, requires_grad=True)
    adv, ret = compute_gae(r, v, m, gamma=1.0, lam=1.0)
    assert not adv.requires_grad and not ret.requires_grad
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    # row 0: rewards-to-go (3, 2) minus V (0.5, 0.5) -> (2.5, 1.5); row 1: (3, 2, 1) - 0
    assert torch.allclose(adv, torch.tensor([[2.5, 1.5, 0, 0], [3, 2, 1, 0]], dtype=F64))


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bool", "float"])
def test_policy_loss_on_policy(kind):
    g = torch.Generator().manual_seed(5)
    logp = -torch.rand(3, 5, generator=g, dtype=F64)
    adv = torch.randn(3, 5, generator=g, dtype=F64)
    m = ragged_mask([5, 2, 4], 5)
    m = m if kind == "bool" else m.float()
    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, m, clip_range=0.2)
    # ratio = 1 everywhere: loss = mean(-A) over valid tokens, nothing clipped
    assert loss.item() == pytest.approx(-masked_mean(adv, m).item())
    assert stats["clip_frac"] == 0.0
    assert stats["approx_kl"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["ratio_max"] == pytest.approx(1.0)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())  # no host sync


def test_policy_loss_clipping_hand():
    eps = 0.2
    ratio = [1.5, 0.5, 0.5, 1.1, 3.0]  # last token is masked out
    A = [1.0, -1.0, 1.0, 2.0, 100.0]
    # t0: A=+1, r=1.5: unclipped -1.5, clipped -1.2*1 = -1.2 -> max -1.2   (clipped active)
    # t1: A=-1, r=0.5: unclipped  0.5, clipped  0.8       ->  max  0.8    (clipped active)
    # t2: A=+1, r=0.5: unclipped -0.5, clipped -0.8       ->  max -0.5    (not active)
    # t3: A=+2, r=1.1: both -2.2 (inside the clip range)  ->  -2.2        (not active)
    # loss = (-1.2 + 0.8 - 0.5 - 2.2) / 4 = -3.1 / 4 = -0.775; clip_frac = 2 / 4
    old = torch.tensor([[-1.0] * 5], dtype=F64)
    logp = (old + torch.log(torch.tensor([ratio], dtype=F64))).requires_grad_(True)
    adv = torch.tensor([A], dtype=F64)
    m = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logp, old, adv, m, clip_range=eps)
    assert loss.item() == pytest.approx(-0.775)
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 0.5 + 1.1) / 4)  # 0.9
    assert stats["ratio_max"] == pytest.approx(1.5)  # 3.0 is masked out
    kl = 0.5 * sum(math.log(x) ** 2 for x in ratio[:4]) / 4
    assert stats["approx_kl"] == pytest.approx(kl)
    # gradient d loss / d logp_t = -A_t * ratio_t / 4 on unclipped tokens, 0 on clipped / masked
    loss.backward()
    want = torch.tensor([[0.0, 0.0, -0.5 / 4, -2.2 / 4, 0.0]], dtype=F64)
    assert torch.allclose(logp.grad, want)


def test_policy_loss_padding_cannot_make_nan_grads():
    logp = torch.tensor([[-1.0, 500.0]], requires_grad=True)  # exp(500) overflows float32
    old = torch.tensor([[-1.0, -500.0]])
    loss, stats = ppo_policy_loss(logp, old, torch.ones(1, 2), torch.tensor([[1.0, 0.0]]), clip_range=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert math.isfinite(stats["ratio_max"]) and math.isfinite(stats["approx_kl"])
    # empty mask: loss 0 and finite stats
    loss, stats = ppo_policy_loss(logp, old, torch.ones(1, 2), torch.zeros(1, 2), clip_range=0.2)
    assert loss.item() == 0.0 and stats["ratio_max"] == 0.0 and stats["clip_frac"] == 0.0


def test_value_loss_hand():
    eps = 0.25  # exact in binary, so the equal-branch case below is exactly equal
    # t0: v=1.0,   old=0.5, R=1: v_clip = 0.5 + 0.25 = 0.75; (0)^2 vs (0.25)^2=0.0625 -> 0.0625 (clip active)
    # t1: v=0.625, old=0.5, R=1: v_clip = 0.625 (inside);   0.375^2 = 0.140625 both -> 0.140625
    # t2: v=0.0,   old=0.5, R=1: v_clip = 0.25;   1.0 vs 0.75^2=0.5625  -> 1.0 (not active)
    # t3: masked
    # loss = 0.5 * (0.0625 + 0.140625 + 1.0) / 3 = 0.5 * 1.203125 / 3 = 0.20052083...
    v = torch.tensor([[1.0, 0.625, 0.0, 5.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0]], dtype=F64)
    R = torch.tensor([[1.0, 1.0, 1.0, -5.0]], dtype=F64)
    m = torch.tensor([[True, True, True, False]])
    loss, stats = ppo_value_loss(v, old, R, m, clip_range=eps)
    assert loss.item() == pytest.approx(0.5 * 1.203125 / 3)
    assert stats["value_clip_frac"] == pytest.approx(1 / 3)
    # grads: t0 goes through the clipped branch, which is flat in v -> 0;
    # t1: 0.5 * 2 * (v - R) / 3 = -0.375 / 3; t2: -1 / 3; masked 0
    loss.backward()
    assert torch.allclose(v.grad, torch.tensor([[0.0, -0.125, -1 / 3, 0.0]], dtype=F64))


def test_value_loss_no_clip_when_unchanged():
    v = torch.tensor([[0.3, -0.2, 0.9]])
    R = torch.tensor([[1.3, 0.8, 0.9]])
    loss, stats = ppo_value_loss(v, v.clone(), R, torch.ones(1, 3), clip_range=0.2)
    # 0.5 * (1 + 1 + 0) / 3 = 1/3
    assert loss.item() == pytest.approx(1 / 3)
    assert stats["value_clip_frac"] == 0.0


def test_pairwise_ranking_loss_hand():
    rc = torch.tensor([2.0, 0.0])
    rr = torch.tensor([0.0, 1.0])
    # diff = (2, -1); -log sigmoid(x) = log(1 + e^-x): log(1 + e^-2) = 0.126928, log(1 + e) = 1.313262
    loss, stats = pairwise_ranking_loss(rc, rr)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.e)) / 2, rel=1e-6)
    assert float(stats["accuracy"]) == pytest.approx(0.5)  # only pair 0 has r_c > r_r
    assert float(stats["margin_mean"]) == pytest.approx(0.5)  # (2 - 1) / 2
    # margin (1, 0): logits (1, -1) -> (log(1 + e^-1) + log(1 + e)) / 2 = (0.313262 + 1.313262) / 2
    loss_m, stats_m = pairwise_ranking_loss(rc, rr, torch.tensor([1.0, 0.0]))
    assert loss_m.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2, rel=1e-6)
    assert {k: float(v) for k, v in stats_m.items()} == {k: float(v) for k, v in stats.items()}  # accuracy / margin_mean do not depend on the required margin
    # centering: (r_c + r_r)^2 = (4, 1), mean 2.5, times 0.1 -> +0.25
    loss_c, _ = pairwise_ranking_loss(rc, rr, torch.tensor([1.0, 0.0]), center_coef=0.1)
    assert loss_c.item() == pytest.approx(loss_m.item() + 0.25, rel=1e-6)


def test_pairwise_ranking_loss_ties_and_grad():
    rc = torch.tensor([1.0, 3.0, -1.0], requires_grad=True)
    rr = torch.tensor([1.0, 0.0, 0.0])
    loss, stats = pairwise_ranking_loss(rc, rr)
    # a tie is not counted as correct: 1 of 3
    assert float(stats["accuracy"]) == pytest.approx(1 / 3)
    # diff 0 -> log 2 per pair
    loss.backward()
    # d/d r_c of mean softplus(-(r_c - r_r)) = -sigmoid(-diff) / 3; diff = 0 -> -0.5 / 3
    assert rc.grad[0].item() == pytest.approx(-0.5 / 3)
    # huge gaps stay finite
    big, _ = pairwise_ranking_loss(torch.tensor([-1e4]), torch.tensor([1e4]))
    assert big.item() == pytest.approx(2e4)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_response_lengths(kind):
    m = as_mask([[1, 1, 0], [0, 0, 0], [1, 1, 1]], kind)
    out = response_lengths(m)
    assert out.dtype == torch.long
    assert torch.equal(out, torch.tensor([2, 0, 3]))


# ---------------------------------------------------------------------------------------
# Import hygiene
# ---------------------------------------------------------------------------------------

def test_algo_source_imports_only_torch():
    allowed = {"torch", "math", "typing", "dataclasses", "enum", "__future__"}
    own = {p.stem for p in (REPO / "rlhf_dist" / "algo").glob("*.py")} - {"__init__"}
    for path in sorted((REPO / "rlhf_dist" / "algo").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                # Only its own modules: the math never reaches into the rest of the package.
                assert node.level == 0 or (node.level == 1 and node.module in own), path
                names = [node.module] if node.level == 0 else []
            else:
                continue
            for n in names:
                assert n.split(".")[0] in allowed, (path, n)


def test_importing_algo_pulls_in_nothing_beyond_torch():
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import rlhf_dist.algo\n"
        "new = sorted({m.split('.')[0] for m in set(sys.modules) - before})\n"
        "heavy = sorted(m for m in ('ray', 'deepspeed', 'transformers', 'wandb') if m in sys.modules)\n"
        "print(new, heavy)\n"
        "assert new == ['rlhf_dist'], new\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
