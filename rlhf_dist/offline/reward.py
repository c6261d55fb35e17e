"""The reward-model stage: preference pairs, a scalar-head model, and the ranking loss (`steps.reward`)."""

from __future__ import annotations

from ..data.encode import tokenize_preferences
from ..data.read import read_dataset
from ..data.rows import ReadStats
from ..data.sources import data_spec
from ..models.load import load_scalar_model
from ..steps.reward import reward_batch, reward_count, reward_loss


def task_parts(cfg, tok, model_dir: str, bf16: bool) -> tuple[list, ReadStats, dict]:
    """The reward stage's data (preference pairs) and Task fields: a scalar-head model ranking the pairs."""
    rows, stats = read_dataset(data_spec(cfg, "reward_data_path", "preference"), "preference", cfg.bad_rows, cfg.max_bad_fraction)
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
