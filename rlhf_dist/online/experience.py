"""experience: samples -> logprobs, values, rewards, advantages. Forward helpers are single-process."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algo import advantages_for, kl_estimator_for, kl_penalty, logprobs_from_logits, masked_mean
from ..models import position_ids_from_mask, token_scalars


def response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    temperature: float = 1.0) -> torch.Tensor:
    """Logits that predict the response tokens: (B, P+R) -> (B, R, V). Only response positions are
    projected to the vocabulary (`logits_to_keep`), the rest of the sequence is context."""
    R = sequences.shape[1] - prompt_len
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                logits_to_keep=R + 1, use_cache=False)
    logits = out.logits[:, :-1].float()  # (B, R, V)
    return logits if temperature == 1.0 else logits / temperature  # skip a pass over (B, R, V) when it is a no-op


def response_logprobs(model, sequences, attention_mask, prompt_len: int, temperature: float = 1.0) -> torch.Tensor:
    """(B, P+R) -> (B, R) logprob of each response token."""
    logits = response_logits(model, sequences, attention_mask, prompt_len, temperature)  # (B, R, V)
    return logprobs_from_logits(logits, sequences[:, prompt_len:])


def response_values(critic, sequences, attention_mask, prompt_len: int) -> torch.Tensor:
    """(B, P+R) -> (B, R): V(s_t) for the state before each response token."""
    values = token_scalars(critic, sequences, attention_mask)  # (B, P+R)
    return values[:, prompt_len - 1: -1]


@dataclass
class Experience:
    """One PPO batch, ready for the learners. Response-aligned tensors are (B, R)."""

    sequences: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R)
    action_mask: torch.Tensor  # (B, R)
    prompt_len: int
    old_logprobs: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R)
    scores: torch.Tensor  # (B,) sequence-level reward
    kl: torch.Tensor  # (B, R) per-token KL estimate
    rewards: torch.Tensor  # (B, R) shaped token rewards
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R)
    sample_ids: list[int]
    version: int

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def select(self, idx: list[int] | torch.Tensor) -> "Experience":
        idx = torch.as_tensor(idx, dtype=torch.long)
        fields = {}
        for k, v in self.__dict__.items():
            if isinstance(v, torch.Tensor):
                fields[k] = v[idx]
            elif k == "sample_ids":
                fields[k] = [v[i] for i in idx.tolist()]
            else:
                fields[k] = v
        return Experience(**fields)


def make_experience(samples, old_logprobs, ref_logprobs, values, scores, cfg, kl_coef: float) -> Experience:
    """The advantages phase, for every online algorithm: the KL estimate, then `advantages_for`. The KL
    penalty enters the rewards only with kl_in: reward (else the learner adds it to the loss). Critic-free
    algorithms pass `values` None: zeros stand in."""
    mask = samples.action_mask  # (B, R)
    kl = kl_penalty(old_logprobs, ref_logprobs, kl_estimator_for(cfg.kl_in, cfg.kl_estimator)) * mask  # (B, R)
    values = torch.zeros_like(old_logprobs) if values is None else values  # (B, R)
    rewards, advantages, returns = advantages_for(
        cfg.algorithm, scores, kl, values, mask, n=cfg.n_samples_per_prompt,
        kl_coef=kl_coef if cfg.kl_in == "reward" else 0.0, gamma=cfg.ppo_gamma, lam=cfg.ppo_lam,
        whiten=cfg.ppo_whiten_advantages, norm_std=cfg.grpo_norm_std)
    return Experience(samples.sequences, samples.attention_mask, mask, samples.prompt_len, old_logprobs, ref_logprobs,
                      values, scores, kl, rewards, advantages, returns, samples.sample_ids, samples.version)


def experience_stats(exp: Experience) -> dict[str, float]:
    mask = exp.action_mask
    lengths = mask.sum(1).float()  # (B,)
    return {
        "reward_mean": exp.scores.mean().item(),
        "reward_std": exp.scores.std().item() if len(exp) > 1 else 0.0,
        "kl": (exp.kl * mask).sum(1).mean().item(),  # per-sequence KL, averaged
        "response_length": lengths.mean().item(),
        "advantage_mean": masked_mean(exp.advantages, mask).item(),
        "return_mean": masked_mean(exp.returns, mask).item(),
        "value_mean": masked_mean(exp.values, mask).item(),
    }


def truncated(samples, eos_id: int, max_new_tokens: int) -> torch.Tensor:
    """(B,) bool: responses cut off at max_new_tokens, without eos."""
    lengths = samples.action_mask.sum(1)  # (B,)
    last = samples.responses.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)  # (B,)
    return (lengths >= max_new_tokens) & (last != eos_id)


def process_scores(scores: torch.Tensor, samples, cfg, eos_id: int, moments) -> torch.Tensor:
    """(B,) -> (B,): the overlong penalty, then normalisation by the running moments (updated with this batch
    first, so the first batch is normalised by its own statistics), then clipping. Each optional."""
    scores = scores.float()
    if cfg.overlong_penalty:
        scores = scores - cfg.overlong_penalty * truncated(samples, eos_id, cfg.gen_max_new_tokens).float()
    if moments is not None:
        moments.update(scores)
        scores = (scores - moments.mean) / (moments.std + 1e-6)
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    return scores
