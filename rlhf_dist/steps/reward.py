"""The reward-model step: a pairwise ranking loss on scalar scores (single-process, no Ray, no DeepSpeed)."""

from __future__ import annotations

import torch

from ..algo import pairwise_ranking_loss
from ..data.encode import Encoded, pad_right
from ..models.load import sequence_scores


def reward_batch(items: list[tuple[Encoded, Encoded, float]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one padded batch: ids (2B, T)."""
    seqs = [c.input_ids for c, _, _ in items] + [r.input_ids for _, r, _ in items]
    ids, attn = pad_right(seqs, pad_id)
    return {"input_ids": ids, "attention_mask": attn,
            "margin": torch.tensor([m for _, _, m in items], dtype=torch.float32)}


def reward_loss(model, batch: dict, norm: float, center_coef: float) -> tuple[torch.Tensor, dict]:
    """Ranking loss (sum over pairs / norm) plus the centering regulariser. Stats: sums, as 0-dim tensors
    (no host sync) or counts."""
    scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"], batch.get("packed"))  # (2B,)
    B = scores.shape[0] // 2
    chosen, rejected = scores[:B], scores[B:]  # (B,), (B,)
    loss_mean, stats = pairwise_ranking_loss(chosen, rejected, batch["margin"], center_coef)
    return loss_mean * B / norm, {"loss_sum": loss_mean.detach() * B, "count": B, "accuracy": stats["accuracy"] * B,
                                  "tokens": batch["attention_mask"].sum()}


def reward_count(items) -> int:
    return len(items)
