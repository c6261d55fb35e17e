"""The reward-model step: a pairwise ranking loss on scalar scores (single-process, no Ray, no DeepSpeed)."""

from __future__ import annotations

import torch

from ..algo import pairwise_ranking_loss
from ..data import Encoded, ReadStats, pad_right, read_dataset, tokenize_preferences
from ..models import load_scalar_model, sequence_scores


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


def task_parts(cfg, tok, model_dir: str, bf16: bool) -> tuple[list, ReadStats, dict]:
    """The reward stage's data (preference pairs) and Task fields: a scalar-head model ranking the pairs."""
    rows, stats = read_dataset(cfg.reward_data_path, "preference", cfg.bad_rows, cfg.max_bad_fraction)
    items = tokenize_preferences(tok, rows, cfg.max_length, cfg.truncate, stats)

    def model():
        m = load_scalar_model(model_dir, bf16, tok.pad_token_id, cfg.attn_implementation)
        if cfg.freeze_reward_backbone:
            for n, p in m.named_parameters():
                p.requires_grad = n.startswith("score.")
        return m

    return items, stats, dict(model=model, batch=lambda it: reward_batch(it, tok.pad_token_id),
                              loss=lambda m, b, n: reward_loss(m, b, n, cfg.reward_center_coef), count=reward_count,
                              higher_is_better=True, eval_every=0, stats=("accuracy",))
