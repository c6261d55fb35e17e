"""experience: samples -> rewards, advantages (the forwards that give log-probs and values: steps/forwards.py)."""

from __future__ import annotations

import torch

from ..algo import (
    advantages_for,
    kl_penalty,
    kl_placement,
    masked_mean,
)
from ..config.algorithms import ALGORITHMS
from ..steps.records import Experience


def make_experience(samples, old_logprobs, ref_logprobs, values, scores, cfg, kl_coef: float,
                    kept: torch.Tensor | None = None) -> Experience:
    """The advantages phase, for every online algorithm: the KL estimate, then `advantages_for`. The KL
    penalty enters the rewards only where `kl_placement` puts it (kl_in: reward; else the learner adds it to
    the loss). Critic-free algorithms pass `values` None: zeros stand in. `kept` (B,) bool: the samples
    with a reward (`algo.kept_samples`); the others leave the action mask, so they are in no advantage,
    whitening, group statistic or loss (their rows stay, so the mini-batches split as before)."""
    mask = samples.action_mask  # (B, R)
    if kept is not None:
        mask = mask * kept[:, None].to(mask.dtype)  # (B, R)
        scores = torch.where(kept, scores, torch.zeros((), dtype=scores.dtype))  # (B,) a placeholder, masked
    place = kl_placement(cfg.kl_in, kl_coef, cfg.kl_estimator)
    kl = kl_penalty(old_logprobs, ref_logprobs, place.estimator) * mask  # (B, R)
    values = torch.zeros_like(old_logprobs) if values is None else values  # (B, R)
    rewards, advantages, returns = advantages_for(
        ALGORITHMS[cfg.algorithm].advantages, scores, kl, values, mask, n=cfg.n_samples_per_prompt,
        kl_coef=place.reward_coef, gamma=cfg.ppo_gamma, lam=cfg.ppo_lam, whiten=cfg.ppo_whiten_advantages, norm_std=cfg.grpo_norm_std)
    return Experience(samples.sequences, samples.attention_mask, mask, samples.prompt_len, old_logprobs, ref_logprobs,
                      values, scores, kl, rewards, advantages, returns, samples.sample_ids, samples.version)


def experience_stats(exp: Experience, kept: torch.Tensor | None = None) -> dict[str, float]:
    """Over the samples in the update (`kept`, default all)."""
    if kept is not None:
        exp = exp.select(kept.nonzero().flatten())
    mask = exp.action_mask
    lengths = mask.sum(1).float()  # (B,)
    return {
        "reward_mean": exp.scores.mean().item() if len(exp) else 0.0,
        "reward_std": exp.scores.std().item() if len(exp) > 1 else 0.0,
        "kl": (exp.kl * mask).sum(1).mean().item() if len(exp) else 0.0,  # per-sequence KL, averaged
        "response_length": lengths.mean().item() if len(exp) else 0.0,
        "advantage_mean": masked_mean(exp.advantages, mask).item(),
        "return_mean": masked_mean(exp.returns, mask).item(),
        "value_mean": masked_mean(exp.values, mask).item(),
    }


def truncated(samples, eos_id: int, max_new_tokens: int) -> torch.Tensor:
    """(B,) bool: responses cut off at max_new_tokens, without eos."""
    lengths = samples.action_mask.sum(1)  # (B,)
    last = samples.responses.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)  # (B,)
    return (lengths >= max_new_tokens) & (last != eos_id)


def process_scores(scores: torch.Tensor, samples, cfg, eos_id: int, moments,
                   kept: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) -> (B,): the overlong penalty, then normalisation by the running moments (updated with this batch
    first, so the first batch is normalised by its own statistics), then clipping. Each optional. Only the
    `kept` samples (default all) update the moments: a failed sample has no score."""
    scores = scores.float()
    if cfg.overlong_penalty:
        scores = scores - cfg.overlong_penalty * truncated(samples, eos_id, cfg.gen_max_new_tokens).float()
    if moments is not None:
        moments.update(scores if kept is None else scores[kept])
        scores = (scores - moments.mean) / (moments.std + 1e-6)
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    return scores
