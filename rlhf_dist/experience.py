"""experience: samples -> logprobs, values, rewards, advantages. Forward helpers are single-process."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .algo import compute_gae, kl_penalty, logprobs_from_logits, masked_mean, masked_whiten, shape_rewards
from .models import position_ids_from_mask, token_scalars


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


def make_experience(samples, old_logprobs, ref_logprobs, values, scores, *, kl_coef: float, kl_estimator: str,
                    gamma: float, lam: float, whiten: bool) -> Experience:
    """The advantages phase: KL-shaped token rewards (reward at the last response token), GAE, whitening."""
    mask = samples.action_mask  # (B, R)
    kl = kl_penalty(old_logprobs, ref_logprobs, kl_estimator) * mask  # (B, R)
    rewards = shape_rewards(scores, kl, mask, kl_coef)  # (B, R)
    advantages, returns = compute_gae(rewards, values * mask, mask, gamma, lam)  # (B, R), (B, R)
    if whiten:
        advantages = masked_whiten(advantages, mask)
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
