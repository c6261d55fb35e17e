"""Masked statistics, log-probabilities and entropy from logits.

Conventions (all of rlhf_dist.algo):
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
import torch.utils.checkpoint


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


def _chunk_logprobs(
    hidden: torch.Tensor,  # (n, H)
    weight: torch.Tensor,  # (V, H)
    bias: Optional[torch.Tensor],  # (V,) or None
    targets: torch.Tensor,  # (n,) long
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # (n,) logprob of each target, (n,) entropy (empty without it)
    # Project in the weights' dtype, then upcast half precision: the same numbers as `lm_head(h).float()`.
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (n, V)
    logits = logits.float() if _needs_upcast(logits) else logits
    if temperature != 1.0:
        logits = logits / temperature
    logp = logprobs_from_logits(logits[None], targets[None])[0]  # (n,)
    entropy = _entropy_rows(logits) if with_entropy else logits.new_empty(0)  # (n,)
    return logp, entropy


def chunked_logprobs(
    hidden: torch.Tensor,  # (N, H) final hidden states (after the last norm)
    weight: torch.Tensor,  # (V, H) output projection (lm_head.weight)
    targets: torch.Tensor,  # (N,) long, token ids in [0, V)
    chunk: int = 1024,
    temperature: float = 1.0,
    with_entropy: bool = False,
    bias: Optional[torch.Tensor] = None,  # (V,) or None
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # (N,) log p(target), (N,) entropy or None; float32 (or 64)
    """`logprobs_from_logits` (and `entropy_from_logits`) of `hidden @ weight.T / temperature`, computed
    `chunk` rows at a time so that only a (chunk, V) float32 slice of the logits ever exists. With
    gradients each chunk is checkpointed: backward recomputes its logits instead of keeping every
    chunk's, so neither pass holds the full (N, V)."""
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    logps, ents = [], []
    for i in range(0, hidden.shape[0], chunk):
        args = (hidden[i:i + chunk], weight, bias, targets[i:i + chunk], temperature, with_entropy)
        if grad:
            lp, ent = torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        logps.append(lp)
        ents.append(ent)
    if not logps:  # N == 0
        empty = hidden.new_empty(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


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


class RunningMoments:
    """Running mean and standard deviation of a stream of scores (Chan et al.'s parallel update), for
    reward normalisation. Plain floats, so its state is saved as JSON in each checkpoint."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:  # (N,)
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        mean, m2 = float(x.mean()), float(((x - x.mean()) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, d: dict) -> None:
        self.count, self.mean, self.m2 = int(d["count"]), float(d["mean"]), float(d["m2"])
