"""Rewards and advantages: KL-shaped token rewards and GAE (PPO), group baselines (GRPO, RLOO) and
batch-normalised returns (REINFORCE++)."""

from __future__ import annotations

from typing import Callable

import torch

from .stats import _last_valid_index, _valid, masked_whiten


def shape_rewards(
    scores: torch.Tensor,  # (B,) sequence-level reward-model score
    kl: torch.Tensor,  # (B, T) per-token KL estimate
    mask: torch.Tensor,  # (B, T) response mask
    kl_coef: float,
) -> torch.Tensor:  # (B, T) per-token reward, 0 outside the mask
    """r_t = -kl_coef * KL_t on every response token, plus the sequence score on the last one.

    The reward model scores the whole sequence, so its score is credited once, at the final token
    (as in openai/lm-human-preferences, https://github.com/openai/lm-human-preferences, and Ziegler
    et al. 2019 arXiv:1909.08593); the KL penalty is dense. An empty row gets no score.
    """
    valid = _valid(mask)
    rewards = torch.where(valid, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    last = _last_valid_index(valid)  # (B,)
    has_any = last >= 0  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)[has_any]
    rewards = rewards.clone()
    rewards[rows, last[has_any]] += scores.to(rewards.dtype)[has_any]
    return rewards


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,  # (B, T) per-token rewards
    values: torch.Tensor,  # (B, T) critic values V(s_t)
    mask: torch.Tensor,  # (B, T) right-padded response mask
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # advantages (B, T), returns (B, T); both 0 outside mask
    """Generalised Advantage Estimation, Schulman et al. 2016, arXiv:1506.02438:
        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lam * A_{t+1}
    and returns R_t = A_t + V(s_t) (the critic's regression target).

    The episode ends at each row's last valid token: the step after it is terminal, so both
    V(s_{t+1}) and A_{t+1} are taken as 0 there (and everywhere in the padding). This is done by
    multiplying the "next" terms with mask[:, t+1]; a gap inside a row would likewise be treated as
    an episode end, which is why the mask must be right-padded. With gamma = lam = 1,
    A_t = sum_{k>=t} r_k - V(s_t) (reward-to-go minus value).
    """
    valid = _valid(mask)
    m = valid.to(values.dtype)  # (B, T)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(valid, rewards.to(values.dtype), zero)  # padding might hold junk
    v = torch.where(valid, values, zero)
    B, T = v.shape
    adv = torch.zeros_like(v)  # (B, T)
    next_adv = torch.zeros(B, dtype=v.dtype, device=v.device)  # (B,)
    next_value = torch.zeros(B, dtype=v.dtype, device=v.device)  # (B,)
    next_m = torch.zeros(B, dtype=v.dtype, device=v.device)  # (B,) 0 beyond the last column
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value * next_m - v[:, t]
        next_adv = delta + gamma * lam * next_adv * next_m
        adv[:, t] = next_adv
        next_value, next_m = v[:, t], m[:, t]
    adv = adv * m
    returns = (adv + v) * m
    return adv, returns


# ---------------------------------------------------------------------------------------
# Critic-free estimators. Samples of one prompt are consecutive rows: row b is in group b // n.
# ---------------------------------------------------------------------------------------

def _groups(scores: torch.Tensor, n: int) -> torch.Tensor:  # (B,) -> (B / n, n)
    if n < 1 or scores.shape[0] % n:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {n}")
    return scores.reshape(-1, n)


def grpo_advantages(
    scores: torch.Tensor,  # (B,) one outcome reward per sample, groups of n consecutive rows
    n: int,
    norm_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:  # (B,)
    """GRPO (Shao et al. 2024, arXiv:2402.03300, sec. 4.1.2): A_i = (r_i - mean(r_group)) / (std(r_group) + eps),
    std unbiased (as torch.std, and verl). With norm_std=False, A_i = r_i - mean(r_group): Dr. GRPO
    (Liu et al. 2025, arXiv:2503.20783) drops the division, which up-weights prompts whose rewards barely
    vary (too easy or too hard) and biases the update."""
    g = _groups(scores.float(), n)  # (G, n)
    centred = g - g.mean(dim=1, keepdim=True)
    if norm_std:
        centred = centred / (g.std(dim=1, keepdim=True) + eps) if n > 1 else centred
    return centred.reshape(-1)


def rloo_advantages(
    scores: torch.Tensor,  # (B,) groups of n consecutive rows, n >= 2
    n: int,
) -> torch.Tensor:  # (B,)
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740): the baseline of
    sample i is the mean of the other n - 1 samples of its prompt: A_i = r_i - (sum_j r_j - r_i) / (n - 1)."""
    if n < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    g = _groups(scores.float(), n)  # (G, n)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (n - 1)
    return (g - baseline).reshape(-1)


def broadcast_to_tokens(
    adv: torch.Tensor,  # (B,) one advantage per sequence
    mask: torch.Tensor,  # (B, T) response mask
) -> torch.Tensor:  # (B, T), 0 outside the mask
    return torch.where(_valid(mask), adv[:, None].to(torch.float32), torch.zeros((), device=adv.device))


@torch.no_grad()
def reward_to_go(
    rewards: torch.Tensor,  # (B, T) per-token rewards
    mask: torch.Tensor,  # (B, T) right-padded response mask
    gamma: float = 1.0,
) -> torch.Tensor:  # (B, T) G_t = sum_{k>=t} gamma^(k-t) r_k, 0 outside the mask
    valid = _valid(mask)
    r = torch.where(valid, rewards.float(), torch.zeros((), device=rewards.device))
    out = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], device=r.device)  # (B,)
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return torch.where(valid, out, torch.zeros((), device=r.device))


def reinforce_pp_advantages(
    token_rewards: torch.Tensor,  # (B, T) shaped rewards: -kl_coef * KL_t, plus the (baselined) score at the end
    mask: torch.Tensor,  # (B, T)
    gamma: float = 1.0,
) -> torch.Tensor:  # (B, T)
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): the return-to-go of the KL-shaped token rewards, normalised
    over the whole batch's valid tokens (mean 0, std 1) instead of by a critic or a group. Callers subtract
    a group-mean baseline from the scores first when there are several samples per prompt
    (REINFORCE++-baseline), see `group_baseline`."""
    return masked_whiten(reward_to_go(token_rewards, mask, gamma), mask)


def group_baseline(scores: torch.Tensor, n: int) -> torch.Tensor:  # (B,) -> (B,)
    """r_i - mean(r_group): the baseline REINFORCE++ uses with several samples per prompt (n = 1: unchanged)."""
    g = _groups(scores.float(), n)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1) if n > 1 else scores.float()


def _gae(scores, kl, values, mask, *, n, kl_coef, gamma, lam, whiten, norm_std):
    """PPO: GAE over the critic's values on the KL-shaped token rewards."""
    rewards = shape_rewards(scores, kl, mask, kl_coef)  # (B, T)
    adv, returns = compute_gae(rewards, values * mask, mask, gamma, lam)
    return rewards, (masked_whiten(adv, mask) if whiten else adv), returns


def _reinforce_pp(scores, kl, values, mask, *, n, kl_coef, gamma, lam, whiten, norm_std):
    """REINFORCE++: scores less their group mean, KL-shaped, then whitened returns-to-go."""
    rewards = shape_rewards(group_baseline(scores, n), kl, mask, kl_coef)
    return rewards, reinforce_pp_advantages(rewards, mask, gamma), reward_to_go(rewards, mask, gamma)


def _outcome(group_advantages: Callable):
    """Outcome-based estimators: the sequence's score less its summed KL penalty, against the other samples
    of its prompt (`group_advantages(seq (B,), n, norm_std) -> (B,)`), broadcast to the response tokens."""
    def estimate(scores, kl, values, mask, *, n, kl_coef, gamma, lam, whiten, norm_std):
        rewards = shape_rewards(scores, kl, mask, kl_coef)  # (B, T), logged
        zero = torch.zeros((), device=kl.device)
        seq = scores.float() - kl_coef * torch.where(_valid(mask), kl.float(), zero).sum(-1)  # (B,)
        adv = broadcast_to_tokens(group_advantages(seq, n, norm_std), mask)  # (B, T)
        return rewards, adv, reward_to_go(rewards, mask, gamma)

    return estimate


# The advantage estimators, by the name an algorithm's row (config.algorithms) gives.
ESTIMATORS: dict[str, Callable] = {
    "gae": _gae,
    "reinforce_pp": _reinforce_pp,
    "grpo": _outcome(grpo_advantages),
    "rloo": _outcome(lambda seq, n, norm_std: rloo_advantages(seq, n)),
}


def advantages_for(
    estimator: str,  # a key of ESTIMATORS (config.algorithms.ALGORITHMS[algorithm].advantages)
    scores: torch.Tensor,  # (B,) sequence scores, groups of n consecutive rows
    kl: torch.Tensor,  # (B, T) per-token KL estimate (k1 when it goes in the reward)
    values: torch.Tensor,  # (B, T) critic values (gae; zeros otherwise)
    mask: torch.Tensor,  # (B, T) response mask
    *,
    n: int,
    kl_coef: float,  # the KL penalty's weight in the reward (0 when the KL goes in the loss)
    gamma: float,
    lam: float,
    whiten: bool,
    norm_std: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # rewards (B, T), advantages (B, T), returns (B, T)
    """The one place the online algorithms differ in their advantages. Token rewards are the KL-shaped
    rewards (score at the last token) for every algorithm; returns are the critic's targets (gae) or the
    returns-to-go (logged)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}")
    return ESTIMATORS[estimator](scores, kl, values, mask, n=n, kl_coef=kl_coef, gamma=gamma, lam=lam,
                                 whiten=whiten, norm_std=norm_std)
