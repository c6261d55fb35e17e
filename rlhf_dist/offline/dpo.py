"""The DPO stage: preference pairs, the policy, and the DPO loss against the reference's log-probs (`steps.dpo`)."""

from __future__ import annotations

from ..data.encode import tokenize_preferences
from ..data.read import read_dataset
from ..data.rows import ReadStats
from ..data.sources import data_spec
from ..models.load import load_causal_lm
from ..models.packing import one_row
from ..steps.dpo import attach_reference, dpo_batch, dpo_count, dpo_step_loss


def task_parts(cfg, tok, model_dir: str, bf16: bool) -> tuple[list, ReadStats, dict]:
    """The DPO stage's data (preference pairs, dpo_data_path else reward_data_path) and Task fields: the policy,
    with the reference's log-probs attached to each pair once before training."""
    field = "dpo_data_path" if cfg.dpo_data_path else "reward_data_path"
    rows, stats = read_dataset(data_spec(cfg, field, "preference"), "preference", cfg.bad_rows, cfg.max_bad_fraction)
    items = tokenize_preferences(tok, rows, cfg.max_length, cfg.truncate, stats)
    return items, stats, dict(
        model=lambda: load_causal_lm(model_dir, bf16, cfg.attn_implementation),
        batch=lambda it: dpo_batch(it, tok.pad_token_id),
        loss=lambda m, b, n: dpo_step_loss(m, b, n, cfg.dpo_beta, cfg.dpo_loss), count=dpo_count,
        higher_is_better=True, eval_every=0, stats=("accuracy", "reward_margin", "logp_chosen", "logp_rejected"),
        prepare=lambda m, to_dev, it, micro: attach_reference(m, to_dev, it, tok.pad_token_id, micro,
                                                              cfg.dpo_max_tokens_per_micro_batch,
                                                              one_row(cfg.attn_implementation)))
