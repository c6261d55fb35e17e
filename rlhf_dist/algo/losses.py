"""Losses: PPO's clipped policy and value losses, their aggregation over tokens and sequences, the
reward model's ranking loss, DPO's preference losses and KTO's loss."""

from __future__ import annotations

from typing import Optional

import torch

from .stats import _valid, masked_mean

# Reduction: the policy loss is reduced by `aggregate_loss` (token_mean by default: every valid token
# weighs the same); the value loss is always a token mean. Callers doing gradient accumulation pass the
# mini-batch's unit count (`loss_units`), so micro-batches add up to the mini-batch's loss.

def ppo_policy_loss(
    logp: torch.Tensor,  # (B, T) log pi_theta(a_t) under the current policy (requires grad)
    old_logp: torch.Tensor,  # (B, T) log pi_old(a_t) from the rollout
    advantages: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T)
    clip_range: float,
    agg: str = "token_mean",
    units: Optional[torch.Tensor | float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # loss () scalar, stats () each
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), written as a loss:
        L = agg_t max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)),
    ratio_t = exp(logp_t - old_logp_t), reduced by `aggregate_loss(.., agg, units)`.

    stats (0-dim tensors, so no host sync; over valid tokens):
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
    loss = aggregate_loss(torch.maximum(unclipped, clipped), valid, agg, units)

    with torch.no_grad():
        ratio_f = ratio.float()
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), valid),
            "approx_kl": masked_mean(0.5 * log_ratio.float() ** 2, valid),
            "ratio_mean": masked_mean(ratio_f, valid),
            # ratio > 0, so filling padding with 0 leaves the max over valid tokens (0 when there are none).
            "ratio_max": torch.where(valid, ratio_f, torch.zeros((), device=ratio.device)).amax()
            if ratio.numel() else torch.zeros((), device=ratio.device),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,  # (B, T) current critic values (requires grad)
    old_values: torch.Tensor,  # (B, T) critic values at rollout time
    returns: torch.Tensor,  # (B, T) GAE returns (regression targets)
    mask: torch.Tensor,  # (B, T)
    clip_range: float,
    units: Optional[torch.Tensor | float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # loss () scalar, stats () each
    """Clipped value loss as in openai/baselines ppo2 and openai/lm-human-preferences:
        v_clip = old + clip(v - old, -eps, eps)
        L = 0.5 * mean_t max((v - R)^2, (v_clip - R)^2), the mean over `units` tokens (default: this batch's)
    The pessimistic max keeps the critic from moving far from its rollout-time values in one update.
    stats: value_clip_frac (0-dim tensor), the fraction of valid tokens where the clipped error is the larger.
    """
    valid = _valid(mask)
    old_values = old_values.detach()
    returns = returns.detach()
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)  # (B, T)
    err = (values - returns) ** 2  # (B, T)
    err_clipped = (v_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * aggregate_loss(torch.maximum(err, err_clipped), valid, "token_mean", units)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((err_clipped > err).float(), valid)}
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
    stats: accuracy (fraction with r_c > r_r) and margin_mean (mean r_c - r_r), 0-dim tensors (no host sync).
    """
    diff = r_chosen - r_rejected  # (B,)
    logits = diff if margin is None else diff - margin.to(device=diff.device, dtype=diff.dtype)
    loss = torch.nn.functional.softplus(-logits).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    with torch.no_grad():
        stats = {
            "accuracy": (diff > 0).float().mean(),
            "margin_mean": diff.float().mean(),
        }
    return loss, stats


# ---------------------------------------------------------------------------------------
# Loss aggregation
# ---------------------------------------------------------------------------------------
LOSS_AGG = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


def loss_units(
    mask: torch.Tensor,  # (B, T)
    mode: str,
) -> torch.Tensor:  # () what `mode` averages over: valid tokens (token_mean) or sequences
    """Sequences count only with a valid token: a sample masked out of the update (its reward failed,
    `algo.rewards.kept_samples`) is not a sequence of the mean."""
    valid = _valid(mask)
    return valid.sum() if mode == "token_mean" else valid.any(dim=-1).sum().float()


def aggregate_loss(
    per_token: torch.Tensor,  # (B, T) a loss per token
    mask: torch.Tensor,  # (B, T)
    mode: str,
    units: Optional[torch.Tensor | float] = None,  # () the divisor; default: this batch's own `loss_units`
) -> torch.Tensor:  # () scalar
    """Reduce per-token losses to one number (the modes of verl's `agg_loss`):
    - token_mean: sum over valid tokens / number of valid tokens. Every token weighs the same, so long
      responses weigh more in total (PPO's usual choice, and DAPO's).
    - seq_mean_token_mean: the mean over sequences of each sequence's token mean. Every sequence weighs
      the same, so a long response's tokens each weigh less (the original GRPO).
    - seq_mean_token_sum: the mean over sequences of each sequence's token sum: no length normalisation
      inside a sequence (Dr. GRPO's fix for GRPO's length bias, with a constant divisor).
    `units` lets a micro-batch divide by its whole mini-batch's count, so that micro-batches and gradient
    accumulation sum to exactly the mini-batch's loss."""
    valid = _valid(mask)
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    if mode == "token_mean":
        total = torch.where(valid, per_token, zero).sum()
    elif mode == "seq_mean_token_mean":
        total = masked_mean(per_token, valid, dim=-1).sum()
    elif mode == "seq_mean_token_sum":
        total = torch.where(valid, per_token, zero).sum()
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(LOSS_AGG)}")
    units = loss_units(mask, mode) if units is None else units
    return total / torch.clamp(torch.as_tensor(units, dtype=total.dtype, device=total.device), min=1)


def dpo_loss(
    pi_chosen: torch.Tensor,  # (B,) sum of the policy's logprobs over the chosen response
    pi_rejected: torch.Tensor,  # (B,)
    ref_chosen: torch.Tensor,  # (B,) the same under the frozen reference
    ref_rejected: torch.Tensor,  # (B,)
    beta: float,
    kind: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # per-pair losses (B,), stats (tensors, no host sync)
    """h = (pi_c - ref_c) - (pi_r - ref_r), the log-ratio margin of the pair.
    - sigmoid: -log sigmoid(beta * h), DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7);
    - ipo: (h - 1 / (2 beta))^2, IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17): a squared loss that
      stops pushing once the margin reaches 1 / (2 beta), so it does not drive h to infinity on
      deterministic preferences.
    stats: the implicit rewards beta * (pi - ref) of both sides, their margin, and whether chosen > rejected."""
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)  # (B,)
    if kind == "sigmoid":
        losses = torch.nn.functional.softplus(-beta * h)
    elif kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; expected sigmoid or ipo")
    with torch.no_grad():
        r_c, r_r = beta * (pi_chosen - ref_chosen), beta * (pi_rejected - ref_rejected)
        stats = {"reward_chosen": r_c, "reward_rejected": r_r, "reward_margin": r_c - r_r,
                 "reward_accuracy": (r_c > r_r).float()}
    return losses, stats


def kto_loss(
    pi_logps: torch.Tensor,  # (B,) sum of the policy's logprobs over each completion
    ref_logps: torch.Tensor,  # (B,) the same under the frozen reference
    desirable: torch.Tensor,  # (B,) bool: the completion's label
    kl: torch.Tensor,  # () mean log pi/ref of mismatched (prompt, completion) pairs: the reference point's estimate
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # per-example losses (B,), stats (tensors, no host sync)
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 8), with r = pi - ref and the reference point
    z0 = max(0, kl), detached (the paper does not backpropagate through it):
        desirable:   lambda_D * (1 - sigmoid(beta * (r - z0)))
        undesirable: lambda_U * (1 - sigmoid(beta * (z0 - r)))
    (lambda_y - v(x, y) of the paper's value function). Desirable completions are pushed above the
    reference point, undesirable ones below it; the weights trade off unbalanced data (the paper
    suggests lambda_D n_D / (lambda_U n_U) in [1, 4/3]).
    stats: the reference point z0 (B,) and, signed by the label, the implicit reward's margin
    beta * (r - z0) (positive: on the label's side) and whether it is strictly on the label's side."""
    z0 = kl.detach().clamp(min=0)  # ()
    r = pi_logps - ref_logps  # (B,)
    sign = torch.where(desirable, 1.0, -1.0).to(r.dtype)  # (B,)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(r.dtype)  # (B,)
    losses = weight * (1 - torch.sigmoid(beta * sign * (r - z0)))  # (B,)
    with torch.no_grad():
        margin = beta * sign * (r - z0)  # (B,)
        stats = {"kl": z0.expand_as(r), "reward_margin": margin, "accuracy": (margin > 0).float()}
    return losses, stats
