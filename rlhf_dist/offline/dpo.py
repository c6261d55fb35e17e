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

from ..algo import dpo_loss, logprobs_from_logits
from ..data import Encoded, pad_right
from ..models import adapters_off, position_ids_from_mask


@dataclass
class DPOPair:
    chosen: Encoded
    rejected: Encoded
    ref_chosen: float = 0.0  # the reference's summed log-prob of the chosen response
    ref_rejected: float = 0.0


def dpo_batch(items: list[DPOPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one padded batch: ids (2B, T), reference log-probs (2B,)."""
    sides = [p.chosen for p in items] + [p.rejected for p in items]
    ids, attn = pad_right([e.input_ids for e in sides], pad_id)  # (2B, T)
    loss_mask, _ = pad_right([e.loss_mask for e in sides], 0)  # (2B, T)
    ref = torch.tensor([p.ref_chosen for p in items] + [p.ref_rejected for p in items], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask, "ref_logps": ref}


def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log p(token) over each row's response tokens (the prompt masked as SFT masks it) -> (N,) float32."""
    ids, attn = batch["input_ids"], batch["attention_mask"]  # (N, T)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn),
                   use_cache=False).logits  # (N, T, V)
    logp = logprobs_from_logits(logits[:, :-1], ids[:, 1:]).float()  # (N, T-1): token t+1 given the prefix
    return (logp * batch["loss_mask"][:, 1:].float()).sum(-1)  # (N,)


def dpo_step_loss(model, batch: dict[str, torch.Tensor], norm: float, beta: float,
                  kind: str) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of per-pair DPO/IPO losses divided by `norm` (the optimizer step's global pair count)."""
    logps = sequence_logprobs(model, batch)  # (2B,)
    B = logps.shape[0] // 2
    ref = batch["ref_logps"]  # (2B,)
    losses, st = dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta, kind)  # (B,)
    total = losses.sum()
    return total / norm, {"loss_sum": total.item(), "count": B, "accuracy": st["reward_accuracy"].sum().item(),
                          "reward_margin": st["reward_margin"].sum().item(),
                          "logp_chosen": logps[:B].sum().item(), "logp_rejected": logps[B:].sum().item(),
                          "tokens": batch["attention_mask"].sum().item()}


def dpo_count(items) -> int:
    return len(items)


@torch.no_grad()
def attach_reference(model, to_dev, items: list, pad_id: int, micro: int) -> list[DPOPair]:
    """(chosen, rejected, margin) pairs -> DPOPairs with the reference's log-probs, `micro` pairs per forward.
    Every worker does all rows, in the same order: the same values everywhere, and the same number of
    forwards on every rank (a ZeRO-3 forward is a collective). DPO has no use for the pair's margin."""
    out: list[DPOPair] = []
    for i in range(0, len(items), micro):
        chunk = [DPOPair(c, r) for c, r, _ in items[i:i + micro]]
        with adapters_off(model):
            logps = sequence_logprobs(model, to_dev(dpo_batch(chunk, pad_id))).cpu()  # (2b,)
        b = len(chunk)
        out += [DPOPair(p.chosen, p.rejected, logps[j].item(), logps[b + j].item()) for j, p in enumerate(chunk)]
    return out
