"""The DPO step (Rafailov et al. 2023, arXiv:2305.18290): the policy learns from preference pairs directly,
with no reward model and no sampling (single-process, no Ray, no DeepSpeed).

The reference is the frozen starting model. Its sequence log-probs never change, so `attach_reference`
computes them once, in one no-grad pass before training, and stores them beside each pair: training then
holds one model instead of two (half the weights' memory) and does one forward per pair instead of two.
With LoRA the reference is the base model: that pass runs with the adapters off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algo import dpo_loss
from ..data.encode import Encoded, pad_right
from ..models.load import adapters_off
from ..models.packing import micro_batch_indices, pack
from .sft import next_token_logprobs


@dataclass
class DPOPair:
    chosen: Encoded
    rejected: Encoded
    ref_chosen: float = 0.0  # the reference's summed log-prob of the chosen response
    ref_rejected: float = 0.0

    @property
    def tokens(self) -> int:
        """Both sides' tokens: they stay in one micro-batch."""
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def dpo_batch(items: list[DPOPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one padded batch: ids (2B, T), reference log-probs (2B,)."""
    sides = [p.chosen for p in items] + [p.rejected for p in items]
    ids, attn = pad_right([e.input_ids for e in sides], pad_id)  # (2B, T)
    loss_mask, _ = pad_right([e.loss_mask for e in sides], 0)  # (2B, T)
    ref = torch.tensor([p.ref_chosen for p in items] + [p.ref_rejected for p in items], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask, "ref_logps": ref}


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Sum of log p(token) over each row's response tokens (the prompt masked as SFT masks it) -> (N,) float32."""
    logp = next_token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch.get("packed"))  # (N, T-1)
    return (logp * batch["loss_mask"][:, 1:].float()).sum(-1)  # (N,)


def dpo_step_loss(model, batch: dict, norm: float, beta: float, kind: str) -> tuple[torch.Tensor, dict]:
    """Sum of per-pair DPO/IPO losses divided by `norm` (the optimizer step's global pair count). Stats are
    sums, as 0-dim tensors (no host sync) or counts."""
    logps = sequence_logprobs(model, batch)  # (2B,)
    B = logps.shape[0] // 2
    ref = batch["ref_logps"]  # (2B,)
    losses, st = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta, kind)  # (B,)
    total = losses.sum()
    stats = {"loss_sum": total, "count": B, "accuracy": st["reward_accuracy"].sum(),
             "reward_margin": st["reward_margin"].sum(), "logp_chosen": logps[:B].sum(),
             "logp_rejected": logps[B:].sum(), "tokens": batch["attention_mask"].sum()}
    return total / norm, {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in stats.items()}


def dpo_count(items) -> int:
    return len(items)


@torch.no_grad()
def attach_reference(model, to_dev, items: list, pad_id: int, micro: int, max_tokens: int | None = None,
                     flat: bool = True) -> list[DPOPair]:
    """(chosen, rejected, margin) pairs -> DPOPairs with the reference's log-probs, `micro` pairs per forward,
    or with `max_tokens` (dpo_max_tokens_per_micro_batch) packed forwards of at most that many tokens (`flat`:
    one row, `packing.one_row`). Every worker does all rows, in the same order: the same values everywhere,
    and the same number of forwards on every rank (a ZeRO-3 forward is a collective). DPO has no use for the
    pair's margin."""
    pairs = [DPOPair(c, r) for c, r, _ in items]
    ref: dict[int, tuple[float, float]] = {}
    for ids in micro_batch_indices([p.tokens for p in pairs], micro, max_tokens):
        batch = dpo_batch([pairs[i] for i in ids], pad_id)
        if max_tokens is not None:
            batch["packed"] = pack(batch["input_ids"], batch["attention_mask"], flat)
        with adapters_off(model):
            logps = sequence_logprobs(model, to_dev(batch)).tolist()  # (2b,)
        ref.update({i: (logps[j], logps[len(ids) + j]) for j, i in enumerate(ids)})
    return [DPOPair(p.chosen, p.rejected, *ref[i]) for i, p in enumerate(pairs)]
