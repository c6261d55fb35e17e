"""The SFT step: teacher-forced NLL of the assistant tokens (single-process, no Ray, no DeepSpeed)."""

from __future__ import annotations

import torch

from ..algo import chunked_logprobs, logprobs_from_logits
from ..data.encode import Encoded, pad_right
from ..models.packing import Packed, forward, padded
from .forwards import plain_lm_head


def sft_batch(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Padded (B, T) tensors. The job adds their packed layout (`packing.pack`) when it packs."""
    ids, attn = pad_right([e.input_ids for e in items], pad_id)  # (B, T)
    loss_mask, _ = pad_right([e.loss_mask for e in items], 0)  # (B, T)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def sft_count(items: list[Encoded]) -> int:
    """Tokens that carry loss (the label of position t is token t+1, so the first token never does)."""
    return sum(sum(e.loss_mask[1:]) for e in items)


def next_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed: Packed | None = None,
                        chunk: int = 1024) -> torch.Tensor:
    """log p(token t+1 | tokens up to t) of each row: (B, T) -> (B, T-1) float32. The logits are projected
    `chunk` positions at a time where the model allows (`plain_lm_head`), so no (B, T, V) float32 tensor
    exists. Packed, the value at a sequence's last token scores the next sequence's first: the caller's
    mask (zero past each row's end) drops it."""
    ids = input_ids if packed is None else packed.input_ids  # (rows, T')
    targets = torch.roll(ids, -1, dims=1)  # (rows, T'): the last column wraps around, unused
    head = plain_lm_head(model)
    if head is None:
        logits = forward(model, input_ids, attention_mask, packed).logits  # (rows, T', V)
        logp = logprobs_from_logits(logits, targets).float()  # (rows, T')
    else:
        hidden = forward(model.get_decoder(), input_ids, attention_mask, packed).last_hidden_state  # (rows, T', H)
        logp, _ = chunked_logprobs(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1), chunk,
                                   bias=head.bias)  # (rows * T',)
        logp = logp.view(targets.shape)
    return padded(logp, packed)[:, :-1]  # (B, T-1)


def sft_loss(model, batch: dict, norm: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of assistant-token NLL divided by `norm` (the optimizer step's global token count). Stats are
    0-dim tensors (no host sync)."""
    ids, attn = batch["input_ids"], batch["attention_mask"]  # (B, T)
    logp = next_token_logprobs(model, ids, attn, batch.get("packed"))  # (B, T-1)
    mask = batch["loss_mask"][:, 1:].float()  # (B, T-1)
    nll_sum = -(logp * mask).sum()
    return nll_sum / norm, {"loss_sum": nll_sum.detach(), "count": mask.sum(), "tokens": attn.sum()}
