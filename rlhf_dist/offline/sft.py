"""The SFT step: teacher-forced NLL of the assistant tokens (single-process, no Ray, no DeepSpeed)."""

from __future__ import annotations

import torch

from ..algo import logprobs_from_logits
from ..data import Encoded, pad_right
from ..models import position_ids_from_mask


def sft_batch(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    ids, attn = pad_right([e.input_ids for e in items], pad_id)  # (B, T)
    loss_mask, _ = pad_right([e.loss_mask for e in items], 0)  # (B, T)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def sft_count(items: list[Encoded]) -> int:
    """Tokens that carry loss (the label of position t is token t+1, so the first token never does)."""
    return sum(sum(e.loss_mask[1:]) for e in items)


def sft_loss(model, batch: dict[str, torch.Tensor], norm: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of assistant-token NLL divided by `norm` (the optimizer step's global token count)."""
    ids, attn = batch["input_ids"], batch["attention_mask"]  # (B, T)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn),
                   use_cache=False).logits  # (B, T, V)
    logp = logprobs_from_logits(logits[:, :-1], ids[:, 1:])  # (B, T-1)
    mask = batch["loss_mask"][:, 1:].float()  # (B, T-1)
    nll_sum = -(logp * mask).sum()
    return nll_sum / norm, {"loss_sum": nll_sum.item(), "count": mask.sum().item(), "tokens": attn.sum().item()}
