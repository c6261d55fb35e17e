"""experience: samples -> logprobs, values, rewards, advantages. Forward helpers are single-process."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algo import (
    advantages_for,
    chunked_logprobs,
    entropy_from_logits,
    kl_penalty,
    kl_placement,
    logprobs_from_logits,
    masked_mean,
)
from ..config.algorithms import ALGORITHMS
from ..models import token_scalars
from ..packing import Packed, forward, padded


def response_logits(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    temperature: float = 1.0, packed: Packed | None = None) -> torch.Tensor:
    """Logits that predict the response tokens: (B, P+R) -> (B, R, V). Only response positions are
    projected to the vocabulary (`logits_to_keep`), the rest of the sequence is context; packed, every
    position is (the response positions are spread over the rows)."""
    R = sequences.shape[1] - prompt_len
    if packed is None:
        out = forward(model, sequences, attention_mask, None, logits_to_keep=R + 1)
        logits = out.logits[:, :-1].float()  # (B, R, V)
    else:
        out = forward(model, sequences, attention_mask, packed).logits  # (rows, T, V): every packed position
        logits = padded(out, packed, slice(prompt_len - 1, -1)).float()  # (B, R, V)
    return logits if temperature == 1.0 else logits / temperature  # skip a pass over (B, R, V) when it is a no-op


# Config fields of architectures whose logits are not just lm_head(hidden): they take the full-logits path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def plain_lm_head(model) -> torch.nn.Linear | None:
    """The output projection when logits = lm_head(decoder(...).last_hidden_state), so chunks of positions can
    be projected by hand; None otherwise: a wrapped (LoRA) lm_head, hooks on it (projecting by hand would skip
    them), a logit transform in the config, or ZeRO-3 partitioned weights (gathered only by its forward hooks)."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    if hasattr(head.weight, "ds_id"):
        return None
    if any(getattr(model.config, k, None) not in (None, 1.0) for k in _LOGIT_TRANSFORMS):
        return None
    return head


def response_hidden(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                    packed: Packed | None = None) -> torch.Tensor:
    """(B, P+R) -> (B, R, H): the decoder's last hidden states at the positions that predict the response
    tokens. `get_decoder` reaches through PEFT wrappers, whose LoRA layers sit inside the decoder."""
    out = forward(model.get_decoder(), sequences, attention_mask, packed)
    return padded(out.last_hidden_state, packed, slice(prompt_len - 1, -1))  # (B, R, H)


def response_logprobs_entropy(model, sequences, attention_mask, prompt_len: int, temperature: float = 1.0,
                              entropy_rows: int | None = 0, chunk: int = 1024, packed: Packed | None = None):
    """(B, P+R) -> logprobs (B, R) of the response tokens and entropies (b, R) of the policy there.
    `entropy_rows`: None = every row, differentiable with the logprobs; k = only the first k rows, without
    gradient (a sample, for logging; no entropy and None returned for k = 0). The logits are projected
    `chunk` positions at a time (`chunked_logprobs`), so no (B, R, V) float32 tensor exists, except for
    models `plain_lm_head` rejects, which take the full-logits path. `packed`: the forward runs over the
    packed layout of the batch (`packing.pack`)."""
    targets = sequences[:, prompt_len:]  # (B, R)
    B, R = targets.shape
    head = plain_lm_head(model)
    if head is None:
        logits = response_logits(model, sequences, attention_mask, prompt_len, temperature, packed)  # (B, R, V)
        logp = logprobs_from_logits(logits, targets)  # (B, R)
        if entropy_rows == 0:
            return logp, None
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_rows is None):
            return logp, entropy_from_logits(logits[:entropy_rows])  # (b, R)
    hidden = response_hidden(model, sequences, attention_mask, prompt_len, packed)  # (B, R, H)
    H = hidden.shape[-1]
    logp, entropy = chunked_logprobs(hidden.reshape(-1, H), head.weight, targets.reshape(-1), chunk, temperature,
                                     with_entropy=entropy_rows is None, bias=head.bias)  # (B*R,) each
    if entropy_rows == 0:
        return logp.view(B, R), None
    if entropy_rows is not None:
        with torch.no_grad():  # one more projection, of k rows only
            _, entropy = chunked_logprobs(hidden[:entropy_rows].reshape(-1, H), head.weight,
                                          targets[:entropy_rows].reshape(-1), chunk, temperature, True, head.bias)
    return logp.view(B, R), entropy.view(-1, R)


def response_logprobs(model, sequences, attention_mask, prompt_len: int, temperature: float = 1.0,
                      packed: Packed | None = None) -> torch.Tensor:
    """(B, P+R) -> (B, R) logprob of each response token."""
    return response_logprobs_entropy(model, sequences, attention_mask, prompt_len, temperature, packed=packed)[0]


def response_values(critic, sequences, attention_mask, prompt_len: int, packed: Packed | None = None) -> torch.Tensor:
    """(B, P+R) -> (B, R): V(s_t) for the state before each response token."""
    values = token_scalars(critic, sequences, attention_mask, packed)  # (B, P+R)
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
    penalty enters the rewards only where `kl_placement` puts it (kl_in: reward; else the learner adds it to
    the loss). Critic-free algorithms pass `values` None: zeros stand in."""
    mask = samples.action_mask  # (B, R)
    place = kl_placement(cfg.kl_in, kl_coef, cfg.kl_estimator)
    kl = kl_penalty(old_logprobs, ref_logprobs, place.estimator) * mask  # (B, R)
    values = torch.zeros_like(old_logprobs) if values is None else values  # (B, R)
    rewards, advantages, returns = advantages_for(
        ALGORITHMS[cfg.algorithm].advantages, scores, kl, values, mask, n=cfg.n_samples_per_prompt,
        kl_coef=place.reward_coef, gamma=cfg.ppo_gamma, lam=cfg.ppo_lam, whiten=cfg.ppo_whiten_advantages, norm_std=cfg.grpo_norm_std)
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
