"""The RLHF arithmetic as small pure-torch functions: masked statistics, log-probs and entropy from
logits, KL estimators and controllers, reward shaping, GAE, and the PPO / reward-model losses.

Nothing here knows about configs, Ray or DeepSpeed: tensors and floats go in, tensors (and plain
float stats) come out, so every formula can be unit-tested on a CPU with hand-worked numbers.

Conventions:
- Shapes are noted beside every tensor argument: B = batch rows, T = tokens, V = vocabulary.
- A `mask` is a bool or float tensor with 1 (True) for valid tokens and 0 (False) elsewhere. It is
  read as "valid where != 0"; it is never used as a weight. Masked-out entries are selected away with
  `torch.where` rather than multiplied by 0, so NaN/inf in padding cannot leak into results or grads.
- Response masks are right-padded: row b has valid tokens 0..L_b-1 and padding after; a row may be
  empty (L_b == 0).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "logprobs_from_logits",
    "entropy_from_logits",
    "kl_penalty",
    "FixedKLController",
    "AdaptiveKLController",
    "shape_rewards",
    "compute_gae",
    "ppo_policy_loss",
    "ppo_value_loss",
    "pairwise_ranking_loss",
    "response_lengths",
]

KL_ESTIMATORS = ("k1", "k3")


def _valid(mask: torch.Tensor) -> torch.Tensor:  # (...) -> (...) bool
    """Bool view of a bool/float/int mask: valid where != 0."""
    return mask if mask.dtype == torch.bool else mask != 0


# ---------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------

def masked_sum(
    x: torch.Tensor,  # (...) any shape
    mask: torch.Tensor,  # (...) same shape as x (or broadcastable to it)
    dim: Optional[int | tuple[int, ...]] = None,
) -> torch.Tensor:  # () if dim is None, else x's shape with `dim` reduced
    """Sum of x over valid entries (all of them when dim is None)."""
    xm = torch.where(_valid(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(
    x: torch.Tensor,  # (...)
    mask: torch.Tensor,  # (...) same shape as x (or broadcastable to it)
    dim: Optional[int | tuple[int, ...]] = None,
) -> torch.Tensor:  # () if dim is None, else x's shape with `dim` reduced
    """Mean of x over valid entries; 0 (not NaN) wherever there are no valid entries."""
    valid = _valid(mask)
    total = masked_sum(x, valid, dim)
    ones = torch.ones_like(x, dtype=total.dtype) if x.is_floating_point() else torch.ones_like(x, dtype=torch.float32)
    count = masked_sum(ones, valid, dim)
    # With count == 0 the sum is also 0, so clamping the divisor to 1 yields exactly 0.
    return total / count.clamp(min=1)


def masked_var(
    x: torch.Tensor,  # (...)
    mask: torch.Tensor,  # (...) same shape as x
    unbiased: bool = True,
) -> torch.Tensor:  # () scalar
    """Variance of x over all valid entries (one global number). Bessel-corrected (n / (n - 1))
    when `unbiased` and there are at least two valid entries; 0 when there are none."""
    valid = _valid(mask)
    mean = masked_mean(x, valid)
    var = masked_mean((x - mean) ** 2, valid)
    if unbiased:
        n = masked_sum(torch.ones_like(var).expand_as(x), valid)  # () number of valid entries
        # torch.where rather than `if n > 1` so no host sync is needed on an accelerator.
        var = var * torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))
    return var


def masked_whiten(
    x: torch.Tensor,  # (...)
    mask: torch.Tensor,  # (...) same shape as x
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:  # (...) same shape as x, 0 outside the mask
    """(x - mean) / sqrt(var + eps) with the statistics taken over valid entries only (unbiased
    variance). With shift_mean=False the mean is added back, i.e. only the scale is normalised
    (used for rewards, where the sign of the mean carries meaning)."""
    valid = _valid(mask)
    mean = masked_mean(x, valid)
    var = masked_var(x, valid, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


# ---------------------------------------------------------------------------------------
# Log-probabilities and entropy
# ---------------------------------------------------------------------------------------

def _needs_upcast(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def logprobs_from_logits(
    logits: torch.Tensor,  # (B, T, V) float32 / float64 / bfloat16 / float16
    labels: torch.Tensor,  # (B, T) long, token ids in [0, V)
) -> torch.Tensor:  # (B, T) log p(label), float32 (float64 for float64 logits)
    """log softmax(logits)[label] = logit[label] - logsumexp(logits).

    Never materialises a full (B, T, V) log_softmax: only a gather and a logsumexp reduction.
    Half-precision logits are upcast to float32 for the logsumexp (bf16 has ~3 significant digits,
    which is far too coarse for log-ratios in PPO); the upcast is done one batch row at a time so the
    float32 temporary is (T, V), not (B, T, V).
    """
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    if not _needs_upcast(logits):
        return picked - torch.logsumexp(logits, dim=-1)
    lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])  # (B, T) float32
    return picked.float() - lse


def _entropy_rows(logits: torch.Tensor) -> torch.Tensor:  # (..., V) -> (...)
    lse = torch.logsumexp(logits, dim=-1)  # (...)
    p = torch.softmax(logits, dim=-1)  # (..., V)
    # p * logit would be 0 * -inf = NaN for vocabulary entries masked with -inf; they contribute 0.
    pl = torch.where(p > 0, p * logits, torch.zeros((), dtype=p.dtype, device=p.device))
    return lse - pl.sum(dim=-1)


def entropy_from_logits(
    logits: torch.Tensor,  # (B, T, V)
) -> torch.Tensor:  # (B, T) entropy in nats, float32 (float64 for float64 logits)
    """H = -sum p log p = logsumexp(z) - sum softmax(z) * z, since log p = z - logsumexp(z) and
    sum p = 1. This form never takes log of a tiny probability. Half precision is upcast per row."""
    if not _needs_upcast(logits):
        return _entropy_rows(logits)
    return torch.stack([_entropy_rows(row.float()) for row in logits])


# ---------------------------------------------------------------------------------------
# KL penalty
# ---------------------------------------------------------------------------------------

def kl_penalty(
    logp: torch.Tensor,  # (B, T) log pi(token), tokens sampled from pi
    ref_logp: torch.Tensor,  # (B, T) log ref(token) for the same tokens
    estimator: str,
) -> torch.Tensor:  # (B, T) per-token estimate of KL(pi || ref)
    """Single-sample estimators of KL(pi || ref) from http://joschu.net/blog/kl-approx.html, with
    r = ref(x) / pi(x), x ~ pi:
    - "k1": -log r = logp - ref_logp. Unbiased but high variance and can be negative per token.
    - "k3": (r - 1) - log r. Unbiased (E_pi[r] = 1) and always >= 0 (log r <= r - 1), lower variance.
    Note: k3 grows like exp(log r), so an extreme ref/pi gap gives a large value; callers that fear
    outliers should clamp the result.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_r = ref_logp - logp
        # expm1 keeps precision when r is close to 1, where (r - 1) and log r nearly cancel.
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


class FixedKLController:
    """A constant KL coefficient. Same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient never changes."""

    def state_dict(self) -> dict:
        return {"value": float(self.value)}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Proportional controller that steers the observed KL towards `target`.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593,
    sec. 2.2: e_t = clip(KL_t / target - 1, -0.2, 0.2); beta <- beta * (1 + K_beta * e_t) with
    K_beta = n_steps / horizon. The clip bounds each update to +-20% (times n_steps/horizon) so one
    noisy KL measurement cannot swing the coefficient.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0:
            raise ValueError(f"AdaptiveKLController target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """`current_kl`: the batch's mean per-sequence KL; `n_steps`: samples (or steps) since the
        last update, in the same unit as `horizon`."""
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        # Plain Python numbers so the dict can be written with json.dump.
        return {"value": float(self.value), "target": float(self.target), "horizon": int(self.horizon)}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])
        self.target = float(d["target"])
        self.horizon = int(d["horizon"])


# ---------------------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------------------

def response_lengths(
    mask: torch.Tensor,  # (B, T)
) -> torch.Tensor:  # (B,) long, number of valid tokens per row
    return _valid(mask).sum(dim=-1).long()


def _last_valid_index(valid: torch.Tensor) -> torch.Tensor:  # (B, T) bool -> (B,) long, -1 if empty
    """Index of the last valid position of each row, read from the mask itself (so it is right for
    any padding layout, not only right padding), or -1 for an empty row."""
    T = valid.shape[-1]
    pos = torch.arange(T, device=valid.device).expand_as(valid)  # (B, T)
    return torch.where(valid, pos, torch.full_like(pos, -1)).max(dim=-1).values


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
# Losses
# ---------------------------------------------------------------------------------------
# Reduction choice: the PPO losses are a token-level mean over every valid token in the batch
# (sum of per-token losses / number of valid tokens), not a mean of per-sequence means. Each token
# then carries the same weight, so long responses are not down-weighted per token. Callers doing
# gradient accumulation over micro-batches should weight each micro-batch by its token count.

def ppo_policy_loss(
    logp: torch.Tensor,  # (B, T) log pi_theta(a_t) under the current policy (requires grad)
    old_logp: torch.Tensor,  # (B, T) log pi_old(a_t) from the rollout
    advantages: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T)
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, float]]:  # loss () scalar, stats
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), written as a loss:
        L = mean_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)),
    ratio_t = exp(logp_t - old_logp_t).

    stats (plain floats, over valid tokens):
    - clip_frac: fraction of tokens where the clipped term is the larger (active) one, i.e. the
      gradient through the ratio is cut off;
    - approx_kl: mean of 0.5 * (logp - old_logp)^2, the "k2" estimator of KL(pi_old || pi) from
      http://joschu.net/blog/kl-approx.html, as used for `approxkl` in openai/lm-human-preferences;
    - ratio_mean, ratio_max: of the importance ratio (0 when there are no valid tokens).
    """
    valid = _valid(mask)
    old_logp = old_logp.detach()
    advantages = advantages.detach()
    # Zero the log-ratio in padding before exp: a huge value there would give inf, and the backward
    # of torch.where would then produce 0 * inf = NaN gradients even though it is masked out.
    log_ratio = torch.where(valid, logp - old_logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), valid)

    with torch.no_grad():
        n = int(valid.sum())
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), valid).item(),
            "approx_kl": masked_mean(0.5 * log_ratio.float() ** 2, valid).item(),
            "ratio_mean": masked_mean(ratio.float(), valid).item(),
            "ratio_max": ratio.float()[valid.expand_as(ratio)].max().item() if n > 0 else 0.0,
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,  # (B, T) current critic values (requires grad)
    old_values: torch.Tensor,  # (B, T) critic values at rollout time
    returns: torch.Tensor,  # (B, T) GAE returns (regression targets)
    mask: torch.Tensor,  # (B, T)
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, float]]:  # loss () scalar, stats
    """Clipped value loss as in openai/baselines ppo2 and openai/lm-human-preferences:
        v_clip = old + clip(v - old, -eps, eps)
        L = 0.5 * mean_t max((v - R)^2, (v_clip - R)^2)
    The pessimistic max keeps the critic from moving far from its rollout-time values in one update.
    stats: value_clip_frac, the fraction of valid tokens where the clipped error is the larger.
    """
    valid = _valid(mask)
    old_values = old_values.detach()
    returns = returns.detach()
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)  # (B, T)
    err = (values - returns) ** 2  # (B, T)
    err_clipped = (v_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), valid)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((err_clipped > err).float(), valid).item()}
    return loss, stats


def pairwise_ranking_loss(
    r_chosen: torch.Tensor,  # (B,) reward of the preferred response
    r_rejected: torch.Tensor,  # (B,) reward of the other response
    margin: Optional[torch.Tensor] = None,  # (B,) required reward gap, or None for 0
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:  # loss () scalar, stats
    """Bradley-Terry reward-model loss (Ouyang et al. 2022, arXiv:2203.02155, eq. 1):
        L = mean(-log sigmoid(r_c - r_r - margin)) + center_coef * mean((r_c + r_r)^2).
    The margin (Llama 2, Touvron et al. 2023, arXiv:2307.09288) asks for a larger gap on pairs whose
    preference is clearer. The centering term pulls the mean reward towards 0: the ranking loss is
    invariant to a constant shift, so without it the reward's offset drifts freely.
    -log sigmoid(x) is computed as softplus(-x), which is stable for large |x|.
    stats: accuracy (fraction with r_c > r_r) and margin_mean (mean r_c - r_r), plain floats.
    """
    diff = r_chosen - r_rejected  # (B,)
    logits = diff if margin is None else diff - margin.to(device=diff.device, dtype=diff.dtype)
    loss = torch.nn.functional.softplus(-logits).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    with torch.no_grad():
        stats = {
            "accuracy": (diff > 0).float().mean().item(),
            "margin_mean": diff.float().mean().item(),
        }
    return loss, stats
